"""diffusers' cache hooks inside the served models (``dit_transformer``, and ``dit_engine`` on an AOTI engine): each
generation session caches in its own cache context (``<sequence id>``), so generations never share state, and the
state of a context is dropped when its sequence ends. This module is what the project adds around the hooks; the
caches themselves are diffusers'.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator

import torch

from flux_triton.contract import InputError
from flux_triton.pipeline.caching import build_cache, describe_cache
from flux_triton.pipeline.internals import context_states, hook_state_managers

_fresh = itertools.count()


def forget(transformer: torch.nn.Module, context: str) -> None:
    """Drop the cache state of ``context`` (diffusers resets only all contexts at once)."""
    for manager in hook_state_managers(transformer):
        state = context_states(manager).pop(context, None)
        if state is not None:
            state.reset()


def live_contexts(transformer: torch.nn.Module) -> set[str]:
    return {name for manager in hook_state_managers(transformer) for name in context_states(manager)}


@contextlib.contextmanager
def cache_context(transformer: torch.nn.Module, context: str | None) -> Iterator[None]:
    """Run in ``context``; ``None``: an uncached forward, run in a context used once and dropped (a cache's
    first call computes every block, as without the cache)."""
    name = context or f"uncached/{next(_fresh)}"
    try:
        with transformer.cache_context(name):
            yield
    finally:
        if context is None:
            forget(transformer, name)


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
