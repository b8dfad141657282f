"""Concurrent generations: images per second with 1, 2, 4 and 8 generations at once, each a whole 28-step generation
in one ``flux_generate`` request, against the client-driven loop (``FluxPipeline`` with ``RemoteFluxTransformer``,
one pipeline per thread) on the same server in the same run. ``dit_transformer`` (full-size FLUX.1-dev, random bf16
weights; cuDNN attention, regional compile, CUDA graphs, optionally FP8 with static scales and fast accumulation)
merges the concurrent generations' steps in its dynamic batcher; ``flux_generate`` has one instance per concurrent
generation. With ``--cache mag`` every generation runs MagCache, whose steps of generations in lockstep still merge.

    python3 benchmarks/concurrency.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum \\
        --sizes 1024,512 --concurrency 1,2,4,8 --out concurrency.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import time
from pathlib import Path

import torch
from workload import prepare

from flux_triton.client import RemoteFluxTransformer, RemoteSettings, generate
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, GENERATE, set_parameter
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.presets import FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import CACHE_KINDS, NO_CACHE, build_cache


def write_repository(repository: Path, args, instances: int) -> None:
    speedups = Speedups(args.attention, fp8=args.fp8, fp8_scales=args.fp8_scales, fp8_fast_accum=args.fp8_fast_accum,
                        compile=args.compile, cuda_graphs=args.graphs)  # fmt: skip
    for name in (DIT_TRANSFORMER, GENERATE):
        shutil.copytree(Locations.here().repository / name, repository / name)
    transformer = repository / DIT_TRANSFORMER / "config.pbtxt"
    for key, value in {"model_dir": args.model, "cache": args.cache, **speedups.parameters()}.items():
        set_parameter(transformer, key, str(value))
    config = repository / GENERATE / "config.pbtxt"
    for key, value in {"model_dir": args.model, "cache": args.cache}.items():  # no text encoder or VAE model
        set_parameter(config, key, value)
    text = re.sub(r"instance_group \[[^\]]*\]", f"instance_group [ {{ kind: KIND_CPU, count: {instances} }} ]",
                  config.read_text())  # fmt: skip
    config.write_text(text)


def one_request(url: str, size: int, args, prompt: dict, seed: int) -> None:
    settings = RemoteSettings(url=url, network_timeout_s=900)
    generate(**prompt, height=size, width=size, num_inference_steps=args.steps, seed=seed,
             cache=build_cache({"kind": args.cache}), settings=settings)  # fmt: skip


def client_driven(remote: RemoteFluxTransformer, size: int, args, prompt: dict, seed: int) -> None:
    pipe = loop.flux_pipeline(remote, "dev")
    pipe.set_progress_bar_config(disable=True)
    pipe(**prompt, height=size, width=size, num_inference_steps=args.steps, guidance_scale=3.5, output_type="latent",
         generator=torch.Generator().manual_seed(seed))  # fmt: skip


def images_per_s(run, concurrency: int, rounds: int) -> dict:
    """``concurrency`` generations at once from a thread pool, ``rounds`` times after one warm-up round."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, range(concurrency)))
        started = time.perf_counter()
        list(pool.map(run, range(concurrency * rounds)))
        wall = time.perf_counter() - started
    return {"images": concurrency * rounds, "wall_s": wall, "images_per_s": concurrency * rounds / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,512")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each concurrency, after one")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--attention", default="_native_cudnn")
    parser.add_argument("--compile", default="regional", choices=["none", "regional"])
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--fp8-scales", default="")
    parser.add_argument("--fp8-fast-accum", action="store_true")
    parser.add_argument("--cache", default=NO_CACHE, choices=[NO_CACHE, *CACHE_KINDS], help="every generation's")
    parser.add_argument("--model", default=RANDOM_MODEL)
    parser.add_argument("--text-tokens", type=int, default=FULL_SIZE_TEXT_TOKENS)
    parser.add_argument("--out", type=Path, default=Path("concurrency.json"))
    args = parser.parse_args()
    work, models, prompt = prepare(args, "concurrency-", seed=2)
    levels = [int(level) for level in args.concurrency.split(",")]
    repository = work / "repository"
    write_repository(repository, args, max(levels))
    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": args.steps,
               "fp8": args.fp8, "graphs": args.graphs, "cache": args.cache, "rows": []}  # fmt: skip
    server = TritonServer(repository, env={MODEL_ROOT_ENV: str(models)}, log_path=work / "tritonserver.log",
                          cache=work / "triton", args=["--exit-timeout-secs=5"])  # fmt: skip
    with server.start(timeout_s=900), RemoteFluxTransformer(url=server.url, network_timeout_s=900) as remote:
        if args.cache != NO_CACHE:
            remote.enable_cache(build_cache({"kind": args.cache}))
        for size in [int(size) for size in args.sizes.split(",")]:
            modes = {"flux_generate": lambda i, s=size: one_request(server.url, s, args, prompt, i),
                     "client loop": lambda i, s=size: client_driven(remote, s, args, prompt, i)}  # fmt: skip
            for level in levels:
                for mode, run in modes.items():
                    row = {"size": size, "concurrency": level, "mode": mode, **images_per_s(run, level, args.rounds)}
                    results["rows"].append(row)
                    args.out.write_text(json.dumps(results, indent=2))
                    print(f"{size}² x{level} {mode:<14} {row['images_per_s']:.3f} img/s", flush=True)
    print(f"\n{results['gpu']}, {args.steps} steps, fp8={args.fp8}, graphs={args.graphs}, cache={args.cache}")
    print(f"{'size':>5} {'at once':>7} {'flux_generate img/s':>20} {'client loop img/s':>18} {'vs one':>7}")
    for size in sorted({row["size"] for row in results["rows"]}, reverse=True):
        served = {r["concurrency"]: r["images_per_s"] for r in results["rows"] if r["size"] == size
                  and r["mode"] == "flux_generate"}  # fmt: skip
        driven = {r["concurrency"]: r["images_per_s"] for r in results["rows"] if r["size"] == size
                  and r["mode"] == "client loop"}  # fmt: skip
        for level in levels:
            print(f"{size:>5} {level:>7} {served[level]:>20.3f} {driven[level]:>18.3f} "
                  f"{served[level] / served[levels[0]]:>6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
