"""How the context-parallel ranks of one ``dit_transformer`` instance meet and talk (``serving.ranks`` supervises
them): what every rank builds and where it joins the process group (``RankSpec``), the orders rank 0 sends down each
worker's stdin before a step or to forget a cache context, the step's tensors broadcast from rank 0's device, the
status lines a worker writes back, and leaving the group (aborting NCCL's communicators, which may never finish)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flux_triton.contract import Step
from flux_triton.model.parallel import ParallelSettings
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline.internals import (
    abort_process_groups,
    group_error,
    process_groups,
    set_group_timeout,
    wait_collective,
)


@dataclass(frozen=True)
class RankSpec:
    """What every rank builds (the same model, speed-ups and parallelism) and where they meet: a worker's argument."""

    model_dir: str
    dtype: str  # a torch dtype name
    speedups: Speedups
    parallel: ParallelSettings
    port: int  # rank 0's rendezvous port on loopback
    cache: str = "none"  # the model's step cache (pipeline.caching), which every rank applies alike

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        values = json.loads(text)
        return cls(
            **{**values, "speedups": Speedups(**values["speedups"]), "parallel": ParallelSettings(**values["parallel"])}
        )

    def join(self, rank: int) -> None:
        """Join the process group as ``rank`` (blocks until every rank has joined, ``timeout_s`` at most)."""
        backend, timeout_s = self.parallel.backend(), self.parallel.timeout_s
        if backend == "nccl":
            # NCCL's watchdog is the last resort, for a rank 0 whose host is blocked inside its forward, holding
            # the GIL (loading a kernel waits for the GPU, which waits on a collective a failed rank never joins):
            # it aborts the group's communicators, and does not end the process (rank 0 is Triton's stub), without
            # first waiting for debug dumps (by default 15 s or more). The ranks' own deadlines (``Ranks._wait``)
            # come first.
            os.environ.update(
                TORCH_NCCL_ASYNC_ERROR_HANDLING="2",
                TORCH_NCCL_DUMP_ON_TIMEOUT="0",
                TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC="100",
                TORCH_NCCL_ENABLE_MONITORING="0",
            )
            timeout_s = watchdog_timeout_s(self.parallel)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{self.port}",
            rank=rank,
            world_size=self.parallel.degree,
            timeout=timedelta(seconds=timeout_s),
        )


def watchdog_timeout_s(parallel: ParallelSettings) -> float:
    """After this a collective is NCCL's watchdog's to abort: well after the ranks' own deadline."""
    return 2 * parallel.timeout_s + 60


def watch_collectives(parallel: ParallelSettings) -> None:
    """Give every process group of this rank the watchdog's timeout, once the model is built: diffusers' device
    mesh makes its groups with NCCL's default of 10 minutes."""
    if dist.get_backend() == "nccl":
        for group in process_groups():
            set_group_timeout(group, watchdog_timeout_s(parallel))


def watchdog_aborted() -> str | None:
    """The first NCCL group whose watchdog found a collective failed or timed out (and aborted the group)."""
    for group in process_groups():
        error = group_error(group)
        if error is not None:
            return f"a collective of process group {group.group_name!r} failed ({error})"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Order:
    """What rank 0 tells a worker next: a step to run in a cache context (``None``: a fresh one, dropped after), or a
    cache context to forget (its sequence ended)."""

    step: Step | None = None
    context: str | None = None
    forget: str | None = None


def tell(workers: list[subprocess.Popen], order: dict) -> None:
    line = json.dumps(order).encode() + b"\n"
    for worker in workers:
        worker.stdin.write(line)
        worker.stdin.flush()


def send_step(step: Step, workers: list[subprocess.Popen], context: str | None = None) -> None:
    """Rank 0: the step's tensors to every rank. Their names, shapes and dtypes go down each worker's pipe (a line
    of JSON, with the step's cache context), so that no rank waits on the host for them; the tensors go by broadcast
    from rank 0's device."""
    tensors = step.tensors()
    header = {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in tensors.items()}
    tell(workers, {"tensors": header, "context": context})
    for tensor in tensors.values():
        dist.broadcast(tensor, src=0)


def receive_order(device: torch.device) -> Order | None:
    """Ranks 1..N-1: rank 0's next order; ``None`` at an empty line (stop) or when the pipe closes (rank 0 is gone).
    Idle ranks wait on the pipe, not inside a collective that would time out."""
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    if "forget" in order:
        return Order(forget=order["forget"])
    tensors = {
        name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        for name, (shape, dtype) in order["tensors"].items()
    }
    for tensor in tensors.values():
        dist.broadcast(tensor, src=0)
    return Order(Step(**{"guidance": None, **tensors}), order["context"])


def settled(output: torch.Tensor) -> torch.Tensor:
    """The forward's output once the collective that gathered it is done: functional collectives return before
    their data has arrived, and a tensor handed on without an op on it (DLPack to Triton) would be read too early."""
    return wait_collective(output)


READY = b"ready"  # a worker's status lines: this once its model is built, ``ERROR <text>`` when it fails
ERROR = b"error "


def report(fd: int, line: bytes) -> None:
    """A worker's status line to rank 0 (one ``write``: rank 0 never reads half of it; none if rank 0 is gone)."""
    with contextlib.suppress(OSError):
        os.write(fd, line.replace(b"\n", b" ") + b"\n")


def leave_process_group(timeout_s: float) -> bool:
    """Leave this process's process groups: NCCL's by aborting them (local, where destroying could wait on the other
    ranks), gloo's by destroying them (its failed collectives have returned with their error); ``False`` if the
    abort has not returned within ``timeout_s``."""
    if not dist.is_initialized():
        return True
    if dist.get_backend() == "nccl":
        return abort_within(timeout_s)
    dist.destroy_process_group()
    return True


_ABORTED_GROUPS: list = []  # kept for the life of the process: see abort_within


def abort_within(timeout_s: float) -> bool:
    """Abort every NCCL communicator of this process; ``False`` if that has not returned within ``timeout_s`` (the
    process's GPU work is then stuck, and only a new process serves again). The aborted groups stay referenced:
    their destructors would wait for watchdog threads that may be stuck with them."""
    _ABORTED_GROUPS.extend(process_groups())
    aborting = threading.Thread(target=abort_process_groups, daemon=True)
    aborting.start()
    aborting.join(timeout_s)
    return not aborting.is_alive()
