"""``python -m flux_triton.client``: a whole FLUX denoising loop against the server.

``FluxPipeline`` runs the loop (scheduler, latents, true CFG, its progress bar) with the remote
transformer; prompt embeddings come from a safetensors file or are random for a smoke run. Writes
the final packed latents (safetensors) and, given a VAE folder, the decoded PNG. With ``--prompt``, the
whole generation is one request streamed from the server's ``flux_generate_stream`` (its text encoders and
VAE), with a progress bar from its per-step responses; writes the PNG (Ctrl-C cancels it on the server).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.transport import TRANSPORTS
from flux_triton.client.whole_generation import generate_images
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import CACHE_KINDS, parse_cache_setting
from flux_triton.pipeline.internals import unpack_latents

EMBED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = RemoteSettings()
    parser = argparse.ArgumentParser(prog="python -m flux_triton.client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=defaults.url, help="Triton HTTP endpoint, or several replicas' endpoints "
                        "separated by commas (default: %(default)s)")  # fmt: skip
    parser.add_argument("--resolve", action="store_true", help="every address the --url host name resolves to is a "
                        "replica (a Kubernetes headless Service); each generation stays on one")  # fmt: skip
    parser.add_argument("--grpc-url", default="", help="Triton gRPC endpoint, for --prompt (default: the --url host, "
                        "port 8001)")  # fmt: skip
    parser.add_argument("--model", default=defaults.model_name, help="served model (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=defaults.network_timeout_s, help="seconds per request")
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=defaults.transport,
        help="http, or shm: system shared memory for a server on this host (default: %(default)s)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeds", type=Path, help=f"safetensors with {', '.join(EMBED_KEYS)} (negatives optional)")
    source.add_argument("--random-embeds", action="store_true", help="random prompt embeddings (smoke run)")
    source.add_argument("--prompt", help="the prompt as text: the whole generation on the server, PNG out")
    parser.add_argument("--negative-prompt", default=None, help="with --prompt and --true-cfg")
    parser.add_argument("--text-tokens", type=int, default=256, help="text tokens of random embeddings")
    parser.add_argument("--steps", type=int, default=None, help="default: 28 (guidance model) or 4")
    parser.add_argument("--guidance", type=float, default=3.5, help="guidance scale (guidance models)")
    parser.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale (needs negative embeddings)")
    parser.add_argument("--scheduler", choices=sorted(loop.SCHEDULER_PRESETS), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--vae", type=Path, default=None, help="AutoencoderKL folder: also decode and write a PNG")
    kinds = ", ".join(CACHE_KINDS)
    parser.add_argument("--cache", default=None, help=f"step cache of the generation: {kinds} (the kind's defaults) "
                        "or its JSON, e.g. '{\"kind\": \"mag\", \"threshold\": 0.1}'; the server's dit_transformer "
                        "must have the same cache setting")  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("flux-latents.safetensors"))
    parser.add_argument("--png", type=Path, default=None, help="PNG path (default: --output with .png)")
    return parser.parse_args(argv)


def load_embeds(args: argparse.Namespace, remote: RemoteFluxTransformer) -> dict[str, torch.Tensor]:
    if args.embeds is not None:
        from safetensors.torch import load_file

        tensors = load_file(args.embeds)
        missing = [key for key in EMBED_KEYS[:2] if key not in tensors]
        if missing:
            raise SystemExit(f"{args.embeds}: missing {', '.join(missing)}")
        return {key: tensors[key] for key in EMBED_KEYS if key in tensors}
    generator = torch.Generator().manual_seed(args.seed + 1)
    sig = remote.signature
    embeds = {
        "prompt_embeds": torch.randn(1, args.text_tokens, sig.text_dim, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, sig.pooled_dim, generator=generator),
    }
    if args.true_cfg > 1:
        embeds["negative_prompt_embeds"] = torch.randn(1, args.text_tokens, sig.text_dim, generator=generator)
        embeds["negative_pooled_prompt_embeds"] = torch.randn(1, sig.pooled_dim, generator=generator)
    return {key: value.to(sig.torch_dtype) for key, value in embeds.items()}


def build_pipeline(remote: RemoteFluxTransformer, preset: str, vae_dir: Path | None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True) if vae_dir else None
    return loop.flux_pipeline(remote, preset, vae=vae)


def decode_png(pipe, latents: torch.Tensor, height: int, width: int, path: Path) -> None:
    """``FluxPipeline``'s own decode (0.42.1, lines 961-965) of the packed latents."""
    vae = pipe.vae
    latents = unpack_latents(pipe, latents, height, width)
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    images = pipe.image_processor.postprocess(image, output_type="pil")
    for index, picture in enumerate(images):
        picture.save(path if len(images) == 1 else path.with_stem(f"{path.stem}-{index}"))


