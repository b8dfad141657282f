"""Engine precisions: what each means for the ONNX graph, the engine kinds and the GPU.

TensorRT builds strongly typed networks (the only mode in TensorRT 11; ``BuilderFlag.FP16/BF16/
FP8`` were removed), so the precision lives in the ONNX graph itself: weights and float IO in
``onnx_dtype``; FP8 as explicit Q/DQ nodes from NVIDIA ModelOpt around a BF16 graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_triton.contract import TORCH_TO_TRITON


@dataclass(frozen=True)
class Precision:
    name: str
    onnx_dtype: torch.dtype  # weights, float inputs and noise_pred in the graph
    kinds: tuple[str, ...]  # engine kinds that can run it
    quantization: str | None = None  # "fp8": ModelOpt E4M3 Q/DQ
    min_compute_capability: tuple[int, int] = (0, 0)
    tf32: bool = False  # allow TF32 tactics for FP32 math in TensorRT

    @property
    def io_dtype(self) -> str:
        """Triton dtype of the float inputs and noise_pred (the public and the engine side)."""
        return TORCH_TO_TRITON[self.onnx_dtype]


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, ("onnxruntime", "tensorrt", "aoti"), tf32=False),
    "fp16": Precision("fp16", torch.float16, ("tensorrt",), min_compute_capability=(7, 0)),
    "bf16": Precision("bf16", torch.bfloat16, ("tensorrt", "aoti"), min_compute_capability=(8, 0)),
    # aoti-fp8: bf16 model with FP8 block linears (flux_triton.fp8, torch._scaled_mm).
    "fp8": Precision(
        "fp8", torch.bfloat16, ("tensorrt", "aoti-fp8"), quantization="fp8", min_compute_capability=(8, 9)
    ),
}
KINDS = ("onnxruntime", "tensorrt", "aoti", "aoti-fp8")
AOTI_KINDS = ("aoti", "aoti-fp8")  # torch.export + AOTInductor (export/aoti.py), compiled for the build device
# aoti: None = the model dtype of the build device (bf16 on CUDA, fp32 on CPU).
DEFAULT_PRECISION = {"onnxruntime": "fp32", "tensorrt": "bf16", "aoti": None, "aoti-fp8": "fp8"}


def default_precision(kind: str, device: torch.device | str | None = None) -> str:
    if DEFAULT_PRECISION[kind] is not None:
        return DEFAULT_PRECISION[kind]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return "bf16" if device.type == "cuda" else "fp32"


def precision_for(kind: str, name: str | None) -> Precision:
    if kind not in KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(KINDS)}")
    precision = PRECISIONS.get(name or default_precision(kind))
    if precision is None:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    if kind not in precision.kinds:
        runs = ", ".join(precision.kinds)
        raise ValueError(f"precision {precision.name} is not supported by the {kind} engine (only by: {runs})")
    return precision
