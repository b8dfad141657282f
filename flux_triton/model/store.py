"""Where transformers come from: safe paths under the model root, safetensors-only loading.

Model names from config parameters or the environment are resolved inside the model root
(``locations``) and may not leave it. Weights load through diffusers' ``from_pretrained`` with
safetensors only, for the tiny models and real FLUX weights alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from flux_triton.model.presets import TINY_PRESETS

DEFAULT_MODEL = "tiny-flux-dev"


class ModelDirError(ValueError):
    pass


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


def inside(folder: Path, name: str) -> Path:
    """``name`` (a file of a model, from a config parameter) inside ``folder``; it may not leave it."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelDirError(f"{name!r} resolves to {path}, outside the model folder {folder}")
    return path


def config_digest(config: Mapping) -> str:
    """The sha256 of a transformer's config, without diffusers' bookkeeping keys (``_name_or_path``...)."""
    architecture = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return hashlib.sha256(json.dumps(architecture, sort_keys=True, default=list).encode()).hexdigest()


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
