"""Triton Python-backend model ``dit_preprocess``: ``flux_dit``'s public request -> engine inputs.

Validates the request with ``flux_triton.validation`` (the same errors as ``dit_transformer``),
scales the raw timestep as ``FluxPipeline`` does (``t.to(dtype) / 1000``), checks and casts
guidance, casts floats to the engine's dtype and ids to FP32. Configured by generated parameters.
"""

from __future__ import annotations

import json

import torch

from flux_triton.contract import INPUTS
from flux_triton.engine_runner import preprocess, preprocess_settings
from flux_triton.repository import engine_name
from flux_triton.validation import InputError

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the server
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.signature, self.limits = preprocess_settings(parameters)
        torch.set_num_threads(1)  # one request's single-pass checks; see runner.limit_cpu_threads

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {}
            for spec in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                if tensor is not None:
                    tensors[spec.name] = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            try:
                outputs = preprocess(tensors, self.signature, self.limits)
            except InputError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor.from_dlpack(engine_name(name), torch.utils.dlpack.to_dlpack(tensor))
                        for name, tensor in outputs.items()
                    ]
                )
            )
        return responses
