"""Where a model's instances run on a host with several GPUs, written into its ``config.pbtxt``:

- data parallel: one instance per listed GPU (``instance_group`` entries with ``gpus: [g]``), each a whole model
  serving its own requests - throughput;
- context parallel (``dit_transformer`` only): one ``KIND_MODEL`` instance whose step runs across GPUs 0..N-1
  (``serving.ranks``) - latency;
- in process (``flux_generate``, ``flux_generate_stream``): each instance runs the transformer itself, with
  ``dit_transformer``'s parameters, instead of sending every step to it - no hop between models, no merging.

``python -m flux_triton place MODEL --gpus 0,1``, ``... place dit_transformer --parallel ulysses --degree 2`` or
``... place flux_generate --in-process --gpus 0``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from flux_triton.contract import DitSignature
from flux_triton.contract.generation import LATENTS
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, GENERATE, GENERATE_STREAM, PREPROCESS, parse_pbtxt, to_pbtxt
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.parallel import NO_PARALLEL, PARALLEL_KINDS, ParallelSettings
from flux_triton.serving.settings import EngineSettings, GenerateSettings, PreprocessSettings, TransformerSettings

# the last dim of each of flux_generate's tensors that is the transformer's: what its probe sizes a request by
TRANSFORMER_DIMS = {"prompt_embeds": "text_dim", "negative_prompt_embeds": "text_dim",
                    "pooled_prompt_embeds": "pooled_dim", "negative_pooled_prompt_embeds": "pooled_dim",
                    LATENTS: "in_channels"}  # fmt: skip


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


def transformer_in_process(config_path: Path, gpus: Sequence[int] = (), model_root: Path | None = None) -> dict:
    """Rewrite ``flux_generate``'s (or ``flux_generate_stream``'s) config at ``config_path`` so that each instance
    runs the transformer itself: ``dit_transformer``'s parameters beside it copied in, ``in_process`` true, the
    transformer's dims (from its model folder under ``model_root``, default the repository's) written into its tensors'
    last dims, one instance per GPU of ``gpus`` (none: one on the CPU). Returns the config as a dict."""
    config = _read(config_path)
    if "transformer_model" not in config.get("parameters", {}):  # not flux_generate, flux_generate_stream or a copy
        raise ValueError(f"--in-process: only {GENERATE} and {GENERATE_STREAM} run a transformer in process, "
                         f"not {config.get('name')}")  # fmt: skip
    repository = config_path.parents[1]
    transformer = TransformerSettings.from_config(_read(repository / DIT_TRANSFORMER / "config.pbtxt"), False)
    if transformer.parallel_settings.enabled:
        raise ValueError(f"--in-process: {DIT_TRANSFORMER} runs across GPUs (parallel {transformer.parallel}); "
                         f"a generation model runs its transformer on one device")  # fmt: skip
    model_dir = store.resolve_model_dir(
        transformer.model_dir, model_root or Locations.of_repository(repository).model_root
    )
    signature = DitSignature.from_config(store.read_config(model_dir), "FP32")
    config["parameters"].update({key: {"string_value": value} for key, value in transformer.parameters().items()})
    _replace(config, GenerateSettings, in_process=True)
    for tensor in (*config.get("input", []), *config.get("output", [])):
        if tensor["name"] in TRANSFORMER_DIMS:
            tensor["dims"] = [*tensor["dims"][:-1], str(getattr(signature, TRANSFORMER_DIMS[tensor["name"]]))]
    config["instance_group"] = instance_groups(gpus) or [{"kind": "KIND_CPU", "count": 1}]
    _write(config_path, config)
    return _read(config_path)


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
    in_process = f"{GENERATE}: each instance runs the transformer itself with {DIT_TRANSFORMER}'s parameters"
    parser.add_argument("--in-process", action="store_true", help=f"{in_process}, one per GPU of --gpus (none: CPU)")
    args = parser.parse_args(argv)
    gpus = [int(gpu) for gpu in args.gpus.split(",") if gpu.strip()]
    parallel = None
    if args.parallel is not None:
        parallel = ParallelSettings(args.parallel, args.degree if args.parallel != NO_PARALLEL else 1)
    path = (args.repository or Locations.here().repository) / args.model / "config.pbtxt"
    try:
        if args.in_process and parallel is not None:
            raise ValueError("--in-process and --parallel: a generation model runs its transformer on one device")
        config = transformer_in_process(path, gpus) if args.in_process else place(path, gpus, parallel)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"place: {exc}\n")
    print(f"{path}: instance_group {config['instance_group'] or 'Triton default (one instance per GPU)'}")
