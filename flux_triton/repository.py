"""Generate the ``flux_dit`` model repository for one engine, from the IO contract and the engine's
sidecar: ``flux_dit`` (ensemble, the public endpoint) -> ``dit_preprocess`` (Python backend) ->
``dit_engine`` (``tensorrt_plan``, or the Python-backend runner for onnxruntime, aoti and aoti-fp8).

``python -m flux_triton.repository --engine engines/<name>.<kind>.json [--output DIR]`` writes the
configs (and, for TensorRT, links the plan into ``dit_engine/1/``) and validates the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from google.protobuf import json_format, text_format

from flux_triton.contract import INPUTS, OUTPUTS, DitSignature, TensorSpec
from flux_triton.engine_io import ENGINE_OUTPUTS, engine_inputs
from flux_triton.model_store import REPO_ROOT
from flux_triton.sidecar import EngineSidecar

REPOSITORY = REPO_ROOT / "model_repository"
ENGINES_DIR_ENV = "FLUX_ENGINE_DIR"
ENSEMBLE, PREPROCESS, ENGINE = "flux_dit", "dit_preprocess", "dit_engine"
PYTHON_MODELS = (PREPROCESS, ENGINE)  # their model.py live in model_repository/<name>/1/
QUEUE_DELAY_US = 100  # lets simultaneous requests merge; a busy engine batches its queue anyway


def engine_name(name: str) -> str:
    """The ensemble tensor carrying ``name`` from dit_preprocess to dit_engine."""
    return f"engine_{name}"


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


def engine_config(sidecar: EngineSidecar, engine_ref: str) -> dict:
    signature, limits = sidecar.dit_signature, sidecar.limits
    config = {
        "name": ENGINE,
        "max_batch_size": limits.max_batch,
        "dynamic_batching": {"max_queue_delay_microseconds": QUEUE_DELAY_US},
        "input": [_tensor(spec, signature) for spec in engine_inputs(signature.guidance_embeds)],
        "output": [_tensor(spec, signature) for spec in ENGINE_OUTPUTS],
        "model_warmup": [_warmup(sidecar)],
    }
    if sidecar.kind == "tensorrt":
        config["platform"] = "tensorrt_plan"
        config["default_model_filename"] = sidecar.engine_file
        config["instance_group"] = [{"kind": "KIND_GPU", "count": 1}]
    else:
        config["backend"] = "python"
        config["parameters"] = _params(engine=engine_ref, FORCE_CPU_ONLY_INPUT_TENSORS="no")
        if sidecar.device_type:  # aoti: the packages run only on the device type they were compiled for
            kind = "KIND_GPU" if sidecar.device_type == "cuda" else "KIND_CPU"
            config["instance_group"] = [{"kind": kind, "count": 1}]
    return config


def _warmup(sidecar: EngineSidecar) -> dict:
    """One zero-valued request at the profile's opt shapes, run while the model loads: the first
    forward's one-time costs (cuDNN attention plans and kernel loading, ~20 s for an AOTI engine
    on an H100) are paid before the server reports ready, not by the first client."""
    signature, inputs = sidecar.dit_signature, {}
    for spec in engine_inputs(signature.guidance_embeds):
        batch, *dims = sidecar.shapes[spec.name]["opt"]
        inputs[spec.name] = {"data_type": _tensor(spec, signature)["data_type"], "dims": dims, "zero_data": True}
    return {"name": "opt_shape_zeros", "batch_size": batch, "inputs": inputs}


def preprocess_config(sidecar: EngineSidecar) -> dict:
    signature, limits = sidecar.dit_signature, sidecar.limits
    return {
        "name": PREPROCESS,
        "backend": "python",
        "max_batch_size": limits.max_batch,
        "input": _public_inputs(signature),
        "output": [_tensor(s, signature, engine_name(s.name)) for s in engine_inputs(signature.guidance_embeds)],
        "parameters": _params(
            in_channels=signature.in_channels,
            pooled_dim=signature.pooled_dim,
            text_dim=signature.text_dim,
            guidance_embeds=int(signature.guidance_embeds),
            dtype=signature.dtype,
            **asdict(limits),
        ),
    }


def ensemble_config(sidecar: EngineSidecar) -> dict:
    """Same public contract as ``dit_transformer``: a client switches by model name."""
    signature, limits = sidecar.dit_signature, sidecar.limits
    engine_specs = engine_inputs(signature.guidance_embeds)
    steps = [
        {
            "model_name": PREPROCESS,
            "model_version": -1,
            "input_map": {spec.name: spec.name for spec in INPUTS},
            "output_map": {engine_name(s.name): engine_name(s.name) for s in engine_specs},
        },
        {
            "model_name": ENGINE,
            "model_version": -1,
            "input_map": {spec.name: engine_name(spec.name) for spec in engine_specs},
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
    }


def model_config_pb2():
    """Triton's ``ModelConfig`` protobuf module, shipped in tritonclient; loaded by path because
    ``tritonclient.grpc``'s package import needs grpcio, which the HTTP client does not."""
    import importlib.util
    import sys

    import tritonclient

    name = "flux_triton._model_config_pb2"
    if name not in sys.modules:
        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def to_pbtxt(config: dict, header: str = "") -> str:
    message = json_format.ParseDict(config, model_config_pb2().ModelConfig())
    return header + text_format.MessageToString(message)


