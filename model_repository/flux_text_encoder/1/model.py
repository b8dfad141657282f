"""Triton Python-backend model ``flux_text_encoder``: ``FluxPipeline.encode_prompt`` with the CLIP and T5 encoders
of ``components_dir`` (prompt strings in; T5's ``prompt_embeds`` and CLIP's ``pooled_prompt_embeds`` out, as FP32),
one copy on the GPU for every ``flux_generate`` instance (``flux_triton.serving.encode_decode``). Configured by its
parameters (``ComponentsSettings``)."""

from __future__ import annotations

import json
from pathlib import Path

from flux_triton.contract.generation import ENCODED, MAX_SEQUENCE_LENGTH, utf8_strings
from flux_triton.locations import Locations
from flux_triton.serving import triton
from flux_triton.serving.encode_decode import PromptEncoder, load_served
from flux_triton.serving.settings import ComponentsSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        root = Locations.of_repository(REPOSITORY).model_root
        components, folder = load_served(ComponentsSettings.from_config(config), root, encoders=True)
        self.encode, self.name = PromptEncoder(components), config["name"]
        triton.log_info(f"{self.name}: CLIP and T5 from {folder} on {self.encode.device}")

    def execute(self, requests):
        return triton.answer_each(requests, self._one, self.name)

    def _one(self, request) -> dict:
        prompts = utf8_strings("prompt", triton.request_strings(request, ["prompt"]).get("prompt", []))
        length = triton.request_tensors(request, [MAX_SEQUENCE_LENGTH]).get(MAX_SEQUENCE_LENGTH)
        encoded = self.encode(prompts, 512 if length is None else int(length.reshape(-1)[0]))
        return {name: tensor.float().cpu() for name, tensor in zip(ENCODED, encoded, strict=True)}
