"""The context-parallel ranks of one ``dit_transformer`` instance (``parallel: ulysses|ring|usp``).

The instance is rank 0. It starts ranks 1..N-1 as worker processes (``python -m flux_triton.serving.worker``),
one per GPU, joined with it in one ``torch.distributed`` process group (NCCL between GPUs, gloo on a host without
them), and supervises them as an executor does: each worker's stdin carries a line before each step (its end: rank 0
is gone), and a status pipe back carries "ready" once its model is built and its error when it fails; that pipe reads
as closed the moment the worker dies, so rank 0 waits on it (``select``), never on a polled file. For each forward
rank 0 broadcasts the step's tensors from its device (no host round trip between GPUs), every rank runs diffusers'
context-parallel forward, and rank 0 answers with the gathered output.

One recovery path: a fault on any rank - a worker that fails (its error, an OOM included) or dies, a step not
finished within ``timeout_s`` (a rank hangs), an error of rank 0 or of a collective - fails the step in flight with
its cause; then the process group is aborted (its collectives may never finish), the workers are killed and new ones
started, and every rank builds its model again (``DitService``), so the model keeps serving. If that fails, every
later request fails fast with the reason until the model is reloaded (``serve``'s probes do that). Bound: a dead or
failing worker fails the step at once, a hung one after ``timeout_s``; over NCCL, when rank 0's own host is blocked
inside its forward and cannot look at the other ranks, NCCL's watchdog aborts the group after ``2 * timeout_s + 60``
s, and the step fails then. Workers end with the instance, and on their own when its pipe to them closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flux_triton.contract import Step
from flux_triton.serving.rank_group import (
    ERROR,
    READY,
    RankSpec,
    abort_within,
    free_port,
    leave_process_group,
    send_step,
    settled,
    tell,
    watch_collectives,
    watchdog_aborted,
    watchdog_timeout_s,
)

_POLL_S = 1e-4  # rank 0's wait for its forward: how often it looks at the other ranks meanwhile
READY_TIMEOUT_S = 1800.0  # how long the workers may take to build their models (weights read, speed-ups applied)


class RanksFailed(RuntimeError):
    """A context-parallel step failed on some rank."""


class WorkerStatus:
    """Rank 0's end of one worker's status pipe. The worker writes a line when its model is built and one when it
    fails; the pipe reads as closed once the worker is gone, however it ended, so a ``select`` on it wakes on either
    (no polling)."""

    def __init__(self, rank: int, process: subprocess.Popen, fd: int):
        self.rank, self.process, self.fd = rank, process, fd
        os.set_blocking(fd, False)
        self.ready, self.error, self.closed, self._partial = False, None, False, b""

    def read(self) -> None:
        """Take what the worker has written since."""
        while not self.closed:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.closed = True
                return
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                self.ready |= line == READY
                if line.startswith(ERROR):
                    self.error = line.removeprefix(ERROR).decode(errors="replace")

    def failure(self) -> str | None:
        """Why this worker is no longer a rank: its error, or its exit."""
        self.read()
        if self.error is not None:  # it may still be ending (aborting its NCCL communicator takes a while)
            return f"rank {self.rank} (pid {self.process.pid}) failed: {self.error}"
        code = self.process.poll()
        if code is not None or self.closed:
            return f"rank {self.rank} (pid {self.process.pid}) exited: status {self.process.wait(timeout=5)}"
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Ranks:
    """Rank 0's side: starts the workers, joins them, runs each forward on every rank, restarts them after a
    fault, stops them."""

    def __init__(self, spec: RankSpec):
        self.spec = spec
        self.workers: list[subprocess.Popen] = []
        self.status: list[WorkerStatus] = []

    def start(self) -> None:
        """Start ranks 1..N-1 and join them (each then builds the model, as rank 0 does next)."""
        package_parent = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
        }
        for rank in range(1, self.spec.parallel.degree):
            reader, writer = os.pipe()
            command = [python_executable(), "-m", "flux_triton.serving.worker", str(rank), self.spec.to_json(),
                       str(writer)]  # fmt: skip
            # stdin: a line before each step, an empty one to stop; its end: rank 0 is gone
            worker = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, pass_fds=(writer,))
            os.close(writer)
            self.workers.append(worker)
            self.status.append(WorkerStatus(rank, worker, reader))
        try:
            self.spec.join(0)
        except Exception:
            self._end(graceful=False)
            raise

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every worker has built its model (rank 0 has built its own): the first step's collectives then
        wait only on the step. Wakes when a worker reports or ends."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_workers()  # reads every status pipe
            waiting = [status for status in self.status if not status.ready]
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RanksFailed(
                    f"ranks {[s.rank for s in waiting]} did not build their models within {timeout_s:g} s"
                )
            select.select([status.fd for status in waiting], [], [], max(0.0, deadline - time.monotonic()))
        watch_collectives(self.spec.parallel)

    def forget(self, context: str) -> None:
        """Every worker drops the cache state of ``context`` (a worker that is gone has none)."""
        with contextlib.suppress(OSError):
            tell(self.workers, {"forget": context})

    def abort(self) -> None:
        """After a fault: kill the workers and abort the process group (its collectives may never finish); a new
        ``start`` then rendezvouses on a new port."""
        self._end(graceful=False)
        self.spec = dataclasses.replace(self.spec, port=free_port())

    def forward(self, run, step: Step, context: str | None = None) -> torch.Tensor:
        """``run()`` (rank 0's part of the forward of ``step``, in the cache ``context``) with every other rank
        running its part in the same context."""
        try:
            self._check_workers()
            send_step(step, self.workers, context)
            output = settled(run())
            self._wait(output)
        except RanksFailed:
            raise
        except Exception as exc:  # an error of rank 0 (an OOM mid-forward included) or of a collective
            raise RanksFailed(self._failure(f"rank 0: {type(exc).__name__}: {exc}")) from None
        return output

    def _wait(self, output: torch.Tensor) -> None:
        """Until rank 0's forward is done on its GPU, looking at the other ranks meanwhile (a rank that died
        leaves the collectives waiting forever); gloo's collectives return only when done."""
        if output.device.type == "cuda":
            self._until_gpu_done("the step did not finish", "a rank hangs", self._check_workers)
            # a fault while rank 0's host was blocked: its GPU work ended only when the watchdog aborted the group
            self._check_workers()
            reason = watchdog_aborted()
            if reason:
                raise RanksFailed(f"rank 0: {reason}, after {watchdog_timeout_s(self.spec.parallel):g} s")

    def drain(self, device: torch.device) -> None:
        """After ``abort``: until rank 0's GPU work queued before it has ended (its collectives aborted)."""
        if device.type == "cuda":
            self._until_gpu_done("rank 0's GPU work did not end", "after the process group was aborted")

    def _until_gpu_done(self, what: str, why: str, meanwhile=lambda: None) -> None:
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + self.spec.parallel.timeout_s
        while not done.query():
            meanwhile()
            if time.monotonic() > deadline:
                raise RanksFailed(f"{what} within {self.spec.parallel.timeout_s:g} s ({why})")
            time.sleep(_POLL_S)

    def _check_workers(self) -> None:
        reason = self._exited()
        if reason:
            raise RanksFailed(reason)

    def _exited(self) -> str | None:
        """The first worker that failed: it exited, or reported its error and is still ending."""
        return next((reason for status in self.status if (reason := status.failure())), None)

    def _failure(self, own: str) -> str:
        """The first cause of a failed step: a worker's error when one failed (the collective that failed on
        rank 0 is its consequence; its report may take a moment), else rank 0's own."""
        deadline = time.monotonic() + 2.0
        while (left := deadline - time.monotonic()) > 0:
            reason = self._exited()
            if reason:
                return reason
            select.select([status.fd for status in self.status if not status.closed], [], [], left)
        return own

    def _end(self, graceful: bool) -> None:
        timeout_s, left = self.spec.parallel.timeout_s, True
        if not graceful and dist.is_initialized() and dist.get_backend() == "nccl":
            # first, before a worker dies under it: NCCL collectives that may never finish hold the group, which is
            # aborted (destroying it would wait for them)
            left = abort_within(timeout_s)
        for worker in self.workers:
            if graceful:
                with contextlib.suppress(OSError):
                    worker.stdin.write(b"\n")  # stop
                    worker.stdin.close()
            elif worker.poll() is None:
                worker.kill()
        for worker in self.workers:
            try:
                worker.wait(timeout=30 if graceful else 5)
            except subprocess.TimeoutExpired:
                worker.kill()
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:  # stuck in the driver: serving goes on without it
                    sys.stderr.write(f"context-parallel worker {worker.pid} did not end after SIGKILL\n")
            with contextlib.suppress(OSError):
                worker.stdin.close()
        for status in self.status:
            status.close()
        self.workers, self.status = [], []
        if not (left and leave_process_group(timeout_s)):  # graceful: after the workers have left
            raise RanksFailed(f"aborting the NCCL process group did not end within {timeout_s:g} s")

    def close(self) -> None:
        """Stop the workers (their pipes closed: they leave their loop; killed if they do not) and leave the
        process group."""
        self._end(graceful=dist.is_initialized() and self._exited() is None)

    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]


def python_executable() -> str:
    """This process's Python (inside Triton's Python-backend stub, ``sys.executable`` is the stub)."""
    executable = Path(sys.executable)
    if executable.name.startswith("python"):
        return str(executable)
    candidate = Path(sys.exec_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(candidate if candidate.exists() else Path(sys.exec_prefix) / "bin" / "python3")
