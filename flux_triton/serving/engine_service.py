"""``dit_engine``'s serving core: each request checked against the engine side of the contract and the engine's
profile, run batched where shapes and ids agree, every answer checked finite (``merging.run_engine_requests``).

With a step cache (``cache``; an AOTI engine, which is diffusers' model with compiled blocks, so diffusers' hooks
wrap it; with ``cuda_graphs``, each block the hooks run is a graph replay): the ensemble hands ``dit_engine`` each
request's sequence id, flags and parameters, as it hands them to ``dit_preprocess``, which keeps the sessions and
checks the START's cache choice. A sequence that chose the cache at its START runs each step in its own cache context
(``<sequence id>``), merged with other sequences' steps in lockstep where the kind allows it (MagCache), else alone;
its state is dropped at END, when a step fails and once idle. Other steps still merge, each merged forward in a fresh
context (it computes every block, as without the cache).

With ``hold_prompts`` (one instance), each sequence's prompt is held here as ``dit_preprocess`` holds it
(``HeldPrompts``), and steps that come with zero text tokens get it filled in."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch

from flux_triton.contract import InputError
from flux_triton.contract.protocol import HELD_BY_ENGINE, SequenceStep, SessionSettings
from flux_triton.contract.validation import ENGINE
from flux_triton.pipeline.caching import cache_merges, parse_cache_setting
from flux_triton.serving import caching
from flux_triton.serving.merging import (
    ENGINE_MERGING,
    check_engine_requests,
    detached,
    finite_or_error,
    run_engine_requests,
    run_merged,
)
from flux_triton.serving.sessions import Sessions, closes_only
from flux_triton.serving.settings import EngineSettings

Request = tuple[Mapping[str, torch.Tensor], SequenceStep]


class CachedSequences:
    """The sequences this instance saw START, least recently used first: those that run with the step cache (at
    most ``max_sessions``, each reclaimed once idle for ``idle_timeout_s``: ``dit_preprocess``'s own bounds; it keeps
    the sessions) and those that chose none (as many, forgotten the same way). A later step of a sequence this
    instance does not know (reclaimed, or started before the instance was loaded again) is refused, never run
    without the cache state it chose."""

    def __init__(self, transformer, settings: SessionSettings):
        self.transformer, self.settings = transformer, settings
        self._used: OrderedDict[int | str, float] = OrderedDict()
        self._uncached: OrderedDict[int | str, float] = OrderedDict()
        self._reclaimed: OrderedDict[int | str, None] = OrderedDict()  # bounded: the ids a refusal names

    def context(self, sequence: SequenceStep, cached: bool) -> str | None:
        """The cache context of a step of ``sequence`` (``cached``: its START chose the cache); ``None``: none."""
        sequence_id, now = sequence.sequence_id, time.monotonic()
        if sequence.start:
            self.drop(sequence_id)  # a START starts clean
            self._reclaimed.pop(sequence_id, None)
            if not cached:
                for forgotten in _touch(self._uncached, sequence_id, now, self.settings.max_sessions):
                    del self._uncached[forgotten]
                return None
        elif sequence_id in self._uncached:
            _touch(self._uncached, sequence_id, now, self.settings.max_sessions)
            return None
        elif sequence_id not in self._used:
            # "unknown or expired", as a lost session: a client then starts the sequence again from this step
            if sequence_id in self._reclaimed:
                why = f"reclaimed: idle, or past {self.settings.max_sessions} cached sequences"
            else:
                why = "this instance has not seen its START: the model was loaded again since, or it went elsewhere"
            raise InputError(f"sequence {sequence_id}: its step cache state is unknown or expired ({why}); START it "
                             f"again")  # fmt: skip
        for reclaimed in _touch(self._used, sequence_id, now, self.settings.max_sessions):
            self._reclaim(reclaimed)
        return str(sequence_id)

    def drop(self, sequence_id: int | str) -> None:
        """Forget a sequence (its END, a failed step, a new START) and its cache state."""
        self._uncached.pop(sequence_id, None)
        if self._used.pop(sequence_id, None) is not None:
            caching.forget(self.transformer, str(sequence_id))

    def expire(self) -> None:
        now = time.monotonic()
        for sequence_id in [key for key, used in self._uncached.items() if now - used > self.settings.idle_timeout_s]:
            del self._uncached[sequence_id]
        for sequence_id in [key for key, used in self._used.items() if now - used > self.settings.idle_timeout_s]:
            self._reclaim(sequence_id)

    def _reclaim(self, sequence_id: int | str) -> None:
        self.drop(sequence_id)
        self._reclaimed[sequence_id] = None
        while len(self._reclaimed) > 4 * self.settings.max_sessions:
            self._reclaimed.popitem(last=False)


def _touch(used: OrderedDict, sequence_id: int | str, now: float, limit: int) -> list[int | str]:
    """Mark ``sequence_id`` used now, most recently; the least recently used ids past ``limit``, for the caller to
    forget."""
    used[sequence_id] = now
    used.move_to_end(sequence_id)
    return list(used)[: len(used) - limit] if len(used) > limit else []


class HeldPrompts(Sessions):
    """Each sequence's prompt, held on the engine's device: ``dit_preprocess`` passes it on with the sequence's START
    and whenever the client sends it again, and with zero text tokens otherwise. The same sessions as
    ``dit_preprocess``'s (``serving.sessions``: owner keys, bounds, idle expiry), so that a sequence lost here
    (reclaimed, or the model loaded again) is refused as "unknown or expired", and the client starts it again."""

    def filled(self, tensors: Mapping[str, torch.Tensor], sequence: SequenceStep) -> Mapping[str, torch.Tensor]:
        """A sequence's step with its held prompt filled in (an END-only request frees it); ``InputError`` if none."""
        if closes_only(tensors, sequence):
            self.close(sequence)
            return tensors
        carried = {name: t for name, t in tensors.items() if name not in HELD_BY_ENGINE or t.shape[1]}
        return self.step_tensors(sequence, carried)


