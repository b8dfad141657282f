"""Every GPU path side by side, in one invocation on one GPU, on the full-size FLUX.1-dev
transformer with random weights (bf16, built on the GPU from its config: no download).

Per path and shape: step latency (CUDA events; median, min, max over the timed steps after
warm-up), effective TFLOP/s from the analytic FLOP count, peak GPU memory, time to ready; and
per path the relative L2 error of noise_pred (1024x1024, batch 1) and of the final latents of a
28-step dev-like loop against an fp32 reference of the same weights.

Paths: ``eager``, ``compile`` (whole model), ``regional`` (dit_transformer's bf16: cuDNN attention, regional
compile), ``fp8`` (+ FP8 block linears, per-token activation scales), ``fp8-static`` (static scales calibrated here
first, ``model.fp8_scales``), ``-fast`` (FP8 GEMMs with fast accumulation), ``fp8-attn`` (``fp8`` + FP8 cuDNN
attention, ``model.fp8_attention``), ``aoti``/``aoti-fp8`` (engines, each compiled once per run, or
taken from ``--engines``/``--engine-cache``; ``aoti-fp8`` with static scales and fast accumulation, as ``make engine``
builds it), ``-graphs`` (+ one CUDA graph per shape).

    python benchmarks/gpu_bench.py --out bench.json                  # every path, AOTI built here
    python benchmarks/gpu_bench.py --engines DIR --out bench.json    # AOTI engines of make engine in DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from flux_triton.engines import aoti, aoti_engine
from flux_triton.model import speedups
from flux_triton.model.fp8 import set_fp8_options
from flux_triton.model.fp8_attention_processor import use_diffusers_attention
from flux_triton.model.fp8_scales import Calibration, calibrate
from flux_triton.model.graphs import GraphedTransformer
from flux_triton.model.presets import FULL_SIZE_SHAPES, FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL, build_random
from flux_triton.model.presets import full_size_step as step_for
from flux_triton.pipeline import loop
from flux_triton.pipeline.call import reference_call, transformer_call
from flux_triton.pipeline.inputs import rel_l2


def forward_tflop(image_tokens: int, batch: int, text_tokens: int = FULL_SIZE_TEXT_TOKENS) -> float:
    """Analytic FLOPs of one forward: 57 blocks of linears and joint attention, plus the embedders."""
    d, tokens = 3072, image_tokens + text_tokens
    linears = 57 * 2 * tokens * d * 36864
    attention = 57 * 4 * tokens * tokens * d
    embed = 2 * image_tokens * 64 * d * 2 + 2 * text_tokens * 4096 * d
    return batch * (linears + attention + embed) / 1e12


def time_steps(fn, step, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn(step)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(step)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def fp32_reference(model, accuracy_step, loop_steps: int):
    """noise_pred and 28-step latents in fp32; bf16 -> fp32 -> bf16 round-trips exactly."""
    model.float()
    floats = ("hidden_states", "pooled_projections", "encoder_hidden_states")
    step32 = accuracy_step.replace(**{name: getattr(accuracy_step, name).float() for name in floats})
    with torch.inference_mode():
        noise = reference_call(model, step32)
        latents = None
        if loop_steps:
            latents = loop.denoise(partial(reference_call, model), loop.make_scheduler("dev"), step32, loop_steps)
    model.to(torch.bfloat16)
    torch.cuda.empty_cache()
    return noise, latents


def measure_path(name, fn, ready_s, args, accuracy_step, refs, results):
    entry = {"path": name, "ready_s": ready_s, "shapes": {}}
    with torch.inference_mode():
        noise = fn(accuracy_step)
        entry["noise_pred_rel_l2_vs_fp32"] = rel_l2(noise, refs[0])
        if args.loop_steps:
            latents = loop.denoise(fn, loop.make_scheduler("dev"), accuracy_step, args.loop_steps)
            entry["latents_rel_l2_vs_fp32"] = rel_l2(latents, refs[1])
        for shape in args.shapes.split(","):
            if name == "compile" and shape != "1024x1024-b1":
                continue  # whole-model compile recompiles per shape; the anchor shape is enough
            step = step_for(shape, seed=1)
            torch.cuda.reset_peak_memory_stats()
            times = time_steps(fn, step, args.warmup, args.iters)
            height, width, batch = FULL_SIZE_SHAPES[shape]
            median = statistics.median(times)
            entry["shapes"][shape] = {
                "median_ms": median,
                "min_ms": min(times),
                "max_ms": max(times),
                "tflops": forward_tflop(height * width // 256, batch) / (median / 1e3),
                "images_per_s": batch / (median / 1e3),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
            print(f"{name:<12} {shape:<14} {median:8.1f} ms (min {min(times):.1f}, max {max(times):.1f})", flush=True)
    results["paths"].append(entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="eager,compile,regional,regional-graphs,aoti,aoti-graphs,fp8,fp8-graphs,"
                        "fp8-static,fp8-static-graphs,fp8-fast-graphs,fp8-static-fast-graphs,"
                        "fp8-attn-static-fast-graphs,aoti-fp8,aoti-fp8-graphs")  # fmt: skip
    parser.add_argument("--shapes", default=",".join(FULL_SIZE_SHAPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--loop-steps", type=int, default=28)
    parser.add_argument("--engines", type=Path, default=None, help="prebuilt AOTI engines of make engine "
                        f"(MODEL={RANDOM_MODEL}, --max-batch 8); default: build them here")  # fmt: skip
    parser.add_argument("--engine-cache", type=Path, default=None, help="without --engines: where the AOTI "
                        "engines compiled here go, where a later run finds them (default: a new folder)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    args = parser.parse_args()
    args.engine_cache = args.engine_cache or Path(tempfile.mkdtemp(prefix="gpu-bench-engines-"))

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "paths": []}
    started = time.perf_counter()
    model = build_random()
    build_s = time.perf_counter() - started
    results["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    accuracy_step = step_for("1024x1024-b1")
    refs = fp32_reference(model, accuracy_step, args.loop_steps)
    # calibrated on the bf16 model, before the FP8 paths (aoti-fp8 is built with static scales, as make engine's)
    if any("-static" in name or name.startswith("aoti-fp8") for name in args.paths.split(",")):
        started = time.perf_counter()
        results["fp8_scales"] = {name: scale.item() for name, scale in calibrate(model, Calibration()).items()}
        results["calibration_s"] = time.perf_counter() - started

    for name in args.paths.split(","):
        torch._dynamo.reset()
        started = time.perf_counter()
        fn, started = prepare_path(name, model, args, results, started)
        with torch.inference_mode():
            fn(accuracy_step)
        torch.cuda.synchronize()
        ready_s = time.perf_counter() - started + (build_s if name == "eager" else 0.0)
        measure_path(name, fn, ready_s, args, accuracy_step, refs, results)
        args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def prepare_path(name: str, model, args, results: dict, started: float):
    """The step function of one path, and when its time to ready starts. Paths mutate the model
    in order: the bf16 ones first, then FP8 (which drops the bf16 block weights)."""
    cudnn = "_native_cudnn"
    call = partial(transformer_call, model)
    reset_blocks(model)
    if name == "eager":
        return call, started
    if name == "compile":
        return partial(transformer_call, torch.compile(model, fullgraph=True)), started
    aoti_fp8 = name.startswith("aoti-fp8")  # make engine's recipe: static scales, fast accumulation
    scales = results.get("fp8_scales") if "-static" in name or aoti_fp8 else None
    fast_accum = "-fast" in name or aoti_fp8
    set_fp8_options(model, scales, fast_accum)  # FP8 linears converted by an earlier path: this path's options
    if name.startswith(("regional", "fp8")):  # dit_transformer's: regional, fp8[-static][-fast], fp8-attn, ...-graphs
        fp8, attention = name.startswith("fp8"), "fp8_cudnn" if name.startswith("fp8-attn") else cudnn
        chosen = speedups.Speedups(attention, fp8=fp8, fp8_fast_accum=fast_accum, compile="regional",
                                   cuda_graphs=name.endswith("-graphs"))  # fmt: skip
        return partial(transformer_call, speedups.apply_speedups(model, chosen, fp8_scales=scales)), started
    kind = name.removesuffix("-graphs")
    if kind in ("aoti", "aoti-fp8"):
        chosen = aoti_engine.speedups_for(kind, model.device)
        speedups.apply_speedups(model, chosen, fp8_scales=scales)
        engine_dir, packages = aoti_engine.prebuilt_or_build(kind, model, args.engines, RANDOM_MODEL, args.engine_cache)
        started = time.perf_counter()  # ready = loading the prebuilt engine onto the loaded model
        aoti.attach(model, engine_dir, packages)
        return (partial(transformer_call, GraphedTransformer(model)) if kind != name else call), started
    raise ValueError(f"unknown path {name}")


def reset_blocks(model) -> None:
    """Undo an earlier path's regional compile, attached engine or FP8 attention (FP8 weights stay FP8)."""
    use_diffusers_attention(model)
    for blocks in (model.transformer_blocks, model.single_transformer_blocks):
        for block in blocks:
            block._compiled_call_impl = None
            block.__dict__.pop("forward", None)


def print_table(results: dict) -> None:
    print(f"\n{results['gpu']}, torch {results['torch']}, bf16 weights {results['weights_gib']:.1f} GiB")
    columns = ("median", "min", "max", "TFLOP/s", "img/s", "peak GiB", "ready s", "relL2 np", "relL2 lat")
    print(f"{'path':<10} {'shape':<14} " + " ".join(f"{c:>8}" for c in columns))
    for entry in results["paths"]:
        for shape, row in entry["shapes"].items():
            print(
                f"{entry['path']:<10} {shape:<14} {row['median_ms']:8.1f} {row['min_ms']:8.1f} {row['max_ms']:8.1f} "
                f"{row['tflops']:8.0f} {row['images_per_s']:7.2f} {row['peak_gib']:9.1f} {entry['ready_s']:8.1f} "
                f"{entry['noise_pred_rel_l2_vs_fp32']:9.2e} {entry.get('latents_rel_l2_vs_fp32', float('nan')):9.2e}"
            )


if __name__ == "__main__":
    main()