def parse_pbtxt(path: Path):
    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())


def engine_reference(sidecar_path: Path) -> str:
    """The ``engine`` parameter: the sidecar's name when it lies in the default engines folder
    (resolved at load time through $FLUX_ENGINE_DIR or ``<repository>/../engines``), else absolute."""
    sidecar_path = sidecar_path.resolve()
    return sidecar_path.name if sidecar_path.parent == REPO_ROOT / "engines" else str(sidecar_path)


def write_repository(sidecar_path: Path, output: Path) -> list[Path]:
    sidecar = EngineSidecar.read(sidecar_path)
    header = f"# Generated by `python -m flux_triton.repository` from {sidecar_path.name}; do not edit.\n"
    configs = {
        ENSEMBLE: ensemble_config(sidecar),
        PREPROCESS: preprocess_config(sidecar),
        ENGINE: engine_config(sidecar, engine_reference(sidecar_path)),
    }
    written = []
    for name, config in configs.items():
        folder = output / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(to_pbtxt(config, header))
        written.append(folder / "config.pbtxt")
    for name in PYTHON_MODELS:
        source, target = REPOSITORY / name / "1" / "model.py", output / name / "1" / "model.py"
        if name == ENGINE and sidecar.kind == "tensorrt":
            target.unlink(missing_ok=True)
            plan = output / ENGINE / "1" / sidecar.engine_file
            plan.unlink(missing_ok=True)
            os.symlink(os.path.relpath(sidecar_path.parent.resolve() / sidecar.engine_file, plan.parent), plan)
        elif source.resolve() != target.resolve():
            shutil.copy2(source, target)
    return written


def main() -> None:
    from flux_triton.repository_check import check_repository

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True, help="the engine's JSON sidecar in engines/")
    parser.add_argument("--output", type=Path, default=None, help="default: model_repository/ (onnxruntime), "
                        "out/model_repository-<kind>/ otherwise")  # fmt: skip
    args = parser.parse_args()
    kind = EngineSidecar.read(args.engine).kind
    output = args.output or (REPOSITORY if kind == "onnxruntime" else REPO_ROOT / "out" / f"model_repository-{kind}")
    for path in write_repository(args.engine, output):
        print(f"wrote {path}")
    check_repository(output, engines_dir=args.engine.parent)
    print(f"{output}: {ENSEMBLE} -> {PREPROCESS} -> {ENGINE} ({kind}) checked against the IO contract")


if __name__ == "__main__":
    main()
