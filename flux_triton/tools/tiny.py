"""``make tiny``: write the embedded tiny FLUX transformers, and their text encoders and VAE, under the model
root."""

from __future__ import annotations

import argparse
from pathlib import Path

from flux_triton.locations import Locations
from flux_triton.model.components import TINY_COMPONENTS, write_tiny_components
from flux_triton.model.presets import TINY_PRESETS, write_tiny_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_triton tiny", description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="default: $FLUX_MODEL_ROOT or models/")
    parser.add_argument("--force", action="store_true", help="rewrite existing models")
    args = parser.parse_args(argv)
    root = args.root or Locations.here().model_root
    for path in [*write_tiny_models(root, args.force), write_tiny_components(root, args.force)]:
        if path is not None:
            print(f"wrote {path}")
    print(f"tiny models ready in {root}: {', '.join([*TINY_PRESETS, TINY_COMPONENTS])}")
