"""Where a model's instances run on a host with several GPUs, written into its ``config.pbtxt``:

- data parallel: one instance per listed GPU (``instance_group`` entries with ``gpus: [g]``), each a whole model
  serving its own requests - throughput;
- context parallel (``dit_transformer`` only): one ``KIND_MODEL`` instance whose step runs across GPUs 0..N-1
  (``serving.ranks``) - latency.

``python -m flux_triton place MODEL --gpus 0,1`` or ``... place dit_transformer --parallel ulysses --degree 2``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, PREPROCESS, parse_pbtxt, to_pbtxt
from flux_triton.locations import Locations
from flux_triton.model.parallel import NO_PARALLEL, PARALLEL_KINDS, ParallelSettings
from flux_triton.serving.settings import EngineSettings, PreprocessSettings, TransformerSettings


def instance_groups(gpus: Sequence[int] = (), parallel: ParallelSettings | None = None) -> list[dict]:
    """Triton's ``instance_group`` for one instance per GPU of ``gpus``, or one context-parallel instance."""
    if parallel is not None and parallel.enabled:
        if gpus:
            raise ValueError("--gpus and --parallel: a context-parallel instance uses GPUs 0..N-1 of the visible ones "
                             "(set CUDA_VISIBLE_DEVICES for the server to choose them)")  # fmt: skip
        return [{"kind": "KIND_MODEL", "count": 1}]
    if len(set(gpus)) != len(gpus) or any(gpu < 0 for gpu in gpus):
        raise ValueError(f"--gpus: distinct GPU indices expected, got {list(gpus)}")
    return [{"kind": "KIND_GPU", "count": 1, "gpus": [gpu]} for gpu in gpus]


def place(config_path: Path, gpus: Sequence[int] = (), parallel: ParallelSettings | None = None) -> dict:
    """Rewrite the model config at ``config_path`` with its placement; returns the config as a dict.

    ``dit_engine``'s runner holds each generation's prompt only where it runs as one instance (``--gpus`` naming one
    GPU), so its ``hold_prompts`` and ``dit_preprocess``'s ``engine_holds_prompts`` beside it follow the placement."""
    config = _read(config_path)
    if parallel is not None and "model_dir" not in config.get("parameters", {}):  # not dit_transformer or a copy
        raise ValueError(f"--parallel: only {DIT_TRANSFORMER} runs a step across GPUs, not {config.get('name')}")
    config["instance_group"] = instance_groups(gpus, parallel)
    if parallel is not None:
        _replace(config, TransformerSettings, parallel=parallel.kind, parallel_degree=parallel.degree)
    _write(config_path, config)
    if "hold_prompts" in config.get("parameters", {}):  # dit_engine's Python runner
        hold_prompts(config_path, len(gpus) == 1)
    return _read(config_path)


def hold_prompts(engine_config_path: Path, holds: bool) -> None:
    """Set ``dit_engine``'s ``hold_prompts`` and ``dit_preprocess``'s ``engine_holds_prompts`` beside it together."""
    for path, schema, setting in ((engine_config_path, EngineSettings, "hold_prompts"),
                                  (engine_config_path.parents[1] / PREPROCESS / "config.pbtxt", PreprocessSettings,
                                   "engine_holds_prompts")):  # fmt: skip
        if path.exists():
            config = _read(path)
            _replace(config, schema, **{setting: holds})
            _write(path, config)


def _read(config_path: Path) -> dict:
    return json_format.MessageToDict(parse_pbtxt(config_path), preserving_proto_field_name=True)


def _replace(config: dict, schema, **changes) -> None:
    """Change settings through the model's schema: the rest of its parameters as they were."""
    settings = dataclasses.replace(schema.from_config(config, environment=False), **changes)
    config.setdefault("parameters", {}).update(
        {key: {"string_value": value} for key, value in settings.parameters().items()}
    )


def _write(config_path: Path, config: dict) -> None:
    """Its leading comment lines are kept (``config.pbtxt`` has no other place for comments that survive)."""
    lines = config_path.read_text().splitlines(keepends=True)
    header = "".join(line for line in lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("#")), 0)])
    config_path.write_text(to_pbtxt(config, header))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_triton place", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder of the repository, e.g. dit_transformer or dit_engine")
    parser.add_argument("--repository", type=Path, default=None, help="default: model_repository/")
    parser.add_argument("--gpus", default="", help="one instance per GPU, e.g. 0,1")
    parser.add_argument("--parallel", choices=[NO_PARALLEL, *PARALLEL_KINDS], default=None)
    parser.add_argument("--degree", type=int, default=2, help="GPUs per context-parallel step")
    args = parser.parse_args(argv)
    gpus = [int(gpu) for gpu in args.gpus.split(",") if gpu.strip()]
    parallel = None
    if args.parallel is not None:
        parallel = ParallelSettings(args.parallel, args.degree if args.parallel != NO_PARALLEL else 1)
    path = (args.repository or Locations.here().repository) / args.model / "config.pbtxt"
    try:
        config = place(path, gpus, parallel)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"place: {exc}\n")
    print(f"{path}: instance_group {config['instance_group'] or 'Triton default (one instance per GPU)'}")