class EngineService:
    """The engine of one ``dit_engine`` instance, its signature and profile, and its cached sequences (with a
    ``cache``, ``engine`` is a runner whose ``transformer`` diffusers' hooks wrap: ``kinds.check_step_cache``)."""

    def __init__(self, settings: EngineSettings, sidecar, engine):
        self.sidecar, self.engine, self.cached = sidecar, engine, None
        self.prompts = HeldPrompts(settings.session_settings) if settings.hold_prompts else None
        self.cache = parse_cache_setting(settings.cache)
        self.merges_cached = cache_merges(self.cache)
        if self.cache is not None:
            engine.transformer.enable_cache(self.cache)
            self.cached = CachedSequences(engine.transformer, settings.session_settings)
            if settings.cuda_graphs:
                from flux_triton.model.graphs import graph_cached_regions

                graph_cached_regions(engine.transformer, engine.transformer.device)

    def run(self, requests: Sequence[Request]) -> list[torch.Tensor | Exception]:
        """One result per request, in order: ``noise_pred`` or the error of its request or forward."""
        if self.prompts is None:
            return self._run(requests)
        self.prompts.expire()
        results: list[torch.Tensor | Exception | None] = [None] * len(requests)
        filled = {}
        for position, (tensors, sequence) in enumerate(requests):
            try:
                if sequence.sequence_id:
                    tensors = self.prompts.filled(tensors, sequence)
            except InputError as exc:
                results[position] = detached(exc)
                continue
            filled[position] = (tensors, sequence)
        for position, result in zip(filled, self._run(list(filled.values())), strict=True):
            results[position] = result
        for (_, sequence), result in zip(requests, results, strict=True):
            if sequence.sequence_id:
                self.prompts.finish(sequence, failed=isinstance(result, Exception))
        return results  # type: ignore[return-value]

    def _run(self, requests: Sequence[Request]) -> list[torch.Tensor | Exception]:
        """``run``'s work once each step has its prompt."""
        signature, limits = self.sidecar.dit_signature, self.sidecar.limits
        if self.cached is None:
            return run_engine_requests(self.engine, [tensors for tensors, _ in requests], signature, limits)
        self.cached.expire()
        results: list[torch.Tensor | Exception] = [None] * len(requests)  # type: ignore[list-item]
        merged, contexts = [], {}
        for position, (tensors, sequence) in enumerate(requests):
            try:
                context = self._context(tensors, sequence)
            except InputError as exc:
                results[position] = detached(exc)
                continue
            if context is None:
                merged.append(position)
            else:
                contexts[position] = context
        self._run_cached(requests, contexts, results)
        if merged:
            with caching.cache_context(self.engine.transformer, None):
                answers = run_engine_requests(self.engine, [requests[i][0] for i in merged], signature, limits)
            for position, answer in zip(merged, answers, strict=True):
                results[position] = answer
        for (_, sequence), result in zip(requests, results, strict=True):
            if sequence.sequence_id and (sequence.end or isinstance(result, Exception)):
                self.cached.drop(sequence.sequence_id)
        return results

    def _run_cached(self, requests: Sequence[Request], contexts: dict[int, str], results: list) -> None:
        """The cached requests (``contexts``: position -> cache context) into ``results``: each valid one in its
        context, merged with others whose shapes and ids agree and whose contexts are in lockstep where the cache
        kind allows it (``caching.lockstep_merging``), else alone."""
        positions = list(contexts)
        checked, valid = check_engine_requests(
            [requests[p][0] for p in positions], self.sidecar.dit_signature, self.sidecar.limits
        )
        for index, answer in enumerate(checked):
            results[positions[index]] = answer
        runs = [positions[i] for i in valid]
        in_lockstep = caching.lockstep_merging(self.engine.transformer, ENGINE_MERGING, self.merges_cached)
        answers = run_merged(self._forward, [(requests[p][0], contexts[p]) for p in runs], sys.maxsize, in_lockstep)
        for position, answer in zip(runs, answers, strict=True):
            results[position] = finite_or_error(answer, requests[position][0], ENGINE)

    def _forward(self, item: tuple[Mapping[str, torch.Tensor], str | caching.Merged]) -> torch.Tensor:
        """One forward of (merged) engine tensors in their cache context."""
        tensors, context = item
        with caching.cache_context(self.engine.transformer, context):
            return self.engine(tensors)

    def _context(self, tensors: Mapping[str, torch.Tensor], sequence: SequenceStep) -> str | None:
        """The cache context of a request (``None``: uncached); an END-only request drops its sequence's."""
        if not sequence.sequence_id:
            return None
        if closes_only(tensors, sequence):
            self.cached.drop(sequence.sequence_id)
            return None
        return self.cached.context(sequence, sequence.start and caching.chosen(sequence.cache, self.cache))
