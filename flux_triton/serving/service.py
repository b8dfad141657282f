"""The serving core of ``dit_transformer``: settings, model loading and request execution on
torch tensors. The Triton model (``model_repository/dit_transformer/1/model.py``) only converts
tensors; the same object runs standalone."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from flux_triton.contract import DitSignature, InputError, Limits, Step, validate
from flux_triton.contract.protocol import STATELESS, SequenceStep
from flux_triton.model import store
from flux_triton.model.compile_cache import compile_key, use_compile_cache
from flux_triton.model.graphs import WARMUP_CALLS
from flux_triton.model.parallel import ParallelSettings, check_cache_decisions
from flux_triton.model.speedups import load_with_speedups
from flux_triton.pipeline.caching import cache_merges, parse_cache_setting
from flux_triton.pipeline.call import transformer_call
from flux_triton.pipeline.inputs import random_step
from flux_triton.serving import caching, faults
from flux_triton.serving.merging import STEP_MERGING, detached, finite_or_error, run_merged
from flux_triton.serving.rank_group import RankSpec, free_port
from flux_triton.serving.ranks import Ranks, RanksFailed
from flux_triton.serving.sessions import Sessions, closes_only, held_only
from flux_triton.serving.settings import TransformerSettings

Request = tuple[Mapping[str, torch.Tensor], SequenceStep]  # a request's tensors and its place in a sequence

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def model_dtype(settings: TransformerSettings, device: torch.device) -> torch.dtype:
    """The model's dtype: the ``dtype`` setting, or for ``auto`` bfloat16 on GPU and float32 on CPU."""
    return store.default_dtype(device) if settings.dtype == "auto" else _DTYPES[settings.dtype]


