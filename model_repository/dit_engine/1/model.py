"""Triton Python-backend model ``dit_engine``: runs a compiled DiT engine chosen by its sidecar.

The loader comes from ``flux_triton.engines.LOADERS`` by the sidecar's ``kind`` (onnxruntime, aoti,
aoti-fp8; new kinds register there), so this file does not change with the engine. Requests that Triton's
dynamic batcher lists together are concatenated when their shapes and ids agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flux_triton.contract import OUTPUT_NAME
from flux_triton.engine_runner import engine_path, run_batched
from flux_triton.engines import load_engine
from flux_triton.runner import limit_cpu_threads

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the server
    pb_utils = None

REPOSITORY_DIR = Path(__file__).resolve().parents[2]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_names = [entry["name"] for entry in config["input"]]
        parameter = config["parameters"]["engine"]["string_value"]
        if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
            device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            device = torch.device("cpu")
        limit_cpu_threads(device)
        self.sidecar, self.engine = load_engine(engine_path(parameter, REPOSITORY_DIR), device)
        pb_utils.Logger.log_info(
            f"dit_engine: {self.sidecar.kind} {self.sidecar.precision} engine {self.sidecar.engine_file} on {device}"
        )

    def execute(self, requests):
        batch = []
        for request in requests:
            tensors = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            batch.append(tensors)
        responses = []
        for result in run_batched(self.engine, batch):
            if isinstance(result, Exception):
                message = f"dit_engine ({self.sidecar.kind}) failed: {type(result).__name__}: {result}"
                error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                output = pb_utils.Tensor.from_dlpack(OUTPUT_NAME, torch.utils.dlpack.to_dlpack(result.contiguous()))
                responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
