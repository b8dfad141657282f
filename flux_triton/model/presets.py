"""Named transformer configurations: the embedded tiny models (written with ``save_pretrained`` and
loaded like real weights) and FLUX.1-dev's full-size architecture, built with random weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from flux_triton.contract import DitSignature, Step
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.pipeline.inputs import random_step

TINY_SEED = 0
RANDOM_MODEL = "flux-dev-random"  # the full-size random model's folder under a model root

# FLUX.1-dev's transformer config (schnell differs only by guidance_embeds=False).
FLUX_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
# diffusers' own FluxTransformer2DModel test configuration: FLUX's with tiny sizes, with and without guidance.
_TINY = {**FLUX_DEV_CONFIG, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16}
_TINY |= {"num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8]}
TINY_PRESETS: dict[str, dict] = {
    "tiny-flux-dev": {**_TINY, "guidance_embeds": True},
    "tiny-flux-schnell": {**_TINY, "guidance_embeds": False},
}


# The full-size shapes of the benchmarks and GPU tests: (height, width, batch), 512 text tokens.
FULL_SIZE_SHAPES: dict[str, tuple[int, int, int]] = {
    "1024x1024-b1": (1024, 1024, 1),
    "1024x1024-b4": (1024, 1024, 4),
    "512x512-b1": (512, 512, 1),
    "512x512-b8": (512, 512, 8),
}
FULL_SIZE_TEXT_TOKENS = 512


def full_size_step(shape: str, seed: int = 0, device: str = "cuda") -> Step:
    """A bf16 FLUX.1-dev step of one of ``FULL_SIZE_SHAPES`` (timestep 700, guidance 3.5)."""
    height, width, batch = FULL_SIZE_SHAPES[shape]
    signature = DitSignature.from_config(FLUX_DEV_CONFIG, torch.bfloat16)
    return random_step(signature, batch, height, width, FULL_SIZE_TEXT_TOKENS, timestep=700.0, seed=seed, device=device)


def build_tiny(preset: str, seed: int = TINY_SEED):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_PRESETS[preset]).eval()


def write_tiny_models(root: Path, force: bool = False) -> list[Path]:
    """Save every tiny preset under ``root`` (skipping those already there); returns what was written."""
    written = []
    for preset in TINY_PRESETS:
        target = root / preset
        if (target / "config.json").is_file() and not force:
            continue
        build_tiny(preset).save_pretrained(target, safe_serialization=True)
        written.append(target)
    return written


def build_random(device: str = "cuda", seed: int = 0) -> torch.nn.Module:
    """FLUX.1-dev's architecture with random bf16 weights, built directly on ``device`` (no download)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def save_random(root: Path, name: str = RANDOM_MODEL) -> Path:
    """The random full-size model saved like real weights (a pipeline folder with ``transformer/``)."""
    model = build_random()
    path = root / name / "transformer"
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def random_model_root(scratch: Path) -> tuple[Path, float | None]:
    """The model root of the benchmarks (``$FLUX_MODEL_ROOT``, else ``scratch/models``) holding the random full-size
    model; and the seconds spent saving it there, ``None`` when it already was."""
    root = Path(os.environ.get(MODEL_ROOT_ENV) or scratch / "models")
    if (root / RANDOM_MODEL / "transformer" / "config.json").is_file():
        return root, None
    started = time.perf_counter()
    save_random(root)
    return root, time.perf_counter() - started
