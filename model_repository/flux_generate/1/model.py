"""Triton Python-backend model ``flux_generate``: a whole FLUX generation per request (prompt embeddings in,
latents out), diffusers' ``FluxPipeline`` running here with every step sent to the served transformer model in
process (``flux_triton.serving.generate``). Configured by its parameters (``GenerateSettings``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.serving import triton
from flux_triton.serving.generate import (
    GENERATE_INPUTS,
    GENERATE_OUTPUT,
    Generation,
    ServedSteps,
    generate,
    scheduler_for,
)
from flux_triton.serving.service import model_dtype, pick_device
from flux_triton.serving.settings import GenerateSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        self.settings = GenerateSettings.from_config(json.loads(args["model_config"]))
        root = Locations.of_repository(REPOSITORY).model_root
        self.model_dir = store.resolve_model_dir(self.settings.model_dir, root)
        dtype = model_dtype(self.settings, pick_device())  # the transformer's, wherever its instance runs
        self.signature = DitSignature.from_config(store.read_config(self.model_dir), dtype)
        torch.set_num_threads(1)  # the loop's own work is small; the forwards run in the transformer's model
        triton.log_info(f"flux_generate: {self.model_dir}, steps to {self.settings.transformer_model} "
                        f"as {self.signature.dtype}")  # fmt: skip

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        tensors = triton.request_tensors(request, [name for name, *_ in GENERATE_INPUTS])
        parameters = json.loads(request.parameters() or "{}")
        try:
            cache = parameters.get(CACHE_PARAMETER, "")
            generation = Generation.parse(tensors, cache if isinstance(cache, str) else json.dumps(cache),
                                          self.signature, self.settings)  # fmt: skip
            steps = ServedSteps(self.signature, self.settings.transformer_model, self._infer, generation.cache)
            latents = generate(generation, steps, scheduler_for(self.settings, self.model_dir, self.signature))
        except Exception as exc:
            return triton.result_response("flux_generate", exc)
        return triton.response({GENERATE_OUTPUT: latents.float()})

    def _infer(self, tensors, sequence):
        return triton.bls_infer(self.settings.transformer_model, tensors, sequence)
