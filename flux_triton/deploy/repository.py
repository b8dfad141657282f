"""Generate the ``flux_dit`` model repository for one engine, from the IO contract and the engine's
sidecar: ``flux_dit`` (ensemble, the public endpoint) -> ``dit_preprocess`` (Python backend) ->
``dit_engine`` (the kind's platform: ``tensorrt_plan``, or this package's Python-backend runner).
``make repo`` writes the configs (and, for TensorRT, links the plan into ``dit_engine/1/``) and
checks the result (``deploy.check``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flux_triton.contract import INPUTS, OUTPUTS, DitSignature, TensorSpec
from flux_triton.contract.specs import ENGINE_OUTPUTS, engine_inputs, engine_tensor_name
from flux_triton.deploy.pbtxt import ENGINE, ENSEMBLE, PREPROCESS, to_pbtxt
from flux_triton.engines.kinds import DEFAULT_KIND, KINDS, check_step_cache
from flux_triton.engines.sidecar import EngineSidecar
from flux_triton.locations import Locations
from flux_triton.model.graphs import WARMUP_CALLS
from flux_triton.pipeline.inputs import image_tokens
from flux_triton.serving.settings import DEFAULT_WARMUP, EngineSettings, EnsembleSettings, PreprocessSettings

PYTHON_MODELS = (PREPROCESS, ENGINE)  # their model.py live in model_repository/<name>/1/
QUEUE_DELAY_US = 100  # lets simultaneous requests merge; a busy engine batches its queue anyway


def _tensor(spec: TensorSpec, signature: DitSignature, name: str | None = None) -> dict:
    entry = signature.tensor_config(spec)
    entry["name"] = name or spec.name
    return entry


def _public_inputs(signature: DitSignature) -> list[dict]:
    """The public inputs of flux_dit and dit_preprocess, all declared optional: Triton's ensemble
    scheduler does not reject a request that lacks a required input (the step never becomes ready
    and the request fails as a "deadlock"), so dit_preprocess's validation names what is missing."""
    return [{**_tensor(spec, signature), "optional": True} for spec in INPUTS]


def _params(**values) -> dict:
    return {key: {"string_value": str(value)} for key, value in values.items()}


def holds_prompts(sidecar: EngineSidecar) -> bool:
    """Whether ``make repo`` has ``dit_engine`` hold each sequence's prompt: this package's runner does, in the one
    instance it starts; a TensorRT plan served by Triton's own backend keeps no state."""
    return KINDS[sidecar.kind].platform == "python"


def engine_config(sidecar: EngineSidecar, engine_ref: str, cache: str = "none") -> dict:
    signature, limits = sidecar.dit_signature, sidecar.limits
    config = {
        "name": ENGINE,
        "max_batch_size": limits.max_batch,
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
        "input": [_tensor(spec, signature) for spec in engine_inputs(signature.guidance_embeds)],
        "output": [_tensor(spec, signature) for spec in ENGINE_OUTPUTS],
        "model_warmup": _warmups(sidecar),
    }
    platform = KINDS[sidecar.kind].platform
    if platform == "python":
        config["backend"] = "python"
        settings = EngineSettings(engine=engine_ref, cache=cache, hold_prompts=holds_prompts(sidecar))
        config["parameters"] = _params(**settings.parameters(), FORCE_CPU_ONLY_INPUT_TENSORS="no")
    else:
        config["platform"] = platform
        config["default_model_filename"] = sidecar.engine_file
    if sidecar.device or platform == "python":
        # an engine bound to a device type runs only there; our runner of one bound to none (ONNX Runtime, whose
        # CPU package the project installs) on the CPU
        on_gpu = bool(sidecar.device) and sidecar.device["type"] == "cuda"
        config["instance_group"] = [{"kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": 1}]
        if on_gpu and (cache != "none" or holds_prompts(sidecar)):
            # a step cache's state and the held prompts live in one instance (settings); `place --gpus` spreads it
            config["instance_group"][0]["gpus"] = [0]
    return config


def _warmups(sidecar: EngineSidecar) -> list[dict]:
    """Zero-valued requests run while the model loads, before the server reports ready, so that the first forward's
    one-time costs (attention plans, kernel loading, a CUDA graph's capture) are not the first client's: the
    profile's opt shape, then each ``DEFAULT_WARMUP`` image the profile admits (at the opt text length). Each runs
    ``WARMUP_CALLS + 1`` times: a graphed runner captures a shape's step on the call after its ordinary ones."""
    signature, shapes = sidecar.dit_signature, sidecar.shapes["hidden_states"]
    (batch, tokens, _), (min_batch, min_tokens, _), (max_batch, max_tokens, _) = (
        shapes[level] for level in ("opt", "min", "max")
    )
    text = sidecar.shapes["encoder_hidden_states"]["opt"][1]
    cases = [(batch, tokens)]
    for height, width, images, _ in DEFAULT_WARMUP:
        case = (images, image_tokens(height, width))
        if min_batch <= images <= max_batch and min_tokens <= case[1] <= max_tokens and case not in cases:
            cases.append(case)
    warmups = []
    for images, image_count in cases:
        sizes = {**signature.sizes, "B": images, "N": image_count, "S": text}
        inputs = {spec.name: {"data_type": _tensor(spec, signature)["data_type"], "dims": list(spec.resolve(sizes)),
                              "zero_data": True} for spec in engine_inputs(signature.guidance_embeds)}  # fmt: skip
        name = f"zeros_b{images}_{image_count}_image_tokens"
        warmups.append({"name": name, "batch_size": images, "inputs": inputs, "count": WARMUP_CALLS + 1})
    return warmups


