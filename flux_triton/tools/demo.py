"""The main job (``make run``): start tritonserver over the model repository and run the same
denoising loop through each public model, printing per-step latency and the parity against
diffusers' ``FluxPipeline``: ``dit_transformer`` (diffusers itself) must match bitwise, ``flux_dit``
(the ensemble around a compiled engine, built first if missing) within ``ENGINE_TOLERANCE``; then the same
generation in one request to ``flux_generate`` (the pipeline on the server), bitwise."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import tritonclient.http as httpclient

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature, Step
from flux_triton.deploy import health
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENSEMBLE, GENERATE
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model import store
from flux_triton.pipeline import inputs, loop
from flux_triton.serving.settings import MODEL_DIR_ENV

# An engine is another program than eager diffusers (its kernels, RoPE in float32): the loop's
# latents agree within this, as the engine parity tests require.
ENGINE_TOLERANCE = 1e-4


def run_loop(client, model: str, first: Step, preset: str, steps: int) -> tuple[torch.Tensor, list[float]]:
    latencies: list[float] = []

    def served_step(step: Step) -> torch.Tensor:
        begin = time.perf_counter()
        noise_pred = infer_step(client, model, step.wire())
        latencies.append((time.perf_counter() - begin) * 1e3)
        print(f"  step {len(latencies)}/{steps}  t={float(step.timestep[0]):7.2f}  {latencies[-1]:7.2f} ms")
        return noise_pred

    return loop.denoise(served_step, loop.make_scheduler(preset), first, steps), latencies


def run_generate(url: str, transformer, first: Step, preset: str, args) -> list[str]:
    """One request for the whole generation (seeded latents) against the local pipeline: ``[]`` if bitwise."""
    from flux_triton.client import RemoteSettings, generate

    prompt = {"prompt_embeds": first.encoder_hidden_states, "pooled_prompt_embeds": first.pooled_projections}
    options = dict(height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance_scale)  # fmt: skip
    pipe = loop.flux_pipeline(transformer, preset)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    expected = pipe(**prompt, **options, generator=generator, output_type="latent").images
    begin = time.perf_counter()
    served = generate(**prompt, **options, seed=args.seed, settings=RemoteSettings(url=url))
    diff = (served - expected).abs().max().item()
    print(f"{GENERATE}: one request, {args.steps} steps in {(time.perf_counter() - begin) * 1e3:.1f} ms")
    print(f"  parity  max |served - FluxPipeline(output_type='latent')| = {diff:.3g} (bitwise: {diff == 0})")
    return [] if diff == 0 else [GENERATE]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_triton demo", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=None, help="default: model_repository/")
    parser.add_argument("--models", default=f"{DIT_TRANSFORMER},{ENSEMBLE}", help="public models to run")
    parser.add_argument("--model-dir", default=store.DEFAULT_MODEL, help="transformer under the model root")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    locations = Locations.here()
    models = args.models.split(",")
    if ENSEMBLE in models:
        from flux_triton.deploy.commands import engine

        engine(["--model", args.model_dir, "--if-missing"])  # the default engine, and its repository

    model_dir = store.resolve_model_dir(args.model_dir, locations.model_root)
    transformer = store.load_transformer(model_dir, torch.float32, "cpu")
    signature = DitSignature.from_config(transformer.config, torch.float32)
    preset = "dev" if signature.guidance_embeds else "schnell"
    first = inputs.random_step(
        signature, height=args.height, width=args.width, guidance_scale=args.guidance_scale, seed=args.seed
    )
    expected = loop.pipeline_latents(transformer, preset, first, args.steps, args.height, args.width)

    log = Path(tempfile.mkdtemp(prefix="flux-triton-")) / "tritonserver.log"
    env = {MODEL_ROOT_ENV: str(locations.model_root), MODEL_DIR_ENV: args.model_dir}
    repository = (args.model_repository or locations.repository).resolve()
    started = time.perf_counter()
    failed = []
    with TritonServer(repository, env=env, log_path=log, args=["--exit-timeout-secs=5"]) as server:
        print(f"tritonserver ready at {server.url} in {time.perf_counter() - started:.1f} s (log: {log})")
        print(f"model {model_dir}, {preset}-like schedule, {args.steps} steps, {args.height}x{args.width} px")
        with httpclient.InferenceServerClient(server.url) as client:
            for model in models:
                print(f"{model}:")
                served, latencies = run_loop(client, model, first, preset, args.steps)
                diff = (served - expected).abs().max().item()
                bound, wanted = (0.0, "bitwise") if model == DIT_TRANSFORMER else (ENGINE_TOLERANCE, "<= 1e-4")
                print(
                    f"  latency median {statistics.median(latencies):.2f} ms, "
                    f"min {min(latencies):.2f}, max {max(latencies):.2f}"
                )
                verdict = f"{wanted}: {diff <= bound}"
                print(f"  parity  max |served - FluxPipeline(output_type='latent')| = {diff:.3g} ({verdict})")
                if diff > bound:
                    failed.append(model)
        if GENERATE in server.model_states():
            failed += run_generate(server.url, transformer, first, preset, args)
        unhealthy = {model: why for model, why in health.check(server.url, grpc_url=server.endpoints[1]).items() if why}
        print(f"health  {unhealthy or 'every model answered its probe'}")
        failed += list(unhealthy)
    if failed:
        sys.exit(f"parity or health failed for {', '.join(failed)}")
