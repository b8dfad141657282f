"""Where a step's GPU time goes: attention vs GEMMs vs the rest, from torch.profiler's kernel times, for
dit_transformer's bf16 and FP8 paths (per-token and static activation scales, fast accumulation, FP8 attention) on
the full-size model (random weights).

    python benchmarks/profile_step.py --out profile.json
    python benchmarks/profile_step.py --paths fp8-static-fast,fp8-attn-static-fast --out profile-fp8-attn.json
    python benchmarks/profile_step.py --paths fp8-static-fast,aoti-fp8,aoti-fp8-opt --out profile-aoti.json

The ``aoti-fp8`` paths compile the ``aoti-fp8`` engine's block packages here (static scales, fast accumulation):
over the default profile's batch and token ranges, and (``-opt``) for the profiled shape alone.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flux_triton.engines import aoti
from flux_triton.engines.aoti import AotiProfile
from flux_triton.engines.aoti_engine import fixed_text
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.model.fp8 import set_fp8_options
from flux_triton.model.fp8_scales import Calibration, calibrate
from flux_triton.model.presets import build_random, full_size_step
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline.call import transformer_call

CATEGORIES = {
    "attention": re.compile(r"flash|fmha|cudnn|attention|sdpa", re.IGNORECASE),
    "gemm": re.compile(r"gemm|xmma|cutlass|nvjet|sm90_|cublas|matmul|scaled_mm", re.IGNORECASE),
}


CUDNN = "_native_cudnn"
# name: (FP8 block linears, static activation scales, fast accumulation, attention backend); bf16 first, since FP8
# replaces the block weights
PATHS = {
    "bf16": (False, False, False, CUDNN),
    "fp8": (True, False, False, CUDNN),
    "fp8-static": (True, True, False, CUDNN),
    "fp8-static-fast": (True, True, True, CUDNN),
    "fp8-attn-static-fast": (True, True, True, "fp8_cudnn"),
}
AOTI_PATHS = ("aoti-fp8", "aoti-fp8-opt")  # after the regional ones: they replace the blocks' forwards


def category(kernel: str) -> str:
    """Inductor's own kernels (``triton_*``) are fusions of norms, RoPE, GELU, casts and FP8 scaling,
    even where their names mention the attention or scaled_mm they feed."""
    if kernel.startswith("triton_"):
        return "other"
    return next((name for name, pattern in CATEGORIES.items() if pattern.search(kernel)), "other")


def breakdown(fn, step, steps: int = 3) -> dict:
    for _ in range(3):
        fn(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(step)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us <= 0:
            continue
        kind = category(event.key)
        totals[kind] = totals.get(kind, 0.0) + device_us / 1e3 / steps
        kernels[event.key] = device_us / 1e3 / steps
    top = sorted(kernels.items(), key=lambda item: -item[1])
    return {"ms_per_step": totals, "total_ms": sum(totals.values()), "top_kernels_ms": dict(top)}


def aoti_profile(name: str, shape: str) -> AotiProfile:
    """The default engine profile, or (``-opt``) one fixed at the profiled shape (every dimension static)."""
    default = PROFILE_PRESETS["default"]
    if not name.endswith("-opt"):
        return AotiProfile.from_profile(fixed_text(default))
    size, batch = shape.split("-b")
    height, width = (int(side) for side in size.split("x"))
    fixed = replace(default, batch=(int(batch),) * 3, min_size=(height, width), opt_size=(height, width),
                    max_size=(height, width))  # fmt: skip
    return AotiProfile.from_profile(fixed_text(fixed))


def profile_aoti(model, name: str, scales: dict, step, shape: str) -> dict:
    """The ``aoti-fp8`` engine's blocks compiled for ``aoti_profile(name)`` and attached to ``model``; its step
    profiled, then the blocks' own forwards restored."""
    for block in model.modules():
        block._compiled_call_impl = None  # export the eager blocks, not an earlier path's regional compile
    set_fp8_options(model, scales, True)
    apply_speedups(model, Speedups(attention_backend=CUDNN, fp8=True, fp8_fast_accum=True), fp8_scales=scales)
    with tempfile.TemporaryDirectory() as folder:
        record = aoti.build(model, Path(folder), aoti_profile(name, shape))
        aoti.attach(model, Path(folder), record["packages"])
        row = breakdown(lambda s: transformer_call(model, s), step)
    aoti.detach(model)
    return {**row, "compile_s": record["compile_s"], "profile": record["profile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x1024-b1")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"in this order: {', '.join((*PATHS, *AOTI_PATHS))}")
    parser.add_argument("--out", type=Path, default=Path("profile.json"))
    args = parser.parse_args()
    model = build_random()
    step = full_size_step(args.shape)
    results = {"gpu": torch.cuda.get_device_name(), "shape": args.shape, "paths": {}}
    static = {name: scale.item() for name, scale in calibrate(model, Calibration()).items()}  # on bf16 weights
    with torch.inference_mode():
        for name in args.paths.split(","):
            if name in AOTI_PATHS:
                results["paths"][name] = profile_aoti(model, name, static, step, args.shape)
                continue
            fp8, static_scales, fast, attention = PATHS[name]
            scales = static if static_scales else None
            torch._dynamo.reset()
            set_fp8_options(model, scales, fast)
            speedups = Speedups(attention_backend=attention, fp8=fp8, fp8_fast_accum=fast, compile="regional")
            apply_speedups(model, speedups, fp8_scales=scales)
            results["paths"][name] = breakdown(lambda s: transformer_call(model, s), step)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['gpu']} {args.shape}: GPU kernel time per step (ms)")
    for name, row in results["paths"].items():
        parts = "  ".join(f"{kind} {ms:6.1f}" for kind, ms in sorted(row["ms_per_step"].items()))
        print(f"{name:<20} total {row['total_ms']:6.1f}  {parts}")
        for kernel, ms in list(row["top_kernels_ms"].items())[:8]:
            print(f"      {ms:6.2f} ms  {kernel[:110]}")


if __name__ == "__main__":
    main()
