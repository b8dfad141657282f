"""A served 28-step generation with each step cache (diffusers' hooks, per generation session): full-size
FLUX.1-dev with random bf16 weights, saved and loaded like real ones, 1024x1024, 512 text tokens, driven by
``FluxPipeline(output_type="latent")`` through ``RemoteFluxTransformer`` against a real tritonserver, one
server per cache setting (``dit_transformer``: cuDNN attention, regional compile under the cache hooks by
default, and optionally FP8).

Per cache: wall time per image (median of the timed generations), the steps that ran a full forward (served
step latency above half the median uncached step), and the final latents' rel. L2 against no cache.

    python3 benchmarks/cache_loop.py [--fp8] [--compile none] --out cache-loop.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, set_parameter
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.presets import FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL, random_model_root
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import CACHE_KINDS, NO_CACHE, build_cache
from flux_triton.pipeline.inputs import rel_l2


def write_repository(repository: Path, cache: str, fp8: bool, compile: str) -> None:
    shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    for key, value in {"model_dir": RANDOM_MODEL, "attention_backend": "_native_cudnn", "compile": compile,
                       "fp8": str(fp8).lower(), "cache": cache}.items():  # fmt: skip
        set_parameter(config, key, value)


def generation(remote, size: int, steps: int, prompt: dict, seed: int = 0) -> tuple[float, torch.Tensor, list]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline(loop.make_scheduler("dev"), None, None, None, None, None, remote)
    first = len(remote.latencies_s)
    started = time.perf_counter()
    latents = pipe(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                   generator=torch.Generator().manual_seed(seed), **prompt).images  # fmt: skip
    return time.perf_counter() - started, latents, remote.latencies_s[first:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", default=",".join([NO_CACHE, *CACHE_KINDS]),
                        help='comma-separated kinds, or a JSON list of kinds and {"kind": ...} objects')  # fmt: skip
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--compile", choices=["none", "regional"], default="regional")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=2, help="timed generations per cache, after one warm-up")
    parser.add_argument("--out", type=Path, default=Path("cache-loop.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cache-loop-"))
    models, _ = random_model_root(work)
    generator = torch.Generator().manual_seed(1)
    prompt = {"prompt_embeds": torch.randn(1, FULL_SIZE_TEXT_TOKENS, 4096, generator=generator).bfloat16(),
              "pooled_prompt_embeds": torch.randn(1, 768, generator=generator).bfloat16()}  # fmt: skip
    results = {"gpu": torch.cuda.get_device_name(), "size": args.size, "steps": args.steps, "fp8": args.fp8,
               "compile": args.compile, "rows": []}  # fmt: skip
    reference, uncached_step = None, None
    caches = json.loads(args.caches) if args.caches.startswith("[") else args.caches.split(",")
    for position, cache in enumerate(caches):
        spec = cache if isinstance(cache, dict) else {"kind": cache}
        label = cache if isinstance(cache, str) else " ".join(f"{k}={v}" for k, v in spec.items())
        setting = cache if isinstance(cache, str) else json.dumps(spec).replace('"', '\\"')  # a pbtxt string
        repository = work / f"repository-{position}"
        write_repository(repository, setting, args.fp8, args.compile)
        server = TritonServer(repository, env={MODEL_ROOT_ENV: str(models)}, log_path=work / f"{position}.log",
                              cache=work / "triton", args=["--exit-timeout-secs=5"])  # fmt: skip
        started = time.perf_counter()
        with server.start(timeout_s=900), RemoteFluxTransformer(url=server.url, network_timeout_s=900) as remote:
            ready_s = time.perf_counter() - started
            if build_cache(spec) is not None:
                remote.enable_cache(build_cache(spec))
            generation(remote, args.size, args.steps, prompt)  # warm-up: cuDNN plans, kernels
            runs = [generation(remote, args.size, args.steps, prompt) for _ in range(args.runs)]
        times = [wall for wall, _, _ in runs]
        latents, latencies = runs[-1][1], runs[-1][2]
        if spec["kind"] == NO_CACHE:
            reference, uncached_step = latents, statistics.median(latencies)
        full = sum(latency > 0.5 * uncached_step for latency in latencies) if uncached_step else None
        results["rows"].append({
            "cache": label, "ready_s": ready_s, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "full_forwards": full, "step_latencies_ms": [1e3 * t for t in latencies],
            "rel_l2_vs_none": rel_l2(latents, reference) if reference is not None else None,
        })  # fmt: skip
        args.out.write_text(json.dumps(results, indent=2))
    base = results["rows"][0]["median_s"]
    print(
        f"\n{results['gpu']}, {args.size}² b1, {args.steps} steps, fp8={args.fp8}, "
        f"compile={args.compile}, served over HTTP"
    )
    print(f"{'cache':<12} {'s/image':>8} {'min':>6} {'max':>6} {'speed-up':>8} {'full fwd':>8} {'rel L2':>9}")
    for row in results["rows"]:
        l2 = "" if row["rel_l2_vs_none"] is None else f"{row['rel_l2_vs_none']:.2e}"
        print(f"{row['cache']:<12.40} {row['median_s']:8.2f} {row['min_s']:6.2f} {row['max_s']:6.2f} "
              f"{base / row['median_s']:7.2f}x {row['full_forwards'] or '':>8} {l2:>9}")  # fmt: skip


if __name__ == "__main__":
    main()
