"""Full-size FLUX.1-dev with random weights, saved like real ones (a diffusers pipeline layout under
a model root), for the GPU runs that load through ``from_pretrained``: the served step and
``make engine`` of the AOTI kinds.

    python -m benchmarks.random_model --root /tmp/models   # then FLUX_MODEL_ROOT=/tmp/models
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flux_triton import model_store

MODEL = "flux-dev-random"


def build_model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**model_store.FLUX_DEV_CONFIG)
    torch.set_default_dtype(torch.float32)
    return model.eval().requires_grad_(False)


def save_random_model(root: Path, name: str = MODEL) -> Path:
    model = build_model()
    path = root / name / "transformer"
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    path = save_random_model(args.root)
    print(f"saved {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
