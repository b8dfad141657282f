"""Requests that Triton's dynamic batcher lists together, merged into as few forwards as their shapes
allow and split back in order (Triton only lists the requests; concatenating them is the model's job),
each answer checked finite."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from flux_triton.contract import DitSignature, InputError, Limits, OutputError, Step, check_output
from flux_triton.contract.validation import ENGINE, PUBLIC, Side, check

Item = TypeVar("Item")


@dataclass(frozen=True)
class Merging(Generic[Item]):
    """How requests of one kind share a forward: which may, how they combine, their batch sizes."""

    mergeable: Callable[[Item, Item], bool]
    merge: Callable[[Sequence[Item]], Item]
    batch_size: Callable[[Item], int]


STEP_MERGING: Merging[Step] = Merging(Step.mergeable, Step.concat, lambda step: step.batch_size)


def detached(exc: Exception) -> Exception:
    """``exc`` without its traceback and the exceptions chained to it. An error kept as a request's result would
    otherwise keep the frames it passed through, and with them the request's tensors (in Triton's shared memory),
    alive in a reference cycle until a garbage collection: refused requests would hold their memory."""
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None
    return exc


def _tensors_mergeable(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    same_shapes = all(a[name].shape[1:] == b[name].shape[1:] and a[name].dtype == b[name].dtype for name in a)
    return same_shapes and all(torch.equal(a[name][0], b[name][0]) for name in ("txt_ids", "img_ids"))


# Engine inputs (``Step.engine_tensors``), as dit_engine receives them.
ENGINE_MERGING: Merging[Mapping[str, torch.Tensor]] = Merging(
    mergeable=_tensors_mergeable,
    merge=lambda requests: (
        requests[0] if len(requests) == 1 else {name: torch.cat([r[name] for r in requests]) for name in requests[0]}
    ),  # one request: as it is, not a copy
    batch_size=lambda tensors: tensors["hidden_states"].shape[0],
)


def group_mergeable(items: Sequence[Item], max_batch: int, merging: Merging = STEP_MERGING) -> list[list[int]]:
    """Indices of ``items`` in groups that can share one forward, in order, each at most ``max_batch`` samples."""
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
                results[i] = detached(exc)
            continue
        sizes = [merging.batch_size(items[i]) for i in group]
        for i, part in zip(group, noise_pred.split(sizes), strict=True):
            results[i] = part
    return results


def run_engine_batched(
    engine: Callable[[dict[str, torch.Tensor]], torch.Tensor], requests: Sequence[Mapping[str, torch.Tensor]]
) -> list[torch.Tensor | Exception]:
    """Engine requests of equal shapes and ids run as one batch (Triton already capped the total at the
    engine's ``max_batch_size``)."""
    return run_merged(engine, requests, max_batch=sys.maxsize, merging=ENGINE_MERGING)


def finite_or_error(
    result: torch.Tensor | Exception, tensors: Mapping[str, torch.Tensor], side: Side = PUBLIC
) -> torch.Tensor | Exception:
    """A request's result, or the ``OutputError`` naming its inputs where ``noise_pred`` is not finite."""
    if isinstance(result, Exception):
        return result
    try:
        return check_output(result, tensors, side)
    except OutputError as exc:
        return detached(exc)


def run_engine_requests(
    engine: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    requests: Sequence[Mapping[str, torch.Tensor]],
    signature: DitSignature,
    limits: Limits,
) -> list[torch.Tensor | Exception]:
    """dit_engine's work: each request checked against the engine side of the contract and the engine's
    profile (``InputError`` for a bad one), the valid ones run batched, every answer checked finite. A request of
    zero image tokens (an END-only request that dit_preprocess passes on) is answered empty, without a forward."""
    results, valid = check_engine_requests(requests, signature, limits)
    for index, result in zip(valid, run_engine_batched(engine, [requests[i] for i in valid]), strict=True):
        results[index] = finite_or_error(result, requests[index], ENGINE)
    return results


def check_engine_requests(
    requests: Sequence[Mapping[str, torch.Tensor]], signature: DitSignature, limits: Limits
) -> tuple[list[torch.Tensor | Exception | None], list[int]]:
    """Each request's answer where it needs no forward (an END-only request's empty latents, a bad request's
    ``InputError``), ``None`` elsewhere; and the indices of those that need one."""
    results: list[torch.Tensor | Exception | None] = [None] * len(requests)
    valid = []
    for index, tensors in enumerate(requests):
        latents = tensors.get("hidden_states")
        if latents is not None and latents.ndim == 3 and latents.shape[1] == 0:
            results[index] = latents
            continue
        try:
            check(tensors, signature, limits, ENGINE)
            valid.append(index)
        except InputError as exc:
            results[index] = detached(exc)
    return results, valid
