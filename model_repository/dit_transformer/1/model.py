"""Triton Python-backend model ``dit_transformer``: one FLUX denoising step per request.

Inside Triton it serves diffusers' ``FluxTransformer2DModel`` with dynamic batching
(``flux_triton.serving.service``); run as a script (``uv run model_repository/dit_transformer/1/model.py``)
it does one step on the default model outside Triton and compares it with a direct diffusers call.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from flux_triton.contract import INPUTS, OUTPUT_NAME, OUTPUTS
from flux_triton.locations import Locations
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import random_step
from flux_triton.serving import triton
from flux_triton.serving.profiling import ExecuteProfiler
from flux_triton.serving.service import DitService, pick_device, signature_for, warm_service
from flux_triton.serving.sessions import HELD
from flux_triton.serving.settings import TransformerSettings, check_cache_instances

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository, also when run as a script


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Inputs and outputs from the IO contract, sized by the model's config.json."""
        config = auto_complete_model_config.as_dict()
        settings = TransformerSettings.from_config(config)
        _, signature = signature_for(settings, Locations.of_repository(REPOSITORY).model_root, pick_device())
        for spec in INPUTS:  # the prompt's tensors are optional: a sequence sends them once (serving.sessions)
            held = replace(spec, optional=True) if spec.name in HELD else spec
            auto_complete_model_config.add_input(signature.tensor_config(held))
        for spec in OUTPUTS:
            auto_complete_model_config.add_output(signature.tensor_config(spec))
        if config.get("max_batch_size", 0) == 0:
            auto_complete_model_config.set_max_batch_size(settings.max_batch)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = TransformerSettings.from_config(config)
        check_cache_instances(config, settings.cache)
        if settings.parallel_settings.enabled and args["model_instance_kind"] == "GPU":
            raise ValueError(f"parallel {settings.parallel}: one instance drives {settings.parallel_degree} GPUs, "
                             f"so its instance_group must be KIND_MODEL (python -m flux_triton place)")  # fmt: skip
        device = triton.instance_device(args)
        triton.utf8_text()  # before anything compiles
        root = Locations.of_repository(REPOSITORY).model_root
        self.service = warm_service(settings, root, device, "dit_transformer", triton.log_info)  # before READY
        self.profiler = ExecuteProfiler("dit_transformer", self.service.device)

    def execute(self, requests):
        with self.profiler.execute(len(requests)):
            names = [spec.name for spec in INPUTS]
            device = self.service.device
            calls = [(triton.request_tensors(r, names, device), triton.sequence_step(r)) for r in requests]
            return [triton.result_response("dit_transformer", result) for result in self.service.run(calls)]

    def finalize(self):
        self.service.close()
        self.service = None


def main() -> None:
    device = pick_device()
    service = DitService(TransformerSettings(), Locations.of_repository(REPOSITORY).model_root, device)
    step = random_step(service.signature, batch=1, device=device)
    prepared = service.prepare(step.wire())
    start = time.perf_counter()
    noise_pred = service.execute([prepared])[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    expected = reference_call(service.transformer, step)
    diff = (noise_pred.float() - expected.float()).abs().max().item()
    print(f"model        {service.model_dir} ({service.signature.dtype} on {device})")
    for name, tensor in step.wire().items():
        print(f"input        {name:<22} {list(tensor.shape)} {tensor.dtype}")
    print(f"output       {OUTPUT_NAME:<22} {list(noise_pred.shape)} {noise_pred.dtype}")
    print(f"step time    {elapsed_ms:.2f} ms")
    print(f"max |noise_pred - diffusers FluxPipeline call| = {diff:.3g}")


if __name__ == "__main__":
    main()
