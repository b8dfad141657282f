"""FP8 (E4M3) quantization with NVIDIA ModelOpt before ONNX export, as NVIDIA's FLUX demo does.

Per-tensor FP8 for the Linear weights and inputs of the transformer blocks (the demo's level 3);
``proj_out``, the embedders and ``norm_out`` stay in BF16. The exported graph carries Q/DQ nodes
and TensorRT builds it strongly typed. Needs ``nvidia-modelopt[torch,onnx]`` and a GPU of compute
capability >= 8.9 for the engine. Calibration uses pipeline-shaped random steps over the
profile's sizes and the dev schedule's timesteps; for production, calibrate with real prompt
embeddings (``calibration_steps`` from a dataset) as the demo does.
"""

from __future__ import annotations

from flux_triton.contract import DitSignature
from flux_triton.engines.profiles import ProfileConfig
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import random_step

UNQUANTIZED = ("proj_out", "time_text_embed", "context_embedder", "x_embedder", "norm_out", "pos_embed")


class ModelOptMissing(RuntimeError):
    pass


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ModelOptMissing(
            "PRECISION=fp8 needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[torch,onnx]' "
            "(inside NVIDIA's PyTorch/Triton container, next to TensorRT)"
        ) from exc
    return mtq


def quantize_fp8(transformer, signature: DitSignature, profile: ProfileConfig, samples: int = 8):
    """Calibrate and insert FP8 quantizers in place; returns the transformer."""
    mtq = _modelopt()
    config = {
        "quant_cfg": {
            # BF16 around the Q/DQ pairs, matching the BF16 graph (NVIDIA's demo does the same)
            "*weight_quantizer": {"num_bits": (4, 3), "axis": None, "trt_high_precision_dtype": "BFloat16"},
            "*input_quantizer": {"num_bits": (4, 3), "axis": None, "trt_high_precision_dtype": "BFloat16"},
            "default": {"enable": False},
        },
        "algorithm": "max",
    }
    device = next(transformer.parameters()).device
    (height, width), text = profile.opt_size, profile.text_tokens[1]

    def forward_loop(model):
        for index in range(samples):
            timestep = 1000.0 * (samples - index) / samples
            step = random_step(signature, 1, height, width, text, timestep=timestep, seed=index, device=device)
            reference_call(model, step)

    mtq.quantize(transformer, config, forward_loop)
    mtq.disable_quantizer(transformer, lambda name: any(part in name for part in UNQUANTIZED))
    return transformer
