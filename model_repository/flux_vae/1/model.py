"""Triton Python-backend model ``flux_vae``: ``FluxPipeline``'s ``output_type="pil"`` tail with the VAE of
``components_dir`` (packed latents, height and width in; each image as the base64 text of its PNG out), one copy on
the GPU for every ``flux_generate`` instance (``flux_triton.serving.encode_decode``). Configured by its parameters
(``ComponentsSettings``)."""

from __future__ import annotations

import json
from pathlib import Path

from flux_triton.contract.generation import IMAGES, LATENTS
from flux_triton.locations import Locations
from flux_triton.serving import triton
from flux_triton.serving.encode_decode import LatentDecoder, load_served
from flux_triton.serving.settings import ComponentsSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        root = Locations.of_repository(REPOSITORY).model_root
        components, folder = load_served(ComponentsSettings.from_config(config), root, encoders=False)
        self.decode, self.name = LatentDecoder(components), config["name"]
        triton.log_info(f"{self.name}: the VAE from {folder} on {components.vae.device}")

    def execute(self, requests):
        return triton.answer_each(requests, self._one, self.name)

    def _one(self, request) -> dict:
        tensors = triton.request_tensors(request, [LATENTS, "height", "width"])
        height, width = (int(tensors[name].reshape(-1)[0]) for name in ("height", "width"))
        return {IMAGES: self.decode(tensors[LATENTS], height, width)}
