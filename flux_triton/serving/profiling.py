"""A served step model profiled in place, for finding where a request's time goes inside the server.

With ``FLUX_TRITON_PROFILE_DIR`` in the server's environment, each instance of ``dit_transformer``,
``dit_preprocess`` and ``dit_engine`` appends one JSON line per ``execute`` (the model, the instance's process, the
execute's number from 0, its requests and its wall time from the first input read to the last response built) to
``executes.jsonl`` in that folder, for its first ``MAX_LOGGED`` executes. The executes that
``FLUX_TRITON_PROFILE_TRACES`` names (``N``: the first N, default 8; ``A-B``: numbers A to B, e.g. a MagCache
generation's skipped steps) also run under ``torch.profiler`` (the host, and the GPU where the instance has one).
Each of those is written as a Chrome trace, ``<model>-<pid>-<n>.json``, which Perfetto opens; their lines carry
``"trace"`` and a wall time that includes the profiler's own cost.

Together with Triton's statistics (``/v2/models/stats``: each model's queue, input, compute and output time per
request), this separates our code's time from Triton's: the Python backend's copies, its IPC and the ensemble's
scheduling. While it is set, an execute on a GPU also waits for its GPU work before returning. Unset (the
default), an execute pays one attribute test. A folder that cannot be written is a warning, and the model serves
unprofiled. ``dit_transformer``'s warm-up before READY runs
in ``initialize`` and is not counted; the ``model_warmup`` requests of ``dit_engine``'s config are executes, so they
come first.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

PROFILE_DIR_ENV = "FLUX_TRITON_PROFILE_DIR"
PROFILE_TRACES_ENV = "FLUX_TRITON_PROFILE_TRACES"
DEFAULT_TRACES = 8
MAX_LOGGED = 10_000  # executes logged per instance: a long-running server's log stays bounded
LOG_NAME = "executes.jsonl"


def traced_executes(spec: str) -> range:
    """The execute numbers ``FLUX_TRITON_PROFILE_TRACES`` names: ``N`` (the first N) or ``A-B`` (A to B)."""
    first, dash, last = spec.partition("-")
    try:
        return range(int(first), int(last) + 1) if dash else range(int(first))
    except ValueError:
        raise ValueError(f"{PROFILE_TRACES_ENV}: expected N or A-B (execute numbers), got {spec!r}") from None


class ExecuteProfiler:
    """The profiling of one model instance's executes (nothing unless ``FLUX_TRITON_PROFILE_DIR`` is set)."""

    def __init__(self, model: str, device: torch.device):
        folder = os.environ.get(PROFILE_DIR_ENV)
        self.folder = Path(folder) if folder else None
        self.model, self.device = model, device
        self.traced = traced_executes(os.environ.get(PROFILE_TRACES_ENV) or str(DEFAULT_TRACES))
        self.count = 0
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._stop(exc)

    @contextlib.contextmanager
    def execute(self, requests: int) -> Iterator[None]:
        """Around one ``execute`` of ``requests`` requests."""
        if self.folder is None or self.count >= MAX_LOGGED:
            yield
            return
        index, self.count = self.count, self.count + 1
        traced = index in self.traced
        with self._profiler() if traced else contextlib.nullcontext() as profiler:
            started = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the wall time includes the GPU work the execute launched
            wall_ms = (time.perf_counter() - started) * 1e3
        line = {"model": self.model, "pid": os.getpid(), "execute": index, "requests": requests, "wall_ms": wall_ms}
        try:
            if traced:
                line["trace"] = f"{self.model}-{os.getpid()}-{index}.json"
                profiler.export_chrome_trace(str(self.folder / line["trace"]))
            with open(self.folder / LOG_NAME, "a") as log:  # one short write per line: instances append side by side
                log.write(json.dumps(line) + "\n")
        except OSError as exc:
            self._stop(exc)

    def _stop(self, exc: OSError) -> None:
        """A folder that cannot be written (or a full disk) stops the profiling with a warning; the model serves on."""
        warnings.warn(f"{PROFILE_DIR_ENV} {self.folder}: cannot be written ({exc}); {self.model} is not profiled",
                      stacklevel=3)  # fmt: skip
        self.folder = None

    def _profiler(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(activities=activities)
