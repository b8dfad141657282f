"""diffusers' cache hooks inside the served models (``dit_transformer``, and ``dit_engine`` on an AOTI engine): each
generation session caches in its own cache context (``<sequence id>``), so generations never share state, and the
state of a context is dropped when its sequence ends. Steps of contexts in lockstep may share one forward
(``Merged``): their states go side by side into one context and each gets its rows back. This module is what the
project adds around the hooks; the caches themselves are diffusers'.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from flux_triton.contract import InputError
from flux_triton.pipeline.caching import build_cache, describe_cache
from flux_triton.pipeline.internals import context_states, hook_state_managers
from flux_triton.serving.merging import Merging

_fresh = itertools.count()


def forget(transformer: torch.nn.Module, context: str) -> None:
    """Drop the cache state of ``context`` (diffusers resets only all contexts at once)."""
    for manager in hook_state_managers(transformer):
        state = context_states(manager).pop(context, None)
        if state is not None:
            state.reset()


def live_contexts(transformer: torch.nn.Module) -> set[str]:
    return {name for manager in hook_state_managers(transformer) for name in context_states(manager)}


@dataclass(frozen=True)
class Merged:
    """The steps of several cache contexts in lockstep, run as one forward: the contexts and their rows, in order."""

    contexts: tuple[str, ...]
    rows: tuple[int, ...]


@contextlib.contextmanager
def cache_context(transformer: torch.nn.Module, context: str | Merged | None) -> Iterator[None]:
    """Run in ``context``; ``None``: an uncached forward, run in a context used once and dropped (a cache's
    first call computes every block, as without the cache); ``Merged``: in one context holding the merged contexts'
    states side by side, each given its rows back afterwards."""
    name = context if isinstance(context, str) else f"{'merged' if context else 'uncached'}/{next(_fresh)}"
    try:
        if isinstance(context, Merged):
            _put(transformer, name, context)
        with transformer.cache_context(name):
            yield
    finally:
        if isinstance(context, Merged):
            _take(transformer, name, context)
        elif context is None:
            forget(transformer, name)


def _managers(transformer: torch.nn.Module) -> list:
    return list({id(manager): manager for manager in hook_state_managers(transformer)}.values())


def in_lockstep(transformer: torch.nn.Module, merged: Merged) -> bool:
    """Whether the contexts of ``merged`` would take the same cache decisions in one forward: every state they hold
    equal but for its tensors, which have their own rows (or none of them has a state yet)."""
    for manager in _managers(transformer):
        states = [context_states(manager).get(context) for context in merged.contexts]
        if all(state is None for state in states):
            continue
        if any(state is None for state in states):
            return False
        first = vars(states[0])
        for state, rows in zip(states, merged.rows, strict=True):
            for field, value in vars(state).items():
                tensors, reference = _tensors(value), first[field]
                if (tensors is None) != (_tensors(reference) is None):
                    return False
                if tensors is None and not bool(value == reference):
                    return False
                if tensors is not None and any(tensor.shape[0] != rows for tensor in tensors):
                    return False
    return True


def lockstep_merging(transformer: torch.nn.Module, steps: Merging, enabled: bool) -> Merging:
    """How steps that run in cache contexts share a forward, as ``(step, context)`` items: where ``enabled`` (the
    cache kind merges), steps that ``steps`` would merge and whose contexts are in lockstep, in one ``Merged``
    context; else each alone in its own."""

    def mergeable(a: tuple, b: tuple) -> bool:
        if not (enabled and steps.mergeable(a[0], b[0])):
            return False
        return in_lockstep(transformer, Merged((a[1], b[1]), (steps.batch_size(a[0]), steps.batch_size(b[0]))))

    def merge(items: list[tuple]) -> tuple:
        if len(items) == 1:
            return items[0]
        merged = Merged(tuple(context for _, context in items), tuple(steps.batch_size(step) for step, _ in items))
        return steps.merge([step for step, _ in items]), merged

    return Merging(mergeable, merge, lambda item: steps.batch_size(item[0]))


def _tensors(value) -> list[torch.Tensor] | None:
    """A state field's per-row tensors: a tensor, or a tuple or list of them; ``None`` for anything else (a
    number, a 0-dim tensor: MagCache's accumulators)."""
    items = value if isinstance(value, tuple | list) else [value]
    if items and all(isinstance(item, torch.Tensor) and item.ndim > 0 for item in items):
        return list(items)
    return None


def _put(transformer: torch.nn.Module, name: str, merged: Merged) -> None:
    """Each manager's state for ``name``: the merged contexts' tensors concatenated, their equal rest copied."""
    for manager in _managers(transformer):
        states = context_states(manager)
        parts = [states.get(context) for context in merged.contexts]
        if parts[0] is None:
            continue  # none has a state yet: the forward makes one, split afterwards
        state = copy.copy(parts[0])
        for field, value in vars(parts[0]).items():
            if _tensors(value) is not None:
                joined = [torch.cat(items) for items in zip(*(_tensors(getattr(p, field)) for p in parts), strict=True)]
                setattr(state, field, joined[0] if isinstance(value, torch.Tensor) else type(value)(joined))
        states[name] = state


def _take(transformer: torch.nn.Module, name: str, merged: Merged) -> None:
    """Each merged context's state back from ``name``'s: its rows of every tensor, a copy of the rest."""
    for manager in _managers(transformer):
        states = context_states(manager)
        state = states.pop(name, None)
        if state is None:
            continue
        for index, context in enumerate(merged.contexts):
            part = copy.copy(state)
            for field, value in vars(state).items():
                tensors = _tensors(value)
                if tensors is None:
                    setattr(part, field, copy.deepcopy(value))
                    continue
                rows = [tensor.split(merged.rows)[index] for tensor in tensors]
                setattr(part, field, rows[0] if isinstance(value, torch.Tensor) else type(value)(rows))
            states[context] = part


def chosen(parameter: str, served) -> bool:
    """Whether a sequence that starts with the ``cache`` request ``parameter`` (a plain spec as JSON; empty: none)
    caches, on a model that caches with ``served`` (a diffusers config, or ``None``); ``InputError`` for another."""
    try:
        wanted = build_cache(json.loads(parameter)) if parameter else None
    except (ValueError, TypeError) as exc:
        raise InputError(f"cache: {exc}") from None
    if wanted is None:
        return False
    if served is None or describe_cache(wanted) != describe_cache(served):
        described = json.dumps(describe_cache(served)) if served is not None else "none"
        raise InputError(f"cache: this model caches with {described}; start the sequence with that or without "
                         f"a cache, got {json.dumps(describe_cache(wanted))}")  # fmt: skip
    return True