def pick_device(device_id: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", device_id or 0)
    return torch.device("cpu")


def signature_for(settings: TransformerSettings, model_root: Path, device: torch.device) -> tuple[Path, DitSignature]:
    """The model folder and its concrete contract, from config.json alone (no weights)."""
    model_dir = store.resolve_model_dir(settings.model_dir, model_root)
    config = store.read_config(model_dir)
    return model_dir, DitSignature.from_config(config, model_dtype(settings, device))


class ForwardOutOfMemory(RuntimeError):
    """A forward ran out of memory; its memory has been released and the model keeps serving."""


class DitService:
    def __init__(self, settings: TransformerSettings, model_root: Path, device: torch.device):
        parallel = settings.parallel_settings
        self.settings, self.ranks, self.ranks_lost = settings, None, None
        self.device = parallel.devices()[0] if parallel.enabled else device  # rank 0's, whatever Triton's kind
        self.model_dir, self.signature = signature_for(settings, model_root, self.device)
        self.cache = parse_cache_setting(settings.cache)
        self.merges_cached = cache_merges(self.cache) and not parallel.enabled  # the ranks run one context a step
        self.limits = Limits(settings.max_batch, settings.max_image_tokens, settings.max_text_tokens)
        self.compile_cache = None
        if settings.compile_cache_dir and settings.speedups.compile != "none":  # before any rank compiles
            key = compile_key(store.read_config(self.model_dir), self.signature.torch_dtype, settings.speedups,
                              self.device) | {"parallel": [parallel.kind, parallel.degree]}  # fmt: skip
            self.compile_cache = use_compile_cache(settings.compile_cache_dir, key)
        if parallel.enabled:
            self.ranks = self._ranks(parallel)
        try:
            self._bring_up()
        except BaseException:
            self.close()
            raise
        self.sessions = Sessions(settings.session_settings, on_free=self._forget if self.cache else None)

    def _forget(self, sequence_id: int | str) -> None:
        """Drop a freed sequence's cache state, on every rank."""
        if self.transformer is not None:
            caching.forget(self.transformer, str(sequence_id))
        if self.ranks is not None:
            self.ranks.forget(str(sequence_id))

    def _bring_up(self) -> None:
        """Start the other context-parallel ranks (if any), build this rank's transformer with its speed-ups,
        cache and parallelism, then wait until every rank has built its own."""
        if self.ranks is not None:
            self.ranks.start()
        settings = self.settings
        self.transformer = load_with_speedups(self.model_dir, self.signature.torch_dtype, self.device,
                                              settings.speedups, self.cache, settings.parallel_settings)  # fmt: skip
        if self.ranks is not None:
            self.ranks.wait_ready()

    def _ranks(self, parallel: ParallelSettings) -> Ranks:
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # the ranks share the host's cores
        dtype = str(self.signature.torch_dtype).removeprefix("torch.")
        return Ranks(RankSpec(str(self.model_dir), dtype, self.settings.speedups, parallel, free_port(),
                              self.settings.cache))  # fmt: skip

    def _parallel_forward(self, step: Step, context: str | None) -> torch.Tensor:
        """The step on every rank; after a fault on any rank, the ranks start again and build their models anew."""
        if self.transformer is None:
            raise RanksFailed(f"context-parallel ranks lost ({self.ranks_lost}); reload the model")
        try:
            return self.ranks.forward(lambda: self._checked_call(step), step, context)
        except RanksFailed as exc:
            failure = f"context-parallel step failed: {exc}"
        self.transformer = None  # the failed forward's model and memory go
        try:
            self.ranks.abort()  # first: a CUDA stream waiting on a collective is freed only by the abort
            self.ranks.drain(self.device)
            faults.release_after_oom(self.device)
            self._bring_up()
            self.sessions.drop(lambda session: session.cached)  # their cache state went with the old models
        except Exception as exc:
            self.transformer = None
            self.ranks_lost = f"recovering failed: {type(exc).__name__}: {exc}"
            raise RanksFailed(f"{failure}; the ranks are lost ({self.ranks_lost}); reload the model") from None
        raise RanksFailed(f"{failure}; the ranks were started again")

    def _checked_call(self, step: Step) -> torch.Tensor:
        """Rank 0's part of a context-parallel step; with a step cache, every rank ran the same blocks."""
        output = transformer_call(self.transformer, step)
        check_cache_decisions(self.transformer, self.device)
        return output

    def close(self) -> None:
        """Stop the context-parallel ranks (if any)."""
        if self.ranks is not None:
            self.transformer = None  # first: its captured CUDA graphs hold the ranks' communicator
            self.ranks.close()
            self.ranks = None

    def prepare(self, tensors: Mapping[str, torch.Tensor], sequence: SequenceStep = STATELESS,
                trusted: bool = False) -> Step | None:  # fmt: skip
        """Validate one request, moving its tensors to the model's device (``trusted``: its shapes, not its values);
        a step of a sequence (non-zero id) gets its held prompt, and at START chooses the step cache (the request's
        ``cache`` parameter: the model's cache, or none). ``None``: a request that only ends its sequence."""
        moved = {name: tensor.to(self.device, non_blocking=True) for name, tensor in tensors.items()}
        if not sequence.sequence_id:
            return validate(moved, self.signature, self.limits, checked=moved if trusted else ())
        if closes_only(moved, sequence):
            self.sessions.close(sequence)
            return None
        try:
            cached = sequence.start and caching.chosen(sequence.cache, self.cache)
            tensors = self.sessions.step_tensors(sequence, moved, cached)
            return validate(tensors, self.signature, self.limits, checked=tensors if trusted else held_only(moved))
        except InputError:
            self.sessions.finish(sequence, failed=True)
            raise

    @torch.inference_mode()
    def forward(self, step: Step, context: str | caching.Merged | None = None) -> torch.Tensor:
        """One forward; with a step cache on the model, in the cache ``context`` (``None``: uncached; ``Merged``:
        several contexts' steps side by side)."""
        budget = faults.forward_budget()
        before = faults.memory_in_use(self.device, budget)
        in_context = caching.cache_context(self.transformer, context) if self.cache else contextlib.nullcontext()
        try:
            with budget, in_context:
                if self.ranks is not None:
                    return self._parallel_forward(step, context)
                return transformer_call(self.transformer, step)
        except torch.OutOfMemoryError as exc:
            message = str(exc)
        # Out of the except block the error and its traceback, which holds the failed forward's
        # frames and so its activations, are gone: now the memory can really be released.
        faults.release_after_oom(self.device)
        held = max(0, faults.memory_in_use(self.device, budget) - before)
        raise ForwardOutOfMemory(
            f"{message}; the failed forward's memory was released ({held} bytes still held); "
            f"retry with fewer samples or image tokens"
        )

    def execute(self, steps: Sequence[Step], contexts: Sequence[str | None] = (),
                trusted: bool = False) -> list[torch.Tensor | Exception]:  # fmt: skip
        """One result per step: ``noise_pred`` (checked finite unless ``trusted``), or the error of its merged
        forward or of its answer. Steps without
        a cache context merge as their shapes allow; steps with one (``contexts``) run in their context, merged
        with others whose shapes agree and whose contexts are in lockstep where the cache kind allows it
        (``caching.in_lockstep``: MagCache, whose decisions follow the step count), else alone."""
        contexts = list(contexts) or [None] * len(steps)
        results: list[torch.Tensor | Exception] = [None] * len(steps)  # type: ignore[list-item]
        uncached = [i for i, context in enumerate(contexts) if context is None]
        cached = [i for i, context in enumerate(contexts) if context is not None]
        max_batch = self.settings.max_batch
        for i, result in zip(uncached, run_merged(self.forward, [steps[i] for i in uncached], max_batch), strict=True):
            results[i] = result
        items = [(steps[i], contexts[i]) for i in cached]
        in_lockstep = caching.lockstep_merging(self.transformer, STEP_MERGING, self.merges_cached)
        for i, result in zip(cached, run_merged(lambda item: self.forward(*item), items, max_batch, in_lockstep),
                             strict=True):  # fmt: skip
            results[i] = result
        if trusted:
            return results
        return [finite_or_error(result, step.tensors()) for result, step in zip(results, steps, strict=True)]

    def warm_up(self, shapes: Sequence[tuple[int, int, int, int]]) -> None:
        """Run each (height, width, batch, text tokens) shape's step as a request would, before the model reports
        ready: the compile, the CUDA graph capture (after ``graphs.WARMUP_CALLS`` ordinary steps) and the kernels'
        one-time costs are paid here, not by the first client. Raises naming the shape and the cause."""
        calls = WARMUP_CALLS + 1 if self.settings.speedups.cuda_graphs else 1
        for height, width, batch, text_tokens in shapes:
            step = random_step(self.signature, batch, height, width, text_tokens, timestep=500.0)
            try:
                for _ in range(calls):
                    (result,) = self.run([(step.wire(), STATELESS)])
                    if isinstance(result, Exception):
                        raise result
            except Exception as exc:
                raise RuntimeError(f"warm-up at {height}x{width}, batch {batch}, {text_tokens} text tokens failed: "
                                   f"{type(exc).__name__}: {exc}") from exc  # fmt: skip

    def run(self, requests: Sequence[Request], trusted: bool = False) -> list[torch.Tensor | Exception]:
        """Triton's batch of requests (``Request``): one result per request, in order
        (a request that only ends its sequence answers its empty latents); sequences are freed at END or error.
        ``trusted``: steps that diffusers' own loop made on this server from a checked request (``flux_generate`` in
        process); their values are not read back on the host, which then runs ahead of the GPU as with a local
        transformer (a generation checks its final latents instead)."""
        self.sessions.expire()  # also when only stateless requests come
        results: list[torch.Tensor | Exception] = [None] * len(requests)  # type: ignore[list-item]
        steps, contexts, positions = [], [], []
        for position, (tensors, sequence) in enumerate(requests):
            try:
                step = self.prepare(tensors, sequence, trusted)
            except InputError as exc:
                results[position] = detached(exc)
                continue
            if step is None:
                results[position] = tensors["hidden_states"]
                continue
            session = self.sessions.get(sequence.sequence_id) if sequence.sequence_id else None
            steps.append(step)
            contexts.append(str(sequence.sequence_id) if session is not None and session.cached else None)
            positions.append(position)
        for position, result in zip(positions, self.execute(steps, contexts, trusted), strict=True):
            results[position] = result
            sequence = requests[position][1]
            if sequence.sequence_id:
                self.sessions.finish(sequence, failed=isinstance(result, Exception))
        return results


def warm_service(settings: TransformerSettings, model_root: Path, device: torch.device, name: str, log) -> DitService:
    """A ``DitService`` that has run its warm-up shapes (``settings.warmup``) before its model reports READY; a
    failure closes it and raises naming the shape. ``log``: where the model's lines go, named ``name``."""
    service = DitService(settings, model_root, device)
    cache = service.compile_cache or "torch's default"
    log(f"{name}: {service.model_dir} on {service.device} as {service.signature.dtype}, "
        f"guidance_embeds={service.signature.guidance_embeds}, compile caches in {cache}")  # fmt: skip
    shapes = settings.warmup(service.device.type)
    started = time.perf_counter()
    try:
        service.warm_up(shapes)
    except Exception:
        service.close()
        raise
    if shapes:
        warmed = ", ".join(f"{h}x{w} b{b} ({t} text tokens)" for h, w, b, t in shapes)
        log(f"{name}: warmed up {warmed} in {time.perf_counter() - started:.1f} s")
    return service
