"""A context-parallel rank other than 0 (``serving.ranks``): ``python -m flux_triton.serving.worker RANK SPEC``.

It joins rank 0's process group, builds the same model as rank 0 (weights, speed-ups, ``enable_parallelism``),
then runs its part of every step rank 0 broadcasts until its stdin closes (rank 0 stops it, or is gone); on an error
it writes it where rank 0 reports it from, and exits."""

from __future__ import annotations

import os
import sys

import torch

from flux_triton.model.speedups import load_with_speedups
from flux_triton.pipeline.call import transformer_call
from flux_triton.serving import faults
from flux_triton.serving.ranks import RankSpec, leave_process_group, receive_step, settled, watch_collectives


def serve(rank: int, spec: RankSpec) -> None:
    device = spec.parallel.devices()[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # CPU ranks share the host with rank 0
    spec.join(rank)
    transformer = load_with_speedups(
        spec.model_dir, getattr(torch, spec.dtype), device, spec.speedups, parallel=spec.parallel
    )  # as rank 0 builds its own (DitService)
    watch_collectives(spec.parallel)
    spec.ready_file(rank).touch()
    budget = spec.fault_forward_bytes if spec.fault_rank == rank else 0
    with torch.inference_mode():
        while (step := receive_step(device)) is not None:
            with faults.forward_budget(budget):
                settled(transformer_call(transformer, step))
    leave_process_group(spec.parallel.timeout_s)


def main() -> None:
    rank, spec = int(sys.argv[1]), RankSpec.from_json(sys.argv[2])
    try:
        serve(rank, spec)
    except BaseException as exc:
        partial = spec.error_file(rank).with_suffix(".partial")  # renamed whole: rank 0 never reads half of it
        partial.write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
        partial.replace(spec.error_file(rank))
        sys.stderr.write(f"context-parallel rank {rank}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        # its collectives that never found their peers end here, not in the driver's teardown of the process
        leave_process_group(spec.parallel.timeout_s)
        os._exit(3)


if __name__ == "__main__":
    main()
