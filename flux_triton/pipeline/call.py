"""``FluxPipeline``'s transformer call (diffusers 0.42.1), the one way every piece calls the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flux_triton.contract import Step


def _call(transformer, step: Step, scaled_timestep: torch.Tensor) -> torch.Tensor:
    return transformer(
        hidden_states=step.hidden_states,
        timestep=scaled_timestep,
        guidance=step.guidance,
        pooled_projections=step.pooled_projections,
        encoder_hidden_states=step.encoder_hidden_states,
        txt_ids=step.txt_ids,
        img_ids=step.img_ids,
        joint_attention_kwargs={},
        return_dict=False,
    )[0]


def transformer_call(transformer, step: Step) -> torch.Tensor:
    """``noise_pred`` as the pipeline computes it: the raw fp32 timestep cast to the latents' dtype,
    then divided by 1000."""
    return _call(transformer, step, step.scaled_timestep(step.hidden_states.dtype))


def engine_call(transformer, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The same call from engine inputs (``Step.engine_tensors``: the timestep already scaled, batched ids)."""
    step = Step.from_wire(tensors)  # the engine's inputs have the request's layout
    return _call(transformer, step, step.timestep)


@torch.inference_mode()
def reference_call(transformer, step: Step) -> torch.Tensor:
    """The parity reference: diffusers' own call as the pipeline makes it, inside its "cond" cache context."""
    with transformer.cache_context("cond"):
        return transformer_call(transformer, step)