def run_prompt(args: argparse.Namespace, settings: RemoteSettings) -> Path:
    """The whole generation in one streamed request; a progress bar from its per-step responses."""
    from tqdm.auto import tqdm

    steps = args.steps or 28
    png = args.png or args.output.with_suffix(".png")
    with tqdm(total=steps, unit="step", desc="flux_generate_stream") as bar:
        images = generate_images(args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                                 width=args.width, num_inference_steps=steps, guidance_scale=args.guidance,
                                 true_cfg_scale=args.true_cfg, seed=args.seed, cache=args.cache,
                                 progress=lambda done, total: bar.update(done - bar.n), settings=settings)  # fmt: skip
    png.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(png)
    tqdm.write(f"image {images[0].width}x{images[0].height} -> {png}")
    return png


def run(args: argparse.Namespace) -> Path:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    urls = tuple(url.strip() for url in args.url.split(",") if url.strip())
    settings = RemoteSettings(
        url=urls[0],
        grpc_url=args.grpc_url,
        urls=urls if len(urls) > 1 else (),
        resolve=args.resolve,
        model_name=args.model,
        network_timeout_s=args.timeout,
        transport=args.transport,
    )
    if args.prompt is not None:
        return run_prompt(args, settings)
    with RemoteFluxTransformer(settings) as remote:
        if args.cache:
            remote.enable_cache(parse_cache_setting(args.cache))
        guided = remote.config.guidance_embeds
        preset = args.scheduler or ("dev" if guided else "schnell")
        steps = args.steps or (28 if guided else 4)
        pipe = build_pipeline(remote, preset, args.vae)
        embeds = load_embeds(args, remote)
        tqdm.write(f"{remote!r}: {steps} steps, scheduler {preset}, {args.height}x{args.width}, batch {args.batch}")
        marks = [time.perf_counter()]

        def on_step(pipe, index, t, kwargs):
            marks.append(time.perf_counter())
            calls = remote.latencies_s[-(2 if args.true_cfg > 1 else 1) :]
            tqdm.write(
                f"step {index + 1:3d}/{steps} t={float(t):8.3f} step {1e3 * (marks[-1] - marks[-2]):8.1f} ms "
                f"(server calls {', '.join(f'{1e3 * c:.1f}' for c in calls)} ms)"
            )
            return kwargs

        with loop.one_intra_op_thread():  # the loop's host work is small; the VAE's decode below keeps every thread
            latents = pipe(
                **embeds,
                height=args.height,
                width=args.width,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                true_cfg_scale=args.true_cfg,
                num_images_per_prompt=args.batch,
                generator=torch.Generator().manual_seed(args.seed),
                output_type="latent",
                callback_on_step_end=on_step,
            ).images
        total = marks[-1] - marks[0]
        tqdm.write(f"{steps} steps in {total:.2f} s, {1e3 * total / steps:.1f} ms/step")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.contiguous()}, args.output)
        tqdm.write(f"latents {list(latents.shape)} -> {args.output}")
        if args.vae:
            png = args.png or args.output.with_suffix(".png")
            decode_png(pipe, latents, args.height, args.width, png)
            tqdm.write(f"image -> {png}")
    return args.output


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RemoteDitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
