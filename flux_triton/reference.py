"""Step inputs shaped exactly as FluxPipeline makes them, and diffusers' own transformer call.

Used by the standalone run, the tests and the benchmarks as the reference for parity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_triton.contract import DitSignature

VAE_SCALE_FACTOR = 8  # FLUX's VAE; also FluxPipeline's value when it has no VAE


def image_ids(height: int, width: int, device="cpu") -> torch.Tensor:
    """``img_ids [N, 3]`` for an image of ``height`` x ``width`` pixels, from FluxPipeline itself."""
    from diffusers import FluxPipeline

    latent_h = 2 * (height // (VAE_SCALE_FACTOR * 2))
    latent_w = 2 * (width // (VAE_SCALE_FACTOR * 2))
    return FluxPipeline._prepare_latent_image_ids(None, latent_h // 2, latent_w // 2, device, torch.float32)


def text_ids(text_tokens: int, device="cpu") -> torch.Tensor:
    return torch.zeros(text_tokens, 3, device=device, dtype=torch.float32)


@dataclass
class PipelineStep:
    """One transformer call's arguments as the pipeline holds them (2-D ids, scalar t)."""

    latents: torch.Tensor
    t: torch.Tensor  # 0-dim fp32, the scheduler's timestep
    guidance: torch.Tensor | None  # [B] fp32
    pooled_prompt_embeds: torch.Tensor
    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    latent_image_ids: torch.Tensor

    def wire(self) -> dict[str, torch.Tensor]:
        """The same step as Triton request tensors (every input with its batch dim)."""
        batch = self.latents.shape[0]
        tensors = {
            "hidden_states": self.latents,
            "timestep": self.t.expand(batch).reshape(batch, 1).float(),
            "pooled_projections": self.pooled_prompt_embeds,
            "encoder_hidden_states": self.prompt_embeds,
            "txt_ids": self.text_ids.expand(batch, -1, -1),
            "img_ids": self.latent_image_ids.expand(batch, -1, -1),
        }
        if self.guidance is not None:
            tensors["guidance"] = self.guidance.reshape(batch, 1)
        return {name: tensor.contiguous() for name, tensor in tensors.items()}


def random_step(
    signature: DitSignature,
    batch: int = 1,
    height: int = 64,
    width: int = 64,
    text_tokens: int = 8,
    timestep: float = 500.0,
    guidance_scale: float = 3.5,
    seed: int = 0,
    device="cpu",
) -> PipelineStep:
    generator = torch.Generator("cpu").manual_seed(seed)
    dtype = signature.torch_dtype
    ids = image_ids(height, width)
    latents = torch.randn(batch, ids.shape[0], signature.in_channels, generator=generator)
    pooled = torch.randn(batch, signature.pooled_dim, generator=generator)
    prompt = torch.randn(batch, text_tokens, signature.text_dim, generator=generator)
    guidance = torch.full([batch], guidance_scale, dtype=torch.float32) if signature.guidance_embeds else None
    return PipelineStep(
        latents=latents.to(device, dtype),
        t=torch.tensor(timestep, dtype=torch.float32, device=device),
        guidance=None if guidance is None else guidance.to(device),
        pooled_prompt_embeds=pooled.to(device, dtype),
        prompt_embeds=prompt.to(device, dtype),
        text_ids=text_ids(text_tokens, device),
        latent_image_ids=ids.to(device),
    )


@torch.inference_mode()
def diffusers_call(transformer, step: PipelineStep) -> torch.Tensor:
    """``noise_pred`` as ``FluxPipeline.__call__`` computes it (diffusers 0.42.1, the "cond" call)."""
    latents = step.latents
    timestep = step.t.expand(latents.shape[0]).to(latents.dtype)
    with transformer.cache_context("cond"):
        return transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=step.guidance,
            pooled_projections=step.pooled_prompt_embeds,
            encoder_hidden_states=step.prompt_embeds,
            txt_ids=step.text_ids,
            img_ids=step.latent_image_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
