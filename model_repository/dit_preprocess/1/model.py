"""Triton Python-backend model ``dit_preprocess``: ``flux_dit``'s public request -> engine inputs.

Validates the request against the contract (the same errors as ``dit_transformer``), scales the raw
timestep as ``FluxPipeline`` does (``t.to(dtype) / 1000``), casts floats to the engine's dtype and ids
to FP32 (``flux_triton.serving.preprocess``), and holds each generation session's prompt (a sequence's first step
carries it). Configured by generated parameters.
"""

from __future__ import annotations

import json

import torch

from flux_triton.contract import INPUTS, InputError
from flux_triton.contract.specs import engine_tensor_name
from flux_triton.serving import triton
from flux_triton.serving.preprocess import Preprocessor
from flux_triton.serving.profiling import ExecuteProfiler
from flux_triton.serving.settings import PreprocessSettings


class TritonPythonModel:
    def initialize(self, args):
        self.preprocessor = Preprocessor(PreprocessSettings.from_config(json.loads(args["model_config"])))
        torch.set_num_threads(1)  # one request's single-pass checks
        self.profiler = ExecuteProfiler("dit_preprocess", torch.device("cpu"))

    def execute(self, requests):
        with self.profiler.execute(len(requests)):
            self.preprocessor.sessions.expire()
            return [self._answer(request) for request in requests]

    def _answer(self, request):
        tensors = triton.request_tensors(request, [spec.name for spec in INPUTS])
        try:
            outputs = self.preprocessor.run(tensors, triton.sequence_step(request))
        except InputError as exc:
            return triton.error_response(str(exc), invalid_arg=True)
        return triton.response({engine_tensor_name(name): t for name, t in outputs.items()})