def preprocess_config(sidecar: EngineSidecar, cache: str = "none") -> dict:
    signature, limits = sidecar.dit_signature, sidecar.limits
    return {
        "name": PREPROCESS,
        "backend": "python",
        "max_batch_size": limits.max_batch,
        "input": _public_inputs(signature),
        "output": [_tensor(s, signature, engine_tensor_name(s.name)) for s in engine_inputs(signature.guidance_embeds)],
        "parameters": _params(
            **PreprocessSettings.of_engine(signature, limits, cache, holds_prompts(sidecar)).parameters()
        ),
        # one instance holds every generation session (Triton's default would start one per GPU), on the CPU: it
        # runs no GPU work
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }


def ensemble_config(sidecar: EngineSidecar, cache: str = "none") -> dict:
    """Same public contract as ``dit_transformer``: a client switches by model name."""
    signature, limits = sidecar.dit_signature, sidecar.limits
    engine_specs = engine_inputs(signature.guidance_embeds)
    steps = [
        {
            "model_name": PREPROCESS,
            "model_version": -1,
            "input_map": {spec.name: spec.name for spec in INPUTS},
            "output_map": {engine_tensor_name(s.name): engine_tensor_name(s.name) for s in engine_specs},
        },
        {
            "model_name": ENGINE,
            "model_version": -1,
            "input_map": {spec.name: engine_tensor_name(spec.name) for spec in engine_specs},
            "output_map": {spec.name: spec.name for spec in ENGINE_OUTPUTS},
        },
    ]
    return {
        "name": ENSEMBLE,
        "platform": "ensemble",
        "max_batch_size": limits.max_batch,
        "input": _public_inputs(signature),
        "output": [_tensor(spec, signature) for spec in OUTPUTS],
        "ensemble_scheduling": {"step": steps},
        "parameters": _params(**EnsembleSettings(cache=cache).parameters()),
    }


def write_repository(
    sidecar_path: Path, output: Path, locations: Locations | None = None, cache: str = "none"
) -> list[Path]:
    """The three configs into ``output`` (and the Python models' files, from ``locations.repository``), serving
    the step ``cache`` (a cache setting; only an engine kind with ``step_caches`` runs one)."""
    locations = locations or Locations.here()
    sidecar = EngineSidecar.read(sidecar_path)
    check_step_cache(sidecar.kind, cache)
    header = f"# Generated by `make repo` from {sidecar_path.name}; do not edit.\n"
    configs = {
        ENSEMBLE: ensemble_config(sidecar, cache),
        PREPROCESS: preprocess_config(sidecar, cache),
        ENGINE: engine_config(sidecar, locations.engine_reference(sidecar_path), cache),
    }
    written = []
    for name, config in configs.items():
        folder = output / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(to_pbtxt(config, header))
        written.append(folder / "config.pbtxt")
    for name in PYTHON_MODELS:
        source, target = locations.repository / name / "1" / "model.py", output / name / "1" / "model.py"
        if name == ENGINE and KINDS[sidecar.kind].platform != "python":
            target.unlink(missing_ok=True)
            plan = output / ENGINE / "1" / sidecar.engine_file
            plan.unlink(missing_ok=True)
            os.symlink(os.path.relpath(sidecar_path.parent.resolve() / sidecar.engine_file, plan.parent), plan)
        elif source.resolve() != target.resolve():
            shutil.copy2(source, target)
    return written


def default_output(sidecar: EngineSidecar, locations: Locations) -> Path:
    """The default engine's repository is the shipped one; the others go to ``out/model_repository-<kind>``."""
    return locations.repository if sidecar.kind == DEFAULT_KIND else locations.out / f"model_repository-{sidecar.kind}"


def generate(sidecar_path: Path, output: Path | None = None, cache: str = "none") -> Path:
    """``make repo``: write the repository for one engine (serving the step ``cache``) and check it; returns
    the repository."""
    from flux_triton.deploy.check import check_repository

    locations = Locations.here()
    sidecar = EngineSidecar.read(sidecar_path)
    output = output or default_output(sidecar, locations)
    for path in write_repository(sidecar_path, output, locations, cache):
        print(f"wrote {path}")
    check_repository(output, engines_dir=Path(sidecar_path).parent)
    print(f"{output}: {ENSEMBLE} -> {PREPROCESS} -> {ENGINE} ({sidecar.kind}) checked against the IO contract")
    return output
