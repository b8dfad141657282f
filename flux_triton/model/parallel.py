"""Context parallelism for one step across several devices, as diffusers implements it
(``transformer.enable_parallelism(config=ContextParallelConfig(...))``): each rank holds the whole model and
a slice of the sequence; attention exchanges the slices (Ulysses: all-to-all of heads; ring: K/V passed round).

One table (``PARALLEL_KINDS``) names the kinds, with the ``ContextParallelConfig`` degrees each sets for N ranks."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from flux_triton.pipeline.internals import agree_first_block_decisions, hooked_block_forwards, one_accelerator

NO_PARALLEL = "none"
PARALLEL_KINDS = {
    "ulysses": lambda ranks: {"ulysses_degree": ranks},
    "ring": lambda ranks: {"ring_degree": ranks},
    # unified (xDiT's USP): Ulysses over pairs of ranks, ring across the pairs
    "usp": lambda ranks: {"ulysses_degree": 2, "ring_degree": ranks // 2},
}

# diffusers attention backends that cannot return the log-sum-exp by which ring attention merges its parts
NO_LSE_BACKENDS = ("native", "_native_npu")


@dataclass(frozen=True)
class ParallelSettings:
    kind: str = NO_PARALLEL  # none | ulysses | ring | usp
    degree: int = 1  # ranks (GPUs) per step
    timeout_s: float = 120.0  # a rank that does not finish its part of a step within this is lost

    def __post_init__(self):
        if self.kind != NO_PARALLEL and self.kind not in PARALLEL_KINDS:
            raise ValueError(f"parallel: expected none or one of {', '.join(PARALLEL_KINDS)}, got {self.kind!r}")
        if self.kind != NO_PARALLEL and self.degree < 2:
            raise ValueError(f"parallel_degree: {self.kind} needs at least 2 ranks, got {self.degree}")
        if self.kind == NO_PARALLEL and self.degree != 1:
            raise ValueError(f"parallel_degree {self.degree} needs parallel {', '.join(PARALLEL_KINDS)} (it is none)")
        if self.kind == "usp" and (self.degree < 4 or self.degree % 2):
            raise ValueError(f"parallel_degree: usp needs an even number of ranks, 4 or more, got {self.degree}")

    @classmethod
    def named(cls, text: str) -> ParallelSettings:
        """``none``, or a kind and its degree in one word: ``ulysses2``, ``ring4``, ``usp4``."""
        kind = text.rstrip("0123456789")
        return cls(kind, int(text[len(kind) :] or 1))

    @property
    def enabled(self) -> bool:
        return self.kind != NO_PARALLEL

    def degrees(self) -> dict[str, int]:
        """The ``ContextParallelConfig`` degrees of this kind and rank count."""
        return PARALLEL_KINDS[self.kind](self.degree)

    def check_attention(self, attention_backend: str) -> None:
        """Refuse an attention backend this kind cannot run with (at load, not at the first step)."""
        if self.degrees().get("ring_degree", 1) > 1 and attention_backend in NO_LSE_BACKENDS:
            raise ValueError(
                f"parallel {self.kind}: ring attention needs the log-sum-exp of each part, which attention_backend "
                f"{attention_backend} does not return; use _native_cudnn or _native_flash"
            )

    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    def devices(self) -> list[torch.device]:
        """Rank r runs on GPU r of the process's visible GPUs (diffusers places rank r there); without a GPU,
        every rank on the CPU (over gloo: for tests)."""
        check_degree(self.degree, torch.cuda.device_count() if torch.cuda.is_available() else None)
        if not torch.cuda.is_available():
            return [torch.device("cpu")] * self.degree
        return [torch.device("cuda", rank) for rank in range(self.degree)]


def check_degree(degree: int, gpus_present: int | None) -> None:
    """Refuse a degree above the GPUs present (``None``: a host without GPUs, whose ranks run on the CPU)."""
    if gpus_present is not None and degree > gpus_present:
        raise ValueError(
            f"parallel_degree {degree}: this host has {gpus_present} GPU{'s' if gpus_present != 1 else ''} visible "
            f"(CUDA_VISIBLE_DEVICES); one rank runs per GPU"
        )


def enable_context_parallel(transformer, settings: ParallelSettings) -> None:
    """diffusers' context parallelism on ``transformer`` (``torch.distributed`` is initialized, one process per
    rank, each with the whole model); rank 0 ends with the whole output."""
    from diffusers import ContextParallelConfig

    with one_accelerator():  # a host without GPUs: every rank on the CPU
        transformer.enable_parallelism(config=ContextParallelConfig(**settings.degrees()))


def agree_cache_decisions(transformer) -> None:
    """A step cache whose decision depends on the data (first-block caching: the head block's residual, which each
    rank holds a shard of) decides on all ranks' data together, so that every rank skips or computes alike; the
    schedule-based caches (MagCache, TaylorSeer) decide alike on every rank as they are."""
    import torch.distributed as dist

    agree_first_block_decisions(transformer, lambda sums: dist.all_reduce(sums))


class CacheDecisionsDiverged(RuntimeError):
    """The ranks' step caches ran different blocks in one step: their shards of the latents would disagree."""


class CachedBlocks:
    """Counts the forwards that a step cache let run on this rank (the hooked blocks' calls), so that after each step
    every rank can check that all ran the same: a rank whose cache state was lost or fell out of step would else
    answer its shard of the latents silently wrong. Installed last, around what the compile and the graphs made."""

    def __init__(self, transformer):
        self.count = 0
        for reference in hooked_block_forwards(transformer):
            reference.original_forward = functools.partial(self._run, reference.original_forward)

    def _run(self, forward, *args, **kwargs):
        self.count += 1
        return forward(*args, **kwargs)

    def check(self, device: torch.device, reduce_max) -> None:
        """``CacheDecisionsDiverged`` unless every rank ran as many cached forwards this step (``reduce_max``: an
        in-place all-reduce taking the maximum); the count starts again."""
        counts = torch.tensor([self.count, -self.count], dtype=torch.int64, device=device)
        self.count = 0
        reduce_max(counts)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise CacheDecisionsDiverged(f"the ranks' step caches decided differently: between {fewest} and {most} "
                                         f"cached blocks ran this step; the step is refused rather than answered "
                                         f"with latents that diverged")  # fmt: skip


def check_cache_decisions(transformer, device: torch.device) -> None:
    """After a step of a context-parallel model with a step cache (``count_cache_decisions``): every rank ran the
    same blocks, or ``CacheDecisionsDiverged`` on every rank."""
    blocks = getattr(transformer, "cached_blocks", None)
    if blocks is not None:
        import torch.distributed as dist

        blocks.check(device, lambda counts: dist.all_reduce(counts, op=dist.ReduceOp.MAX))


def count_cache_decisions(transformer) -> None:
    transformer.cached_blocks = CachedBlocks(transformer)
