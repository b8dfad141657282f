"""Steps shaped exactly as ``FluxPipeline`` makes them: ids from the pipeline itself, random latents
and embeddings, and mixed batches for load tests; the relative error used to compare results."""

from __future__ import annotations

import random

import torch

from flux_triton.contract import DitSignature, Step
from flux_triton.pipeline.internals import latent_image_ids

VAE_SCALE_FACTOR = 8  # FLUX's VAE; also FluxPipeline's value when it has no VAE


def image_tokens(height: int, width: int) -> int:
    """Packed latent tokens of a ``height`` x ``width`` image: 8x VAE, then 2x2 patches."""
    return (height // (VAE_SCALE_FACTOR * 2)) * (width // (VAE_SCALE_FACTOR * 2))


def image_ids(height: int, width: int, device="cpu") -> torch.Tensor:
    """``img_ids [N, 3]`` for an image of ``height`` x ``width`` pixels, from FluxPipeline itself."""
    latent_h = 2 * (height // (VAE_SCALE_FACTOR * 2))
    latent_w = 2 * (width // (VAE_SCALE_FACTOR * 2))
    return latent_image_ids(latent_h // 2, latent_w // 2, device, torch.float32)


def text_ids(text_tokens: int, device="cpu") -> torch.Tensor:
    return torch.zeros(text_tokens, 3, device=device, dtype=torch.float32)


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
) -> Step:
    """A pipeline-shaped step with random latents and embeddings (the same timestep for every sample)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    dtype = signature.torch_dtype
    ids = image_ids(height, width)
    latents = torch.randn(batch, ids.shape[0], signature.in_channels, generator=generator)
    pooled = torch.randn(batch, signature.pooled_dim, generator=generator)
    prompt = torch.randn(batch, text_tokens, signature.text_dim, generator=generator)
    guidance = torch.full([batch], guidance_scale, dtype=torch.float32) if signature.guidance_embeds else None
    return Step(
        hidden_states=latents.to(device, dtype),
        timestep=torch.full([batch], timestep, dtype=torch.float32, device=device),
        guidance=None if guidance is None else guidance.to(device),
        pooled_projections=pooled.to(device, dtype),
        encoder_hidden_states=prompt.to(device, dtype),
        txt_ids=text_ids(text_tokens, device),
        img_ids=ids.to(device),
    )


MIXED_SIZES = ((64, 64), (64, 96), (128, 64))
MIXED_TEXT_TOKENS = (8, 16)
MIXED_BATCHES = (1, 1, 2, 3)


def mixed_steps(signature: DitSignature, count: int, seed: int = 0) -> list[Step]:
    """``count`` distinct steps of mixed sizes, text lengths and batch sizes, each sample with its own
    timestep and guidance: a swapped or mixed-up answer cannot pass for the right one."""
    rng = random.Random(seed)
    steps = []
    for index in range(count):
        height, width = rng.choice(MIXED_SIZES)
        batch = rng.choice(MIXED_BATCHES)
        step = random_step(signature, batch, height, width, rng.choice(MIXED_TEXT_TOKENS), seed=seed + index).replace(
            timestep=torch.tensor([rng.uniform(0.0, 1000.0) for _ in range(batch)])
        )
        if signature.guidance_embeds:
            step = step.replace(guidance=torch.tensor([rng.uniform(1.0, 8.0) for _ in range(batch)]))
        steps.append(step)
    return steps


def rel_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in fp32."""
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()
