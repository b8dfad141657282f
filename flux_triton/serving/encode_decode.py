"""The text encoders and the VAE as served models of their own (``flux_text_encoder``, ``flux_vae``), so that every
instance of ``flux_generate`` and ``flux_generate_stream`` shares one copy of them on the GPU (T5-XXL alone is
~9.5 GB in bf16) instead of loading its own.

Each runs exactly what ``FluxPipeline`` runs: ``encode_prompt`` on a pipeline that holds only the encoders, and its
``output_type="pil"`` tail (unpack, unscale, decode, postprocess) on one that holds only the VAE. The embeddings cross
to ``flux_generate`` as FP32 and go back to the encoders' dtype there, which is exact, so a generation's latents and
images equal the ones ``FluxPipeline`` makes with the same components in one process, bit for bit.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch
from diffusers import FluxPipeline

from flux_triton.contract import InputError
from flux_triton.model import store
from flux_triton.model.components import Components, components_folder, load_components
from flux_triton.pipeline.internals import unpack_latents
from flux_triton.serving.service import model_dtype, pick_device
from flux_triton.serving.settings import ComponentsSettings


def load_served(settings: ComponentsSettings, model_root: Path, encoders: bool) -> tuple[Components, Path]:
    """The text encoders (``encoders``) or the VAE of ``settings.components_dir`` on this process's device, and
    that folder; ``ModelDirError`` where it has none of them."""
    model_dir = store.resolve_model_dir(settings.model_dir, model_root)
    folder = components_folder(settings.components_dir, model_dir, model_root)
    device = pick_device()
    components = Components() if folder is None else load_components(
        folder, device, model_dtype(settings, device), encoders=encoders, vae=not encoders)  # fmt: skip
    if not (components.encodes if encoders else components.decodes):
        wanted = "text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/" if encoders else "vae/"
        where = folder or f"{model_dir} (not a pipeline folder's transformer/)"
        raise store.ModelDirError(f"components_dir {settings.components_dir!r}: no {wanted} in {where}; point "
                                  f"components_dir at a folder with them, or leave this model out")  # fmt: skip
    return components, folder


def _pipeline(components: Components) -> FluxPipeline:
    pipe = FluxPipeline(None, transformer=None, **components.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PromptEncoder:
    """``FluxPipeline.encode_prompt`` with the CLIP and T5 encoders of ``components``."""

    def __init__(self, components: Components):
        self.pipe, self.device = _pipeline(components), components.text_encoder.device

    @torch.inference_mode()
    def __call__(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's ``prompt_embeds`` [B, max_sequence_length, D] and CLIP's ``pooled_prompt_embeds`` [B, P]."""
        if not 1 <= max_sequence_length <= 512:
            raise InputError(f"max_sequence_length: expected 1 to 512, got {max_sequence_length}")
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )
        return prompt_embeds, pooled


class LatentDecoder:
    """``FluxPipeline``'s ``output_type="pil"`` tail with the VAE of ``components``: packed latents -> PNGs."""

    def __init__(self, components: Components):
        self.pipe = _pipeline(components)
        self.vae = components.vae

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, height: int, width: int) -> list[bytes]:
        """Each image of ``latents`` (FluxPipeline's packed [B, N, C], any float dtype that holds them exactly) as
        the base64 text of its PNG."""
        scale, channels = self.pipe.vae_scale_factor * 2, self.vae.config.latent_channels * 4
        for name, value in (("height", height), ("width", width)):
            if value < scale or value % scale:
                raise InputError(f"{name}: expected a positive multiple of {scale}, got {value}")
        tokens = (height // scale) * (width // scale)
        if latents.ndim != 3 or latents.shape[1:] != (tokens, channels):
            raise InputError(f"latents: expected [B, {tokens}, {channels}] for {height}x{width}, got "
                             f"{list(latents.shape)}")  # fmt: skip
        if not torch.isfinite(latents).all():
            raise InputError("latents: contains NaN or Inf")
        latents = latents.to(self.vae.device, self.vae.dtype)  # FluxPipeline's latents are in the VAE's dtype
        latents = unpack_latents(self.pipe, latents, height, width)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return [png_base64(picture) for picture in self.pipe.image_processor.postprocess(image, output_type="pil")]


def png_base64(image) -> bytes:
    """A PIL image as the base64 text of its PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())
