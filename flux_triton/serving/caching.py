"""diffusers' cache hooks inside ``dit_transformer``: each generation session caches in its own cache context
(``<sequence id>/<context>``), so generations never share state, and the state of a context is dropped when
its sequence ends. This module is what the project adds around the hooks; the caches themselves are diffusers'.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

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
