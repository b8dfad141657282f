"""``python -m flux_triton calibrate MODEL``: static FP8 activation scales for a model (``model.fp8_scales``),
written into its folder, for ``dit_transformer``'s ``fp8: true`` with ``fp8_scales: fp8_scales.safetensors``.

The calibration runs the model (bf16 on a GPU, fp32 on the CPU) on random latents and prompt embeddings at the
documented shapes and timesteps (``Calibration``'s defaults, or ``--shapes``/``--timesteps``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, calibrate, save_scales


def _shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``1024x1024x1,512x512x1``: height x width x batch."""
    return tuple(tuple(int(part) for part in shape.split("x")) for shape in text.split(","))  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    defaults = Calibration()
    parser = argparse.ArgumentParser(prog="python -m flux_triton calibrate", description=__doc__)
    parser.add_argument("model", help="a model folder under the model root (as dit_transformer's model_dir)")
    parser.add_argument("--root", type=Path, default=None, help="default: $FLUX_MODEL_ROOT or models/")
    parser.add_argument("--out", default=SCALES_FILE, help="the file name inside the model's folder")
    parser.add_argument("--shapes", type=_shapes, default=defaults.shapes,
                        help="HEIGHTxWIDTHxBATCH,... (default 1024x1024x1,512x512x1)")  # fmt: skip
    parser.add_argument("--timesteps", default=",".join(f"{t:g}" for t in defaults.timesteps))
    parser.add_argument("--seeds", type=int, default=len(defaults.seeds), help="random inputs per shape and timestep")
    parser.add_argument("--margin", type=float, default=defaults.margin)
    args = parser.parse_args(argv)
    model_dir = store.resolve_model_dir(args.model, args.root or Locations.here().model_root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = store.load_transformer(model_dir, store.default_dtype(device), device)
    timesteps = tuple(float(t) for t in args.timesteps.split(","))
    calibration = Calibration(args.shapes, timesteps, tuple(range(args.seeds)), defaults.text_tokens, args.margin)
    started = time.perf_counter()
    scales = calibrate(transformer, calibration)
    path = save_scales(store.inside(model_dir, args.out), scales, transformer.config, calibration)
    print(f"{len(scales)} activation scales from {len(args.shapes) * len(timesteps) * args.seeds} steps on {device} "
          f"in {time.perf_counter() - started:.1f} s: {path}")  # fmt: skip
