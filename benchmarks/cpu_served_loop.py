"""What serving adds to each step of a whole generation, on the CPU: 28-step ``FluxPipeline`` generations through
``RemoteFluxTransformer`` (shared memory, sessions) against a real tritonserver's ``dit_transformer``, and the same
pipeline with the same model in process, alternately, without a cache and with MagCache. The model has FLUX.1-dev's
inputs and outputs and all 19 + 38 blocks, each thin (2 heads of 16): full steps cost tens of milliseconds here and
MagCache's skipped steps almost nothing, so a skipped step's served latency is nearly all serving overhead.

    python benchmarks/cpu_served_loop.py --out benchmarks/results/cpu-served-loop.json
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
from diffusers import FluxPipeline, FluxTransformer2DModel
from workload import THIN_BLOCKS, save_thin

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, set_parameter
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.presets import FULL_SIZE_TEXT_TOKENS
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import build_cache

MODEL = "flux-dev-thin-blocks"
CACHES = {"none": None, "mag": {"kind": "mag"}}


class StepTimes:
    """Each call's wall time of a local transformer (torch's module hooks around its forward)."""

    def __init__(self, model: torch.nn.Module):
        self.ms: list[float] = []
        self._started = 0.0
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)

    def _start(self, *_):
        self._started = time.perf_counter()

    def _stop(self, *_):
        self.ms.append((time.perf_counter() - self._started) * 1e3)


def generate(transformer, size: int, prompt: dict) -> torch.Tensor:
    pipe = FluxPipeline(loop.make_scheduler("dev"), None, None, None, None, None, transformer)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    return pipe(height=size, width=size, num_inference_steps=28, guidance_scale=3.5, generator=generator,
                output_type="latent", **prompt).images  # fmt: skip


def measure(local, remote, times: StepTimes, size: int, prompt: dict, runs: int) -> dict:
    """Served and in-process generations alternately, after one untimed each."""
    generate(remote, size, prompt), generate(local, size, prompt)
    served_s, local_s, served_steps, local_steps = [], [], [], []
    for _ in range(runs):
        times.ms.clear()
        started = time.perf_counter()
        expected = generate(local, size, prompt)
        local_s.append(time.perf_counter() - started)
        local_steps.append(list(times.ms))
        before = len(remote.latencies_s)
        started = time.perf_counter()
        served = generate(remote, size, prompt)
        served_s.append(time.perf_counter() - started)
        served_steps.append([s * 1e3 for s in remote.latencies_s[before:]])
        if not torch.equal(served, expected):
            raise AssertionError(f"served latents differ from in process: {(served - expected).abs().max():.3g}")
    full = max(local_steps[-1]) / 2  # a step under half the slowest ran no blocks
    skipped = {i for i, ms in enumerate(local_steps[-1]) if ms < full}

    def steps_of(were_skipped: bool) -> dict:
        def flat(runs):
            return [ms for run in runs for i, ms in enumerate(run) if (i in skipped) == were_skipped]

        return {"served": summary(flat(served_steps)), "in_process": summary(flat(local_steps))}

    return {
        "served_s": summary(served_s),
        "in_process_s": summary(local_s),
        "skipped_steps": len(skipped),
        "full_step_ms": steps_of(False),
        "skipped_step_ms": steps_of(True),
        "served_steps_ms": served_steps,
        "in_process_steps_ms": local_steps,
    }


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="timed generations per config, after an untimed one")
    parser.add_argument("--out", type=Path, default=Path("cpu-served-loop.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu-served-loop-"))
    root = work / "models"
    save_thin(root, MODEL, THIN_BLOCKS)
    repository = work / "model_repository"
    generator = torch.Generator().manual_seed(0)
    prompt = {
        "prompt_embeds": torch.randn(1, FULL_SIZE_TEXT_TOKENS, THIN_BLOCKS["joint_attention_dim"], generator=generator),
        "pooled_prompt_embeds": torch.randn(1, THIN_BLOCKS["pooled_projection_dim"], generator=generator),
    }
    results: dict = {"device": "cpu", "threads": torch.get_num_threads(), "size": args.size, "rows": {}}
    for name, cache in CACHES.items():
        shutil.rmtree(repository, ignore_errors=True)
        shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
        config = repository / DIT_TRANSFORMER / "config.pbtxt"
        set_parameter(config, "model_dir", MODEL)
        set_parameter(config, "cache", cache["kind"] if cache else "none")
        local = FluxTransformer2DModel.from_pretrained(root / MODEL).eval()
        times = StepTimes(local)
        server = TritonServer(repository, env={MODEL_ROOT_ENV: str(root)}, log_path=work / f"tritonserver-{name}.log",
                              cache=work / "triton", args=["--exit-timeout-secs=5"])  # fmt: skip
        with server, RemoteFluxTransformer(url=server.url, transport="shm") as remote:
            if cache:
                local.enable_cache(build_cache(cache))
                remote.enable_cache(build_cache(cache))
            results["rows"][name] = measure(local, remote, times, args.size, prompt, args.runs)
    args.out.write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_summary(results: dict) -> None:
    print(f"\ncpu ({results['threads']} threads), {results['size']}², 28 steps; median (min-max)")
    print(f"{'cache':<6} {'served s':>18} {'in process s':>18} {'full step served / local ms':>30} "
          f"{'skipped step served / local ms':>32}")  # fmt: skip
    for name, row in results["rows"].items():
        cells = [f"{row[key]['median']:.3f} ({row[key]['min']:.3f}-{row[key]['max']:.3f})" for key in ("served_s",
                 "in_process_s")]  # fmt: skip
        steps = []
        for key in ("full_step_ms", "skipped_step_ms"):
            served, local = row[key]["served"], row[key]["in_process"]
            steps.append(f"{served['median']:.1f} / {local['median']:.1f}" if served else "-")
        print(f"{name:<6} {cells[0]:>18} {cells[1]:>18} {steps[0]:>30} {steps[1]:>32}")


if __name__ == "__main__":
    main()
