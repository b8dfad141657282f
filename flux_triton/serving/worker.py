"""A context-parallel rank other than 0 (``serving.ranks``): ``python -m flux_triton.serving.worker RANK SPEC FD``.

It joins rank 0's process group, builds the same model as rank 0 (weights, speed-ups, ``enable_parallelism``),
says so on its status pipe (file descriptor FD), then runs its part of every step rank 0 broadcasts until its stdin
closes (rank 0 stops it, or is gone); on an error it reports it on the status pipe, and exits."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from flux_triton.model.parallel import check_cache_decisions
from flux_triton.model.speedups import load_with_speedups
from flux_triton.pipeline.caching import parse_cache_setting
from flux_triton.pipeline.call import transformer_call
from flux_triton.serving import caching, faults
from flux_triton.serving.rank_group import (
    ERROR,
    READY,
    RankSpec,
    leave_process_group,
    receive_order,
    report,
    settled,
    watch_collectives,
)


def serve(rank: int, spec: RankSpec, status: int) -> None:
    device = spec.parallel.devices()[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # CPU ranks share the host with rank 0
    spec.join(rank)
    cache = parse_cache_setting(spec.cache)
    transformer = load_with_speedups(
        spec.model_dir, getattr(torch, spec.dtype), device, spec.speedups, cache, spec.parallel
    )  # as rank 0 builds its own (DitService)
    watch_collectives(spec.parallel)
    report(status, READY)
    with torch.inference_mode():
        while (order := receive_order(device)) is not None:
            if order.forget is not None:
                caching.forget(transformer, order.forget)
                continue
            in_context = caching.cache_context(transformer, order.context) if cache else contextlib.nullcontext()
            with faults.forward_budget(rank), in_context:
                settled(transformer_call(transformer, order.step))
                check_cache_decisions(transformer, device)
    leave_process_group(spec.parallel.timeout_s)


def main() -> None:
    rank, spec, status = int(sys.argv[1]), RankSpec.from_json(sys.argv[2]), int(sys.argv[3])
    try:
        serve(rank, spec, status)
    except BaseException as exc:
        report(status, ERROR + f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        sys.stderr.write(f"context-parallel rank {rank}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        # its collectives that never found their peers end here, not in the driver's teardown of the process
        leave_process_group(spec.parallel.timeout_s)
        os._exit(3)


if __name__ == "__main__":
    main()
