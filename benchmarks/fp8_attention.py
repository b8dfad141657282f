"""The attention kernel alone, FLUX's shapes: cuDNN's bf16 SDPA against FP8 cuDNN attention (``model.fp8_attention``).

Per shape (batch, tokens, heads, head_dim) and input case: CUDA-event time of one call (median, min, max over the
timed calls after warm-up), TFLOP/s from 4*b*h*s*s*d, and the rel. L2 error against fp32 attention (PyTorch's math
SDPA on the same bf16 inputs, upcast). Inputs are random bf16 q/k/v in diffusers' layout (batch, tokens, heads,
head_dim) seen as (batch, heads, tokens, head_dim), as the attention processors pass them; the ``outliers`` case
scales 4 of the 128 channels of q and k by 8, like the few large channels of real activations.

Paths: ``bf16-cudnn`` (``sdpa_kernel(CUDNN_ATTENTION)``, what ``_native_cudnn`` runs), ``fp8`` (``fp8_sdpa``
eager: q/k/v quantization, the cuDNN call and O's dequantization as separate kernels), ``fp8-compiled``
(``torch.compile(fp8_sdpa)``: the quantization fused, as in the compiled model), ``fp8-kernel`` (the cuDNN
call alone on q/k/v quantized beforehand).

    python3 benchmarks/fp8_attention.py [--iters 20] [--out fp8-attention.json]   # default $OUT/fp8-attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flux_triton.model.fp8_attention import (
    dequantize_output,
    fp8_sdpa,
    kernel_arguments,
    require_fp8_attention,
    require_frontend,
)
from flux_triton.pipeline.inputs import rel_l2

SHAPES = {  # (batch, tokens, heads, head_dim): image + 512 text tokens
    "1024x1024-b1": (1, 4608, 24, 128),
    "512x512-b1": (1, 1536, 24, 128),
    "512x512-b8": (8, 1536, 24, 128),
}
CASES = ("normal", "outliers")
OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 8.0


def make_inputs(shape, case: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator) for _ in range(3))
    if case == "outliers":
        for t in (q, k):
            t[..., :OUTLIER_CHANNELS] *= OUTLIER_SCALE
    return tuple(t.bfloat16().transpose(1, 2) for t in (q, k, v))


def bf16_cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def fp8_kernel_only(q, k, v):
    """The cuDNN call on inputs quantized once; returns a function of nothing and one that dequantizes its output."""
    arguments = kernel_arguments(q, k, v)

    def run(*_):
        return torch.ops.flux_triton.cudnn_sdpa_fp8(*arguments)

    return run, lambda out: dequantize_output(out, arguments)


def time_calls(fn, args, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    default_out = Path(os.environ["OUT"]) / "fp8-attention.json" if os.environ.get("OUT") else "fp8-attention.json"
    parser.add_argument("--out", type=Path, default=Path(default_out))
    args = parser.parse_args()

    require_fp8_attention("cuda")
    cudnn = require_frontend()
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torch_cudnn": torch.backends.cudnn.version(),
        "cudnn_frontend": cudnn.__version__,
        "frontend_cudnn": cudnn.backend_version_string(),  # the libcudnn the frontend loaded
        "rows": [],
    }
    compiled = torch.compile(fp8_sdpa, fullgraph=True, dynamic=False)
    for shape_name in args.shapes.split(","):
        batch, tokens, heads, head_dim = shape = SHAPES[shape_name]
        tflop = 4 * batch * heads * tokens * tokens * head_dim / 1e12
        for case in CASES:
            q, k, v = make_inputs(shape, case)
            with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
                reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            kernel, dequantize = fp8_kernel_only(q, k, v)
            paths = {"bf16-cudnn": (bf16_cudnn, None), "fp8": (fp8_sdpa, None), "fp8-compiled": (compiled, None),
                     "fp8-kernel": (kernel, dequantize)}  # fmt: skip
            for path, (fn, finish) in paths.items():
                with torch.inference_mode():
                    out = fn(q, k, v)
                    error = rel_l2(finish(out) if finish else out, reference)
                    times = time_calls(fn, (q, k, v), args.warmup, args.iters)
                median = statistics.median(times)
                row = {"shape": shape_name, "dims": shape, "case": case, "path": path, "median_ms": median,
                       "min_ms": min(times), "max_ms": max(times), "tflops": tflop / (median / 1e3),
                       "rel_l2_vs_fp32": error}  # fmt: skip
                results["rows"].append(row)
                print(f"{shape_name:<13} {case:<9} {path:<13} {median:7.3f} ms  rel L2 {error:.2e}", flush=True)
            del reference
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['gpu']}, torch {results['torch']} (cuDNN {results['torch_cudnn']}), "
          f"cudnn-frontend {results['cudnn_frontend']} on cuDNN {results['frontend_cudnn']}")  # fmt: skip
    columns = ("median", "min", "max", "TFLOP/s", "relL2")
    print(f"{'shape':<13} {'case':<9} {'path':<13} " + " ".join(f"{c:>8}" for c in columns))
    for row in results["rows"]:
        print(
            f"{row['shape']:<13} {row['case']:<9} {row['path']:<13} {row['median_ms']:8.3f} {row['min_ms']:8.3f} "
            f"{row['max_ms']:8.3f} {row['tflops']:8.0f} {row['rel_l2_vs_fp32']:8.2e}"
        )


if __name__ == "__main__":
    main()
