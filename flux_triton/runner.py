"""Runs validated steps through a FluxTransformer2DModel exactly as FluxPipeline calls it,
merging compatible requests into one forward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from flux_triton.validation import StepInputs

Item = TypeVar("Item")


def limit_cpu_threads(device: torch.device) -> None:
    """One intra-op thread for a model instance whose work runs on a GPU (its CPU work is kernel
    launches). With a pool per Python-backend stub, the stubs of one server slowed each other:
    ``flux_dit``'s engine step took 152 instead of 143 ms on an H100 (benchmarks/README.md)."""
    if device.type == "cuda":
        torch.set_num_threads(1)


def pipeline_call(transformer, step: StepInputs) -> torch.Tensor:
    """The transformer call of ``FluxPipeline.__call__`` (diffusers 0.42.1), byte for byte:
    the raw fp32 timestep is cast to the latents' dtype, then divided by 1000."""
    timestep = step.timestep.to(step.hidden_states.dtype)
    return transformer(
        hidden_states=step.hidden_states,
        timestep=timestep / 1000,
        guidance=step.guidance,
        pooled_projections=step.pooled_projections,
        encoder_hidden_states=step.encoder_hidden_states,
        txt_ids=step.txt_ids,
        img_ids=step.img_ids,
        joint_attention_kwargs={},
        return_dict=False,
    )[0]


def _mergeable(a: StepInputs, b: StepInputs) -> bool:
    return (
        a.hidden_states.shape[1:] == b.hidden_states.shape[1:]
        and a.encoder_hidden_states.shape[1:] == b.encoder_hidden_states.shape[1:]
        and (a.guidance is None) == (b.guidance is None)
        and torch.equal(a.img_ids, b.img_ids)
        and torch.equal(a.txt_ids, b.txt_ids)
    )


def merge(steps: Sequence[StepInputs]) -> StepInputs:
    if len(steps) == 1:
        return steps[0]
    first = steps[0]
    return StepInputs(
        hidden_states=torch.cat([s.hidden_states for s in steps]),
        timestep=torch.cat([s.timestep for s in steps]),
        guidance=None if first.guidance is None else torch.cat([s.guidance for s in steps]),
        pooled_projections=torch.cat([s.pooled_projections for s in steps]),
        encoder_hidden_states=torch.cat([s.encoder_hidden_states for s in steps]),
        txt_ids=first.txt_ids,
        img_ids=first.img_ids,
    )


@dataclass(frozen=True)
class Merging(Generic[Item]):
    """How requests of one kind share a forward: which may, how they combine, their batch sizes."""

    mergeable: Callable[[Item, Item], bool]
    merge: Callable[[Sequence[Item]], Item]
    batch_size: Callable[[Item], int]


STEP_MERGING = Merging(_mergeable, merge, lambda step: step.batch_size)


def group_mergeable(items: Sequence[Item], max_batch: int, merging: Merging = STEP_MERGING) -> list[list[int]]:
    """Indices of ``items`` in groups that can share one forward (same N, S and ids), in order,
    each group at most ``max_batch`` samples."""
    groups: list[list[int]] = []
    for index, item in enumerate(items):
        size = merging.batch_size(item)
        for group in groups:
            taken = sum(merging.batch_size(items[i]) for i in group)
            if merging.mergeable(items[group[0]], item) and taken + size <= max_batch:
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def run_merged(
    forward: Callable[[Item], torch.Tensor], items: Sequence[Item], max_batch: int, merging: Merging = STEP_MERGING
) -> list[torch.Tensor | Exception]:
    """One result per request, in order: ``noise_pred`` or the exception its forward raised.
    A failing forward fails only the requests merged into it."""
    results: list[torch.Tensor | Exception] = [None] * len(items)  # type: ignore[list-item]
    for group in group_mergeable(items, max_batch, merging):
        try:
            noise_pred = forward(merging.merge([items[i] for i in group]))
        except Exception as exc:
            for i in group:
                results[i] = exc
            continue
        sizes = [merging.batch_size(items[i]) for i in group]
        for i, part in zip(group, noise_pred.split(sizes), strict=True):
            results[i] = part
    return results
