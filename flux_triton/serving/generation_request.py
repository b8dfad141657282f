"""A ``flux_generate`` request, checked (``Generation.parse``) against this server's transformer, limits and parts
(the served text encoders and VAE it may use); each refusal an ``InputError`` naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flux_triton.contract import DitSignature, InputError
from flux_triton.contract.generation import GENERATE_INPUTS, IMAGES, LATENTS, STRING_INPUTS, utf8_strings
from flux_triton.pipeline.caching import build_cache, describe_cache, parse_cache_setting
from flux_triton.pipeline.inputs import image_tokens
from flux_triton.serving import caching
from flux_triton.serving.settings import GenerateSettings


class GenerationCancelled(InputError):
    """The client cancelled the generation (a 400: nothing failed on the server)."""


Encode = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]  # prompts, text tokens -> T5's, CLIP's
Decode = Callable[[torch.Tensor, int, int], list[bytes]]  # packed latents, height, width -> base64 PNGs


@dataclass(frozen=True)
class Parts:
    """The served models a generation may use besides the transformer: ``None`` where the server has none."""

    encode: Encode | None = None
    decode: Decode | None = None


@dataclass(frozen=True)
class Generation:
    """One validated request: what ``FluxPipeline`` is called with, and whether it returns images."""

    prompt: list[str] | None
    negative_prompt: list[str] | None
    prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_prompt_embeds: torch.Tensor | None
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    cache: str  # the step cache's plain spec as JSON ("": none), as a sequence's START carries it
    images: bool  # decode the latents with the VAE into PNGs

    @classmethod
    def parse(cls, request: Mapping[str, torch.Tensor | list[bytes]], cache: str, signature: DitSignature,
              settings: GenerateSettings, parts: Parts, outputs: set[str]) -> Generation:  # fmt: skip
        """The request's inputs (tensors; strings as lists of bytes), ``cache`` parameter and requested
        ``outputs`` (empty: all there are), checked against what this server has; ``InputError`` names the field."""
        values = {}
        for name, _, dims, default in GENERATE_INPUTS:
            value = request.get(name)
            if value is None:
                values[name] = None if default is ... else default
            elif name in STRING_INPUTS:
                values[name] = utf8_strings(name, value)
            elif dims == (1,):
                values[name] = _scalar(name, value)
            else:  # embeddings in the transformer's dtype, as FluxPipeline's text encoders give them
                values[name] = _finite(name, value, signature.torch_dtype)
        _check_prompt(values, signature, settings, parts)
        for name in ("height", "width"):
            if values[name] < 16 or values[name] % 16:
                raise InputError(f"{name}: expected a positive multiple of 16, got {values[name]}")
        tokens = image_tokens(values["height"], values["width"])
        if tokens > settings.max_image_tokens:
            raise InputError(f"height x width: {values['height']}x{values['width']} is {tokens} image tokens, past "
                             f"this server's limit of {settings.max_image_tokens}")  # fmt: skip
        if not 1 <= values["num_inference_steps"] <= settings.max_steps:
            raise InputError(f"num_inference_steps: expected 1 to {settings.max_steps}, got "
                             f"{values['num_inference_steps']}")  # fmt: skip
        for name in ("guidance_scale", "true_cfg_scale"):
            if not math.isfinite(values[name]) or values[name] < 0:
                raise InputError(f"{name}: expected a finite value >= 0, got {values[name]}")
        if values["true_cfg_scale"] > 1 and values["negative_prompt_embeds"] is None and not values["negative_prompt"]:
            raise InputError("negative_prompt: true_cfg_scale > 1 needs a negative prompt or its embeddings")
        if IMAGES in outputs and parts.decode is None:
            raise InputError(f"{IMAGES}: this server has no VAE ({settings.vae_model} is not loaded); request "
                             f"{LATENTS}")  # fmt: skip
        images = parts.decode is not None and (not outputs or IMAGES in outputs)
        return cls(**values, cache=_cache(cache, settings), images=images)


def _scalar(name: str, tensor: torch.Tensor) -> float | int:
    if tensor.numel() != 1:
        raise InputError(f"{name}: expected one value, got shape {list(tensor.shape)}")
    value = tensor.reshape(()).item()
    return int(value) if not tensor.is_floating_point() else float(value)


def _finite(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy in ``dtype`` (the request's buffer goes with the request): the pipeline's latents take the prompt's
    dtype, so a bfloat16 transformer's generation runs in bfloat16 as a local pipeline's does."""
    tensor = tensor.to(dtype, copy=True)
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name}: contains NaN or Inf (as {str(dtype).removeprefix('torch.')})")
    return tensor


def _check_prompt(values: dict, signature: DitSignature, settings: GenerateSettings, parts: Parts) -> None:
    """A prompt as strings (with text encoders) or as embeddings, not both; a negative prompt the same way."""
    for text, embeds in (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds")):
        if values[text] is not None and values[embeds] is not None:
            raise InputError(f"{text} and {embeds}: send a prompt as strings or as embeddings, not both")
        if values[text] is not None and parts.encode is None:
            raise InputError(f"{text}: this server has no text encoders ({settings.text_encoder_model} is not "
                             f"loaded); send {embeds} and the pooled embeddings")  # fmt: skip
    if values["prompt"] is None and values["prompt_embeds"] is None:
        raise InputError("prompt_embeds: missing; a generation needs a prompt (strings, where the server has text "
                         "encoders) or its embeddings")  # fmt: skip
    batch = len(values["prompt"]) if values["prompt"] is not None else values["prompt_embeds"].shape[0]
    if values["negative_prompt"] is not None and len(values["negative_prompt"]) != batch:
        raise InputError(f"negative_prompt: {len(values['negative_prompt'])} strings for {batch} prompts")
    pairs = [("prompt_embeds", "pooled_prompt_embeds")] if values["prompt"] is None else []
    if values["negative_prompt_embeds"] is not None or values["negative_pooled_prompt_embeds"] is not None:
        pairs.append(("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
    for text_name, pooled_name in pairs:
        text, pooled = values[text_name], values[pooled_name]
        if text is None or pooled is None:
            raise InputError(f"{pooled_name if pooled is None else text_name}: missing; the negative prompt needs "
                             f"both its embeddings")  # fmt: skip
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != signature.text_dim:
            raise InputError(f"{text_name}: expected [{batch}, S, {signature.text_dim}], got {list(text.shape)}")
        if not 1 <= text.shape[1] <= settings.max_text_tokens:
            raise InputError(f"{text_name}: S={text.shape[1]}, expected 1 to {settings.max_text_tokens} text tokens")
        if list(pooled.shape) != [batch, signature.pooled_dim]:
            raise InputError(f"{pooled_name}: expected [{batch}, {signature.pooled_dim}], got {list(pooled.shape)}")


def _cache(parameter: str, settings: GenerateSettings) -> str:
    """The ``cache`` request parameter (a kind, or its JSON; "": none) as a sequence's START carries it, refused
    unless it is the served transformer's (``settings.cache``)."""
    if not parameter or parameter == "none":
        return ""
    try:
        config = build_cache(json.loads(parameter) if parameter.lstrip().startswith("{") else {"kind": parameter})
    except (ValueError, TypeError) as exc:
        raise InputError(f"cache: {exc}") from None
    spec = json.dumps(describe_cache(config)) if config is not None else ""
    return spec if caching.chosen(spec, parse_cache_setting(settings.cache)) else ""
