"""Where a context-parallel step's time goes, without Triton or the serving code's ranks: diffusers' own
``enable_parallelism`` in one process per GPU (``torchrun``), full-size FLUX.1-dev with random bf16 weights (the same
seed on every rank), cuDNN attention, 512 text tokens.

For each variant and shape: the step's GPU time (CUDA events on rank 0, every rank started together, median of
``--iters``) and the host's time to launch it (a step the host launches slower than the GPU runs is bound by the
host). First rank 0 alone (one GPU), then every rank in one step. Variants: ``dynamic`` (the served regional compile,
``model.speedups.compile_regions``: shape-generic kernels), ``static`` (diffusers' ``compile_repeated_blocks``,
kernels specialized to the shape) and ``graphs`` (``dynamic`` replayed as one CUDA graph per shape,
``model.graphs``). Last, a ``torch.profiler`` trace of one variant's first-shape step on each rank, its GPU time by
kernel kind.

    torchrun --nproc-per-node 2 benchmarks/cp_profile.py --out cp-profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from flux_triton.model.graphs import GraphedTransformer
from flux_triton.model.parallel import ParallelSettings, enable_context_parallel
from flux_triton.model.presets import build_random, full_size_step
from flux_triton.model.speedups import compile_regions
from flux_triton.pipeline.call import transformer_call

KERNEL_KINDS = {  # the first kind whose marker a kernel's name contains
    "collective": ("nccl",),
    "attention": ("fmha", "flash", "cudnn", "sdpa", "attention"),
    "gemm": ("gemm", "xmma", "cutlass", "nvjet", "sm90", "matmul"),
}


def compile_variant(model, variant: str):
    """The step's callable for ``variant``."""
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            block._compiled_call_impl = None
    torch._dynamo.reset()
    if variant == "static":
        model.compile_repeated_blocks(fullgraph=True)
        return model
    compile_regions(model)
    return GraphedTransformer(model) if variant == "graphs" else model


def time_step(call, step, warmup: int, iters: int, together: bool) -> dict:
    gpu, host = [], []
    with torch.inference_mode():
        for index in range(warmup + iters):
            if together:
                dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            launched = time.perf_counter()
            start.record()
            transformer_call(call, step)
            end.record()
            launch_ms = 1e3 * (time.perf_counter() - launched)
            end.synchronize()
            if index >= warmup:
                gpu.append(start.elapsed_time(end))
                host.append(launch_ms)
    return {"median_ms": statistics.median(gpu), "min_ms": min(gpu), "max_ms": max(gpu),
            "host_launch_ms": statistics.median(host)}  # fmt: skip


def kernel_kinds(call, step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(3):
                transformer_call(call, step)
            torch.cuda.synchronize()
    totals = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in trace.key_averages():
        if event.device_type.name != "CUDA":
            continue
        name = event.key.lower()
        kind = next((kind for kind, markers in KERNEL_KINDS.items() if any(m in name for m in markers)), "other")
        totals[kind] += event.self_device_time_total / 1e3 / 3  # µs over 3 steps -> ms per step
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--shapes", default="1024x1024-b1,512x512-b1")
    parser.add_argument("--variants", default="dynamic,static,graphs")
    parser.add_argument("--profile-variant", default="graphs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("cp-profile.json"))
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    torch._dynamo.config.automatic_dynamic_shapes = False  # static: one graph per shape, not a generic one
    dist.init_process_group("nccl")
    model = build_random(f"cuda:{rank}")
    model.set_attention_backend("_native_cudnn")
    steps = {shape: full_size_step(shape, seed=1) for shape in args.shapes.split(",")}
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "world": world, "rows": []}

    def measure(label: str, together: bool) -> None:
        for variant in args.variants.split(","):
            call = compile_variant(model, variant)
            for shape, step in steps.items():
                row = time_step(call, step, args.warmup, args.iters, together)
                results["rows"].append({"config": label, "variant": variant, "shape": shape, **row})
                if rank == 0:
                    print(f"{label:<12} {variant:<8} {shape:<14} {row['median_ms']:7.1f} ms "
                          f"(host {row['host_launch_ms']:.1f})", flush=True)  # fmt: skip

    if rank == 0:
        measure("one GPU", together=False)
    dist.barrier()
    enable_context_parallel(model, ParallelSettings(args.kind, world))
    measure(f"{args.kind}{world}", together=True)
    call = compile_variant(model, args.profile_variant)
    first = next(iter(steps.values()))
    time_step(call, first, 3, 1, together=True)
    kinds = [None] * world
    dist.all_gather_object(kinds, kernel_kinds(call, first))
    results["kernel_ms_per_step"] = kinds
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\n{results['gpu']} x{world}; GPU time per step (CUDA events), host launch time")
        print(f"{'config':<12} {'variant':<8} {'shape':<14} {'median':>8} {'min':>8} {'max':>8} {'host':>8}")
        for row in results["rows"]:
            print(f"{row['config']:<12} {row['variant']:<8} {row['shape']:<14} {row['median_ms']:8.1f} "
                  f"{row['min_ms']:8.1f} {row['max_ms']:8.1f} {row['host_launch_ms']:8.1f}")  # fmt: skip
        for index, totals in enumerate(kinds):
            print(f"rank {index} kernels per {next(iter(steps))} step (ms): "
                  + ", ".join(f"{kind} {ms:.1f}" for kind, ms in totals.items()))  # fmt: skip
    del call  # its captured graphs hold the communicator
    torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
