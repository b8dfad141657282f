"""Where transformers come from: the model root, the embedded tiny models, safe loading.

Every model directory lives under one model root (``FLUX_MODEL_ROOT``, default ``models/``
beside the Triton model repository). Model names from config parameters or the environment are
resolved inside that root and may not leave it. Weights load through diffusers'
``from_pretrained`` with safetensors only, for the tiny models and real FLUX weights alike.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_ROOT_ENV = "FLUX_MODEL_ROOT"
MODEL_DIR_ENV = "FLUX_DIT_MODEL_DIR"
DEFAULT_MODEL = "tiny-flux-dev"
TINY_SEED = 0

# diffusers' own FluxTransformer2DModel test configuration, with and without guidance embeddings.
_TINY_BASE = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)
TINY_PRESETS: dict[str, dict] = {
    "tiny-flux-dev": {**_TINY_BASE, "guidance_embeds": True},
    "tiny-flux-schnell": {**_TINY_BASE, "guidance_embeds": False},
}

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


class ModelDirError(ValueError):
    pass


def model_root(default: Path | None = None) -> Path:
    root = os.environ.get(MODEL_ROOT_ENV) or default or REPO_ROOT / "models"
    return Path(root).resolve()


def resolve_model_dir(name: str, root: Path) -> Path:
    """The transformer folder for ``name`` inside ``root``: a diffusers pipeline folder with a
    ``transformer/`` subfolder, or a bare transformer folder."""
    root = root.resolve()
    candidate = (root / name).resolve()
    if not candidate.is_relative_to(root):
        raise ModelDirError(f"model '{name}' resolves to {candidate}, outside the model root {root}")
    if (candidate / "transformer" / "config.json").is_file():
        candidate = candidate / "transformer"
    if not (candidate / "config.json").is_file():
        hint = " (run `make tiny` to write the embedded tiny models)" if name in TINY_PRESETS else ""
        raise ModelDirError(f"no FluxTransformer2DModel config.json in {candidate}{hint}")
    if not any(candidate.glob("*.safetensors")):
        raise ModelDirError(f"no .safetensors weights in {candidate}; only safetensors are loaded")
    return candidate


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"corrupt config.json in {model_dir}: {exc}") from exc


def load_transformer(model_dir: Path, dtype: torch.dtype, device: torch.device | str):
    from diffusers import FluxTransformer2DModel

    try:
        model = FluxTransformer2DModel.from_pretrained(model_dir, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelDirError(f"cannot load FluxTransformer2DModel from {model_dir}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False)


def default_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_tiny(preset: str, seed: int = TINY_SEED):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_PRESETS[preset]).eval()


def write_tiny_models(root: Path, force: bool = False) -> list[Path]:
    written = []
    for preset in TINY_PRESETS:
        target = root / preset
        if (target / "config.json").is_file() and not force:
            continue
        build_tiny(preset).save_pretrained(target, safe_serialization=True)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the embedded tiny FLUX transformers.")
    parser.add_argument("--root", type=Path, default=None, help="model root (default: $FLUX_MODEL_ROOT or models/)")
    parser.add_argument("--force", action="store_true", help="rewrite existing models")
    args = parser.parse_args()
    root = args.root or model_root()
    for path in write_tiny_models(root, args.force):
        print(f"wrote {path}")
    print(f"tiny models ready in {root}: {', '.join(TINY_PRESETS)}")


if __name__ == "__main__":
    main()
