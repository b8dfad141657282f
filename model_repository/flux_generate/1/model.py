"""Triton Python-backend model ``flux_generate``: a whole FLUX generation per request (prompt strings or embeddings
in; latents, and PNG images where a VAE is configured, out), diffusers' ``FluxPipeline`` running here with the text
encoders and VAE of ``components_dir`` and every step sent to the served transformer model in process
(``flux_triton.serving.generate``). Configured by its parameters (``GenerateSettings``).

The same file serves ``flux_generate_stream``, whose config is decoupled: each request then gets a ``progress``
response after every step and its answer last, and a request cancelled (the client stopped its stream, or
disconnected) stops at its next step, its sequences ended."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.contract.generation import GENERATE_INPUTS, IMAGES, LATENTS, PROGRESS, STRING_INPUTS
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.components import components_folder, load_components
from flux_triton.serving import triton
from flux_triton.serving.generate import Generation, GenerationCancelled, ServedSteps, generate, scheduler_for
from flux_triton.serving.service import model_dtype, pick_device
from flux_triton.serving.settings import GenerateSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.settings = GenerateSettings.from_config(config)
        self.name, self.streams = config["name"], triton.decoupled(config)
        root = Locations.of_repository(REPOSITORY).model_root
        self.model_dir = store.resolve_model_dir(self.settings.model_dir, root)
        device = pick_device()
        dtype = model_dtype(self.settings, device)  # the transformer's, wherever its instance runs
        self.signature = DitSignature.from_config(store.read_config(self.model_dir), dtype)
        folder = components_folder(self.settings.components_dir, self.model_dir, root)
        self.components = load_components(folder, device, dtype)
        torch.set_num_threads(1)  # the loop's own work is small; the forwards run in the transformer's model
        parts = [name for name, has in (("text encoders", self.components.encodes), ("VAE", self.components.decodes))
                 if has]  # fmt: skip
        triton.log_info(f"{self.name}: {self.model_dir}, steps to {self.settings.transformer_model} as "
                        f"{self.signature.dtype}; {' and '.join(parts) or 'no text encoders, no VAE'} "
                        f"({folder})")  # fmt: skip

    def execute(self, requests):
        if not self.streams:
            return [self._one(request) for request in requests]
        for request in requests:  # one at a time: each instance runs one generation
            sender = request.get_response_sender()
            answer = self._one(request, lambda done, total, r=request, s=sender: self._report(r, s, done, total))
            triton.send_last(sender, answer)
        return None

    @staticmethod
    def _report(request, sender, done: int, total: int) -> None:
        """After each step: stop a cancelled request (its sequences end as the loop unwinds), else report."""
        if request.is_cancelled():
            raise GenerationCancelled(f"cancelled after {done} of {total} steps")
        sender.send(triton.response({PROGRESS: torch.tensor([done, total], dtype=torch.int32)}))

    def _one(self, request, progress=None):
        inputs = triton.request_tensors(request, [name for name, *_ in GENERATE_INPUTS if name not in STRING_INPUTS])
        inputs |= triton.request_strings(request, STRING_INPUTS)
        parameters = json.loads(request.parameters() or "{}")
        try:
            cache = parameters.get(CACHE_PARAMETER, "")
            generation = Generation.parse(inputs, cache if isinstance(cache, str) else json.dumps(cache),
                                          self.signature, self.settings, self.components,
                                          triton.requested_outputs(request))  # fmt: skip
            steps = ServedSteps(self.signature, self.settings.transformer_model, self._infer, generation.cache)
            scheduler = scheduler_for(self.settings, self.model_dir, self.signature)
            latents, images = generate(generation, steps, scheduler, self.components,
                                       min(512, self.settings.max_text_tokens), progress)  # fmt: skip
        except Exception as exc:
            return triton.result_response(self.name, exc)
        return triton.response({LATENTS: latents.float().cpu()} | ({IMAGES: images} if images is not None else {}))

    def _infer(self, tensors, sequence):
        return triton.bls_infer(self.settings.transformer_model, tensors, sequence)
