"""The main job on the embedded default: start tritonserver, run a denoising loop through it,
print per-step latency and the parity against diffusers' FluxPipeline."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import tritonclient.http as httpclient

from client.wire import infer_step
from flux_triton import denoise, model_store, reference
from flux_triton.contract import DitSignature
from flux_triton.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="dit_transformer", help="Triton model to call (dit_transformer or flux_dit)")
    parser.add_argument("--model-dir", default=model_store.DEFAULT_MODEL, help="transformer under the model root")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--guidance-scale", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = model_store.model_root()
    model_dir = model_store.resolve_model_dir(args.model_dir, root)
    transformer = model_store.load_transformer(model_dir, torch.float32, "cpu")
    signature = DitSignature.from_config(transformer.config, torch.float32)
    preset = "dev" if signature.guidance_embeds else "schnell"
    first = reference.random_step(
        signature, height=args.height, width=args.width, guidance_scale=args.guidance_scale, seed=args.seed
    )

    log = Path(tempfile.mkdtemp(prefix="flux-triton-")) / "tritonserver.log"
    env = {model_store.MODEL_ROOT_ENV: str(root), model_store.MODEL_DIR_ENV: args.model_dir}
    started = time.perf_counter()
    with TritonServer(args.model_repository.resolve(), env=env, log_path=log, args=["--exit-timeout-secs=5"]) as server:
        print(f"tritonserver ready at {server.url} in {time.perf_counter() - started:.1f} s (log: {log})")
        with httpclient.InferenceServerClient(server.url) as client:
            latencies: list[float] = []

            def served_step(step: reference.PipelineStep) -> torch.Tensor:
                begin = time.perf_counter()
                noise_pred = infer_step(client, args.model, step.wire())
                latencies.append((time.perf_counter() - begin) * 1e3)
                print(f"step {len(latencies)}/{args.steps}  t={float(step.t):7.2f}  {latencies[-1]:6.2f} ms")
                return noise_pred

            served = denoise.denoise(served_step, denoise.make_scheduler(preset), first, args.steps)

    local = denoise.pipeline_latents(transformer, preset, first, args.steps, args.height, args.width)
    diff = (served - local).abs().max().item()
    print(f"model        {model_dir} via Triton model '{args.model}', {preset}-like schedule, {args.steps} steps")
    print(f"latents      {list(served.shape)} ({args.height}x{args.width} px)")
    print(
        f"step latency median {statistics.median(latencies):.2f} ms, min {min(latencies):.2f}, max {max(latencies):.2f}"
    )
    print(f"parity       max |served - FluxPipeline(output_type='latent')| = {diff:.3g} (bitwise: {diff == 0})")


if __name__ == "__main__":
    main()
