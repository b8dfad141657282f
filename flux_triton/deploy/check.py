"""Static checks of a generated ``flux_dit`` repository: every ensemble ``input_map``/``output_map``
tensor against the composing model's name, dtype and dims, every config against the IO
contract (``INPUTS``/``OUTPUTS`` publicly, ``engine_inputs`` for the engine), and the two models' prompt holding."""

from __future__ import annotations

from pathlib import Path

from flux_triton.contract import INPUTS, OUTPUTS, DitSignature
from flux_triton.contract.specs import ENGINE_OUTPUTS, engine_inputs, engine_tensor_name
from flux_triton.deploy.pbtxt import ENGINE, ENSEMBLE, PREPROCESS, dtype_enum, parse_pbtxt
from flux_triton.engines.sidecar import EngineSidecar
from flux_triton.locations import Locations


class RepositoryError(ValueError):
    pass


def _tensors(entries) -> dict[str, tuple[int, tuple[int, ...], bool]]:
    return {t.name: (t.data_type, tuple(t.dims), getattr(t, "optional", False)) for t in entries}


def ensemble_problems(repository: Path) -> list[str]:
    """Each mapped tensor must exist in the composing model with the same dtype and dims."""
    ensemble = parse_pbtxt(repository / ENSEMBLE / "config.pbtxt")
    known = {name: value[:2] for name, value in _tensors(ensemble.input).items()}
    outputs = _tensors(ensemble.output)
    problems = []
    for step in ensemble.ensemble_scheduling.step:
        model = parse_pbtxt(repository / step.model_name / "config.pbtxt")
        if model.max_batch_size != ensemble.max_batch_size:
            problems.append(f"{step.model_name}: max_batch_size {model.max_batch_size} != {ensemble.max_batch_size}")
        inputs, model_outputs = _tensors(model.input), _tensors(model.output)
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{step.model_name}: input_map names unknown input {key!r}")
            elif value not in known:
                problems.append(f"{step.model_name}: input {key!r} is fed by {value!r}, which nothing produces")
            elif known[value] != inputs[key][:2]:
                problems.append(f"{step.model_name}: input {key!r} is {inputs[key][:2]}, {value!r} is {known[value]}")
        for name, (_, _, optional) in inputs.items():
            if not optional and name not in step.input_map:
                problems.append(f"{step.model_name}: required input {name!r} is not mapped")
        for key, value in step.output_map.items():
            if key not in model_outputs:
                problems.append(f"{step.model_name}: output_map names unknown output {key!r}")
                continue
            known[value] = model_outputs[key][:2]
            if value in outputs and outputs[value][:2] != known[value]:
                problems.append(f"{ENSEMBLE}: output {value!r} is {outputs[value][:2]}, produced as {known[value]}")
    problems += [f"{ENSEMBLE}: output {name!r} is never produced" for name in outputs if name not in known]
    return problems


def contract_problems(repository: Path, signature: DitSignature) -> list[str]:
    """Names, dtypes and dims of every config against the contract made concrete."""
    guidance = signature.guidance_embeds
    # The public inputs are all optional in config; dit_preprocess's validation enforces the contract.
    expected = {
        ENSEMBLE: (INPUTS, OUTPUTS, {}),
        PREPROCESS: (
            INPUTS,
            engine_inputs(guidance),
            {s.name: engine_tensor_name(s.name) for s in engine_inputs(guidance)},
        ),
        ENGINE: (engine_inputs(guidance), ENGINE_OUTPUTS, {}),
    }
    public = {ENSEMBLE, PREPROCESS}
    problems = []
    for model, (inputs, outputs, renamed) in expected.items():
        config = parse_pbtxt(repository / model / "config.pbtxt")
        for kind, specs, entries in (("input", inputs, config.input), ("output", outputs, config.output)):
            rename = renamed if kind == "output" else {}
            wanted = {}
            for spec in specs:
                entry = signature.tensor_config(spec)
                dtype = dtype_enum(entry["data_type"])
                optional = spec.optional or (kind == "input" and model in public)
                wanted[rename.get(spec.name, spec.name)] = (dtype, tuple(entry["dims"]), optional)
            if _tensors(entries) != wanted:
                problems.append(f"{model}: {kind}s {_tensors(entries)} differ from the contract's {wanted}")
    return problems


def holding_problems(repository: Path) -> list[str]:
    """``dit_preprocess`` leaves the prompt out of a sequence's later steps only for a ``dit_engine`` that holds it."""
    preprocess, engine = (parse_pbtxt(repository / name / "config.pbtxt").parameters for name in (PREPROCESS, ENGINE))

    def on(parameters, key: str) -> bool:
        return key in parameters and parameters[key].string_value == "true"

    if on(preprocess, "engine_holds_prompts") and not on(engine, "hold_prompts"):
        return [f"{PREPROCESS}: engine_holds_prompts is true, but {ENGINE} does not hold prompts (its hold_prompts); "
                f"`python -m flux_triton place {ENGINE} --gpus 0` sets both"]  # fmt: skip
    return []


def check_repository(repository: Path, engines_dir: Path | None = None) -> EngineSidecar:
    """Raise ``RepositoryError`` listing every problem; return the engine's sidecar."""
    engine = parse_pbtxt(repository / ENGINE / "config.pbtxt")
    problems = []
    if engine.platform == "tensorrt_plan":
        plan = repository / ENGINE / "1" / engine.default_model_filename
        sidecar_path = plan.resolve().with_suffix(".tensorrt.json")
        if not plan.exists():
            problems.append(f"{ENGINE}: plan {plan} does not exist")
    else:
        reference = engine.parameters["engine"].string_value
        sidecar_path = engines_dir / reference if engines_dir else Locations.of_repository(repository).engine(reference)
    if not sidecar_path.is_file():
        raise RepositoryError(f"{ENGINE}: engine sidecar {sidecar_path} does not exist (run `make engine`)")
    sidecar = EngineSidecar.read(sidecar_path)
    if not (sidecar_path.parent / sidecar.engine_file).exists():
        problems.append(f"{ENGINE}: engine file {sidecar.engine_file} named by {sidecar_path} does not exist")
    problems += ensemble_problems(repository) + contract_problems(repository, sidecar.dit_signature)
    problems += holding_problems(repository)
    if problems:
        raise RepositoryError(f"{repository}:\n  " + "\n  ".join(problems))
    return sidecar
