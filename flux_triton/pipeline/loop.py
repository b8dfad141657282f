"""The FLUX denoising loop around any transformer step function, as ``FluxPipeline`` runs it, and the
pipeline itself around a transformer (the parity reference for whole generations)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from flux_triton.contract import Step

# FlowMatchEulerDiscreteScheduler configs of the FLUX.1 releases.
SCHEDULER_PRESETS: dict[str, dict] = {
    "dev": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
}


def make_scheduler(preset: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_PRESETS[preset])


def timesteps_for(scheduler, num_steps: int, image_seq_len: int, device="cpu") -> torch.Tensor:
    """``FluxPipeline``'s timesteps: linear sigmas, shifted by ``mu`` from the image length."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)
    return timesteps


def denoise(
    step_fn: Callable[[Step], torch.Tensor],
    scheduler,
    first: Step,
    num_steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> torch.Tensor:
    """Run ``num_steps`` steps from ``first`` (its latents, embeddings and ids; its timestep is
    replaced by each scheduler timestep) and return the final packed latents."""
    step = first
    latents = first.hidden_states
    scheduler.set_begin_index(0)
    for index, t in enumerate(timesteps_for(scheduler, num_steps, latents.shape[1], latents.device)):
        step = step.replace(hidden_states=latents, timestep=t.expand(step.batch_size))
        noise_pred = step_fn(step)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step:
            on_step(index, float(t))
    return latents


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's CPU ops on one thread while inside. A pipeline on the host whose transformer runs elsewhere does small
    elementwise steps on the latents between server calls; waking torch's thread pool for each costs more than it
    saves, and its spinning threads compete with a server on the same host (``benchmarks/README.md``, run AZ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flux_pipeline(transformer, preset: str, vae=None):
    """diffusers' FluxPipeline around ``transformer``, without text encoders (callers pass prompt
    embeddings) and, unless given, without VAE (callers ask for ``output_type="latent"``)."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=make_scheduler(preset),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def pipeline_latents(transformer, preset: str, first: Step, num_steps: int, height: int, width: int):
    """Final packed latents of ``FluxPipeline(..., output_type="latent")`` from ``first``'s inputs."""
    guidance_scale = float(first.guidance[0]) if first.guidance is not None else 3.5
    pipe = flux_pipeline(transformer, preset)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=first.encoder_hidden_states,
        pooled_prompt_embeds=first.pooled_projections,
        latents=first.hidden_states,
        height=height,
        width=width,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        output_type="latent",
    ).images
