"""Triton Python-backend model ``dit_transformer``: one FLUX denoising step per request.

Inside Triton it serves diffusers' ``FluxTransformer2DModel`` with dynamic batching; run as a
script (``uv run model_repository/dit_transformer/1/model.py``) it does one step on the default
model outside Triton and compares it with a direct diffusers call.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from flux_triton import model_store, reference
from flux_triton.contract import INPUTS, OUTPUT_NAME, OUTPUTS
from flux_triton.runner import limit_cpu_threads
from flux_triton.service import DitService, ServeSettings, pick_device, signature_for
from flux_triton.validation import InputError

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # standalone run, outside the server
    pb_utils = None

REPOSITORY_DIR = Path(__file__).resolve().parents[2]


def _model_root() -> Path:
    return model_store.model_root(default=REPOSITORY_DIR.parent / "models")


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Inputs and outputs from the IO contract, sized by the model's config.json."""
        config = auto_complete_model_config.as_dict()
        settings = ServeSettings.from_model_config(config)
        _, signature = signature_for(settings, _model_root(), pick_device())
        for spec in INPUTS:
            auto_complete_model_config.add_input(signature.tensor_config(spec))
        for spec in OUTPUTS:
            auto_complete_model_config.add_output(signature.tensor_config(spec))
        if config.get("max_batch_size", 0) == 0:
            auto_complete_model_config.set_max_batch_size(settings.max_batch)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        settings = ServeSettings.from_model_config(model_config)
        if args["model_instance_kind"] == "GPU":
            device = pick_device(int(args["model_instance_device_id"]))
        else:
            device = torch.device("cpu")
        limit_cpu_threads(device)
        self.service = DitService(settings, _model_root(), device)
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"dit_transformer: {self.service.model_dir} on {device} as {self.service.signature.dtype}, "
            f"guidance_embeds={self.service.signature.guidance_embeds}"
        )

    def execute(self, requests):
        responses: list = [None] * len(requests)
        steps, positions = [], []
        for position, request in enumerate(requests):
            try:
                steps.append(self.service.prepare(_request_tensors(request)))
                positions.append(position)
            except InputError as exc:
                responses[position] = _error(str(exc), invalid_arg=True)
        for position, result in zip(positions, self.service.execute(steps), strict=True):
            if isinstance(result, Exception):
                responses[position] = _error(f"dit_transformer forward failed: {type(result).__name__}: {result}")
            else:
                tensor = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, torch.utils.dlpack.to_dlpack(result.contiguous()))
                responses[position] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def finalize(self):
        self.service = None


def _request_tensors(request) -> dict[str, torch.Tensor]:
    tensors = {}
    for spec in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            tensors[spec.name] = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    return tensors


def _error(message: str, invalid_arg: bool = False):
    code = pb_utils.TritonError.INVALID_ARG if invalid_arg else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def main() -> None:
    device = pick_device()
    service = DitService(ServeSettings(), _model_root(), device)
    step = reference.random_step(service.signature, batch=1, device=device)
    prepared = service.prepare(step.wire())
    start = time.perf_counter()
    noise_pred = service.execute([prepared])[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    expected = reference.diffusers_call(service.transformer, step)
    diff = (noise_pred.float() - expected.float()).abs().max().item()
    print(f"model        {service.model_dir} ({service.signature.dtype} on {device})")
    for name, tensor in step.wire().items():
        print(f"input        {name:<22} {list(tensor.shape)} {tensor.dtype}")
    print(f"output       {OUTPUT_NAME:<22} {list(noise_pred.shape)} {noise_pred.dtype}")
    print(f"step time    {elapsed_ms:.2f} ms")
    print(f"max |noise_pred - diffusers FluxPipeline call| = {diff:.3g}")


if __name__ == "__main__":
    main()
