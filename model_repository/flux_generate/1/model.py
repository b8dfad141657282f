"""Triton Python-backend model ``flux_generate``: a whole FLUX generation per request (prompt strings or embeddings
in; latents, and PNG images where the server has a VAE, out), diffusers' ``FluxPipeline`` running here with every
step sent to the served transformer model in process (or, ``in_process``, run by this instance itself),
prompt strings to the served text encoder model and latents to the served VAE model (``flux_triton.serving.generate``;
the request checked by ``flux_triton.serving.generation_request``). Configured by its parameters (``GenerateSettings``).

The same file serves ``flux_generate_stream``, whose config is decoupled: each request then gets a ``progress``
response after every step and its answer last, and a request cancelled (the client stopped its stream, or
disconnected) stops at its next step, its sequences ended."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.contract.generation import (
    ENCODED,
    GENERATE_INPUTS,
    IMAGES,
    LATENTS,
    MAX_SEQUENCE_LENGTH,
    PROGRESS,
    STRING_INPUTS,
)
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.serving import triton
from flux_triton.serving.generate import ServedSteps, generate, in_process, scheduler_for
from flux_triton.serving.generation_request import Generation, GenerationCancelled, Parts
from flux_triton.serving.service import model_dtype, pick_device, warm_service
from flux_triton.serving.settings import GenerateSettings, TransformerSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.settings = GenerateSettings.from_config(config)
        self.name, self.streams = config["name"], triton.decoupled(config)
        root = Locations.of_repository(REPOSITORY).model_root
        self.model_dir = store.resolve_model_dir(self.settings.model_dir, root)
        self.service, self.steps_device = None, torch.device("cpu")
        if not self.settings.in_process:
            device, target = pick_device(), self.settings.transformer_model
            self._infer = self._bls_infer
        else:  # the transformer runs here, with dit_transformer's parameters in this config
            device, target = triton.instance_device(args), "this instance"
            triton.utf8_text()  # before anything compiles
            transformer = TransformerSettings.from_config(config)
            self.service = warm_service(transformer, root, device, self.name, triton.log_info)  # before READY
            self._infer, self.steps_device = in_process(self.service), self.service.device
        self.dtype = model_dtype(self.settings, device)  # the transformer's and the encoders', wherever they run
        self.signature = DitSignature.from_config(store.read_config(self.model_dir), self.dtype)
        if self.service is None:
            torch.set_num_threads(1)  # the loop's own work is small; the forwards run in the served models
        triton.log_info(f"{self.name}: {self.model_dir}, steps to {target} as {self.signature.dtype}")

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
            parts = self._parts()
            generation = Generation.parse(inputs, cache if isinstance(cache, str) else json.dumps(cache),
                                          self.signature, self.settings, parts,
                                          triton.requested_outputs(request))  # fmt: skip
            steps = ServedSteps(self.signature, self.settings.transformer_model, self._infer, generation.cache,
                                self.steps_device)  # fmt: skip
            scheduler = scheduler_for(self.settings, self.model_dir, self.signature)
            latents, images = generate(generation, steps, scheduler, parts, min(512, self.settings.max_text_tokens),
                                       progress)  # fmt: skip
        except Exception as exc:
            return triton.result_response(self.name, exc)
        return triton.response({LATENTS: latents.float().cpu()} | ({IMAGES: images} if images is not None else {}))

    def _parts(self) -> Parts:
        """The text encoder and VAE models this server has loaded now."""
        encoder, vae = self.settings.text_encoder_model, self.settings.vae_model
        return Parts(self._encode if encoder and triton.model_ready(encoder) else None,
                     self._decode if vae and triton.model_ready(vae) else None)  # fmt: skip

    def _bls_infer(self, tensors, sequence):
        return triton.bls_infer(self.settings.transformer_model, tensors, sequence)

    def finalize(self):
        if self.service is not None:
            self.service.close()
            self.service = None

    def _encode(self, prompts: list[str], max_sequence_length: int):
        """The served encoders' embeddings, back in their dtype (FP32 on the wire holds bfloat16 exactly)."""
        inputs = {"prompt": [text.encode() for text in prompts],
                  MAX_SEQUENCE_LENGTH: torch.tensor([max_sequence_length], dtype=torch.int32)}  # fmt: skip
        answer = triton.bls_call(self.settings.text_encoder_model, inputs, list(ENCODED))
        return tuple(answer[name].to(self.dtype) for name in ENCODED)

    def _decode(self, latents, height: int, width: int):
        inputs = {LATENTS: latents.float().cpu(), "height": torch.tensor([height], dtype=torch.int32),
                  "width": torch.tensor([width], dtype=torch.int32)}  # fmt: skip
        return triton.bls_call(self.settings.vae_model, inputs, [IMAGES], strings=[IMAGES])[IMAGES]
