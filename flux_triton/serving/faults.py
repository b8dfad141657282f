"""Fault injection and recovery for out-of-memory errors inside a forward.

``FLUX_DIT_FAULT_FORWARD_BYTES`` is a test-only switch, read from the environment of the process that runs the
forward (never a model setting): it gives every forward a memory budget, and the first op whose new tensors
take the forward's live tensor memory past it raises ``torch.OutOfMemoryError``, as the CUDA
caching allocator does when its pool runs out. The budget counts real allocations (the storages
that each aten op creates, freed when their tensors die), so a large batch runs out and a small
one does not. Leave it unset (0) in production: it slows every op down.

``release_after_oom`` is what the service does after any out-of-memory error, injected or real:
drop every reference to the failed forward's tensors and hand cached memory back.
"""

from __future__ import annotations

import gc
import itertools
import os
import weakref
from contextlib import AbstractContextManager, nullcontext

import torch

from flux_triton.pipeline.internals import dispatch_mode_base, flat_tensors, is_view

FAULT_FORWARD_BYTES_ENV = "FLUX_DIT_FAULT_FORWARD_BYTES"
FAULT_RANK_ENV = "FLUX_DIT_FAULT_RANK"  # with context parallelism: the rank whose forwards get the budget (default 0)


class ForwardMemoryBudget(dispatch_mode_base()):
    """Counts the bytes of live tensors that a forward allocated; raises OOM past ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.peak = 0
        self._live: dict[int, int] = {}
        self._keys = itertools.count()

    @property
    def live_bytes(self) -> int:
        return sum(self._live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in flat_tensors((args, kwargs)) if _dense(t)}
        for tensor in flat_tensors(out):
            if _dense(tensor) and not is_view(tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                key = next(self._keys)
                self._live[key] = tensor.untyped_storage().nbytes()
                weakref.finalize(tensor, self._live.pop, key, None)
        live = self.live_bytes
        self.peak = max(self.peak, live)
        if live > self.limit:
            raise torch.OutOfMemoryError(
                f"out of memory in {func}: the forward holds {live} bytes of tensors, over its "
                f"{self.limit}-byte budget (fault injection: {FAULT_FORWARD_BYTES_ENV})"
            )
        return out


def _dense(value) -> bool:
    """A plain tensor with its own storage (not a subclass, e.g. a collective's pending result)."""
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and value.device.type != "meta"
    )


def forward_budget(rank: int = 0) -> AbstractContextManager:
    """The fault-injection context for one forward on context-parallel ``rank`` (0 without parallelism): the
    budget of ``FLUX_DIT_FAULT_FORWARD_BYTES`` on the rank ``FLUX_DIT_FAULT_RANK`` names (default 0), else
    nothing."""
    limit = int(os.environ.get(FAULT_FORWARD_BYTES_ENV) or 0)
    chosen = int(os.environ.get(FAULT_RANK_ENV) or 0) == rank
    return ForwardMemoryBudget(limit) if limit > 0 and chosen else nullcontext()


def memory_in_use(device: torch.device, budget: AbstractContextManager | None = None) -> int:
    """Bytes held by tensors: the budget's count when injecting faults, else the CUDA allocator's."""
    if isinstance(budget, ForwardMemoryBudget):
        return budget.live_bytes
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return 0


def release_after_oom(device: torch.device) -> None:
    """Free what a failed forward left: reference cycles first, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
