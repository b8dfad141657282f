"""The generated flux_dit repository: ensemble maps against the composing models, every config
against the IO contract, the tensorrt_plan config, and the committed default repository."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import CHECKOUT, REPOSITORY, copy_model

from flux_triton.contract import DitSignature
from flux_triton.contract.specs import engine_inputs
from flux_triton.deploy.check import RepositoryError, check_repository
from flux_triton.deploy.pbtxt import (
    DIT_TRANSFORMER,
    ENGINE,
    ENSEMBLE,
    GENERATE,
    PREPROCESS,
    model_config_pb2,
    parse_pbtxt,
    set_parameter,
    to_pbtxt,
)
from flux_triton.deploy.placement import place, transformer_in_process
from flux_triton.deploy.repository import engine_config, ensemble_config, preprocess_config, write_repository
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.engines.sidecar import EngineSidecar
from flux_triton.locations import Locations
from flux_triton.model.graphs import WARMUP_CALLS
from flux_triton.model.presets import FLUX_DEV_CONFIG


@pytest.fixture(scope="module")
def ort_sidecar(onnx_engines) -> Path:
    return onnx_engines["tiny-flux-dev"]


@pytest.fixture
def ort_repository(tmp_path, ort_sidecar) -> Path:
    write_repository(ort_sidecar, tmp_path / "repo", Locations(CHECKOUT))
    return tmp_path / "repo"


def test_committed_repository_is_the_generated_default(ort_sidecar):
    sidecar = EngineSidecar.read(ort_sidecar)
    generated = {
        ENSEMBLE: ensemble_config(sidecar),
        PREPROCESS: preprocess_config(sidecar),
        ENGINE: engine_config(sidecar, "tiny-flux-dev-fp32.onnxruntime.json"),
    }
    for name, config in generated.items():
        committed = parse_pbtxt(REPOSITORY / name / "config.pbtxt")
        assert str(committed) == str(parse_pbtxt_text(to_pbtxt(config))), f"{name}: run `make repo`"


def parse_pbtxt_text(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())


def test_generated_repository_passes_the_static_checks(ort_repository, ort_sidecar):
    sidecar = check_repository(ort_repository)
    assert sidecar.kind == "onnxruntime"
    engine = parse_pbtxt(ort_repository / ENGINE / "config.pbtxt")
    assert engine.backend == "python" and engine.dynamic_batching.max_queue_delay_microseconds > 0
    assert [t.name for t in engine.input] == [s.name for s in engine_inputs(True)]
    assert (ort_repository / ENGINE / "1" / "model.py").is_file()
    (warmup,) = engine.model_warmup  # every server start in these tests runs it
    opt = {name: levels["opt"] for name, levels in EngineSidecar.read(ort_sidecar).shapes.items()}
    assert {name: [warmup.batch_size, *sample.dims] for name, sample in warmup.inputs.items()} == opt
    assert all(sample.zero_data for sample in warmup.inputs.values())
    assert warmup.count == WARMUP_CALLS + 1  # a graphed runner captures the shape before READY
    (preprocess,) = parse_pbtxt(ort_repository / PREPROCESS / "config.pbtxt").instance_group
    assert (preprocess.kind, preprocess.count) == (model_config_pb2().ModelInstanceGroup.KIND_CPU, 1)


def test_a_python_gpu_engine_is_one_instance_that_holds_the_prompts(ort_sidecar):
    """Triton starts a GPU group without ``gpus`` on every GPU; a cached engine's state and the held prompts must
    live in one instance, and dit_preprocess leaves the prompt out only where its engine holds it."""
    sidecar = dataclasses.replace(EngineSidecar.read(ort_sidecar), device={"type": "cuda", "gpu": "any"})
    for cache in ("none", "mag"):
        config = engine_config(sidecar, "e.json", cache=cache)
        assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1, "gpus": [0]}]
        assert config["parameters"]["hold_prompts"] == {"string_value": "true"}
    preprocess = preprocess_config(sidecar)["parameters"]
    assert preprocess["engine_holds_prompts"] == {"string_value": "true"}


def test_placing_the_engine_on_several_gpus_sends_the_prompt_every_step(ort_repository):
    """``place dit_engine --gpus 0,1`` starts an instance per GPU; a step may reach either, so neither holds
    prompts and dit_preprocess passes each step's prompt on; placed back on one GPU, both hold them again."""

    def holding() -> tuple[str, str]:
        engine, preprocess = (
            parse_pbtxt(ort_repository / name / "config.pbtxt").parameters for name in (ENGINE, PREPROCESS)
        )
        return engine["hold_prompts"].string_value, preprocess["engine_holds_prompts"].string_value

    assert holding() == ("true", "true")
    place(ort_repository / ENGINE / "config.pbtxt", gpus=[0, 1])
    assert holding() == ("false", "false")
    check_repository(ort_repository)
    place(ort_repository / ENGINE / "config.pbtxt", gpus=[1])
    assert holding() == ("true", "true")
    assert parse_pbtxt(ort_repository / ENGINE / "config.pbtxt").parameters["engine"].string_value  # the rest kept


def test_in_process_placement_copies_the_transformers_settings_and_dims(tmp_path, model_root):
    """``place flux_generate --in-process --gpus 0,1``: an instance per GPU, each running the transformer with
    dit_transformer's parameters (its speed-ups, its cache), the transformer's dims in the generation's tensors."""
    repository = tmp_path / "repo"
    transformer = copy_model(repository, DIT_TRANSFORMER)
    set_parameter(transformer, "cache", "first_block")
    set_parameter(transformer, "fuse_qkv", "true")
    config = transformer_in_process(copy_model(repository, GENERATE), [0, 1], model_root)
    assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1, "gpus": [g]} for g in (0, 1)]
    parameters = {key: value.get("string_value", "") for key, value in config["parameters"].items()}
    assert (parameters["in_process"], parameters["cache"], parameters["fuse_qkv"]) == ("true", "first_block", "true")
    dims = {tensor["name"]: tensor["dims"] for tensor in (*config["input"], *config["output"])}
    assert dims["prompt_embeds"] == ["-1", "-1", "32"] and dims["pooled_prompt_embeds"] == ["-1", "32"]
    assert dims["latents"] == ["-1", "-1", "4"] and dims["height"] == ["1"]


@pytest.mark.parametrize(
    ("model", "change", "message"),
    [
        (PREPROCESS, {}, "--in-process: only flux_generate and flux_generate_stream run a transformer in process"),
        (GENERATE, {"parallel": "ulysses", "parallel_degree": "2"}, "dit_transformer runs across GPUs"),
    ],
    ids=["not-a-generation-model", "parallel-transformer"],
)
def test_in_process_placement_refuses_what_cannot_run_a_transformer_in_process(tmp_path, model, change, message):
    repository = tmp_path / "repo"
    transformer = copy_model(repository, DIT_TRANSFORMER)
    for key, value in change.items():
        set_parameter(transformer, key, value)
    with pytest.raises(ValueError, match=message):
        transformer_in_process(copy_model(repository, model), gpus=[0])


@pytest.mark.parametrize(
    ("model", "old", "new", "message"),
    [
        (ENGINE, 'name: "timestep"\n  data_type: TYPE_FP32', 'name: "timestep"\n  data_type: TYPE_FP16', "timestep"),
        (ENSEMBLE, 'value: "engine_img_ids"', 'value: "engine_txt_ids"', "img_ids"),
        (PREPROCESS, 'name: "engine_hidden_states"\n  data_type: TYPE_FP32\n  dims: -1\n  dims: 4',
         'name: "engine_hidden_states"\n  data_type: TYPE_FP32\n  dims: -1\n  dims: 8', "engine_hidden_states"),
        (ENSEMBLE, 'key: "guidance"\n      value: "guidance"', 'key: "guidance"\n      value: "guidanse"', "guidanse"),
        (ENGINE, 'key: "hold_prompts"\n  value {\n    string_value: "true"',
         'key: "hold_prompts"\n  value {\n    string_value: "false"', "engine_holds_prompts is true, but dit_engine"),
    ],
    ids=["engine-dtype", "swapped-map", "dims", "unknown-tensor", "prompt-holding"],
)  # fmt: skip
def test_static_checks_catch_mismatches(ort_repository, model, old, new, message):
    path = ort_repository / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(RepositoryError, match=message):
        check_repository(ort_repository)


def _tensorrt_sidecar(folder: Path, precision: str, dtype: torch.dtype) -> Path:
    signature = DitSignature.from_config(FLUX_DEV_CONFIG, dtype)
    profile = PROFILE_PRESETS["default"]
    (folder / f"flux-dev-{precision}.plan").write_bytes(b"plan built by TensorRT")
    sidecar = EngineSidecar.for_build(
        "tensorrt",
        precision,
        f"flux-dev-{precision}.plan",
        "flux-dev",
        signature,
        profile,
        FLUX_DEV_CONFIG,
        device={"type": "cuda", "gpu": "NVIDIA H100", "compute_capability": "9.0"},
    )
    return sidecar.write(folder / f"flux-dev-{precision}.tensorrt.json")


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_tensorrt_plan_config_follows_the_contract(tmp_path, precision, dtype):
    sidecar_path = _tensorrt_sidecar(tmp_path, precision, dtype)
    repository = tmp_path / "repo"
    write_repository(sidecar_path, repository, Locations(CHECKOUT))
    check_repository(repository)
    engine = parse_pbtxt(repository / ENGINE / "config.pbtxt")
    assert engine.platform == "tensorrt_plan" and not engine.backend
    assert engine.default_model_filename == f"flux-dev-{precision}.plan"
    assert (
        repository / ENGINE / "1" / engine.default_model_filename
    ).resolve() == tmp_path / engine.default_model_filename
    assert not (repository / ENGINE / "1" / "model.py").exists()
    assert engine.max_batch_size == 4 and engine.HasField("dynamic_batching")
    # Triton's TensorRT backend holds no prompts: dit_preprocess sends it every step, to an instance on every GPU
    assert "hold_prompts" not in engine.parameters and not engine.instance_group[0].gpus
    preprocess = parse_pbtxt(repository / PREPROCESS / "config.pbtxt")
    assert preprocess.parameters["engine_holds_prompts"].string_value == "false"
    DataType = model_config_pb2().DataType
    io = {t.name: (DataType.Name(t.data_type), list(t.dims)) for t in [*engine.input, *engine.output]}
    floats = {"bf16": "TYPE_BF16", "fp16": "TYPE_FP16"}[precision]
    assert io == {
        "hidden_states": (floats, [-1, 64]),
        "timestep": (floats, [1]),  # already t / 1000 in the engine dtype
        "guidance": ("TYPE_FP32", [1]),
        "pooled_projections": (floats, [768]),
        "encoder_hidden_states": (floats, [-1, 4096]),
        "txt_ids": ("TYPE_FP32", [-1, 3]),
        "img_ids": ("TYPE_FP32", [-1, 3]),
        "noise_pred": (floats, [-1, 64]),
    }
    ensemble = parse_pbtxt(repository / ENSEMBLE / "config.pbtxt")
    public = {t.name: DataType.Name(t.data_type) for t in ensemble.input}
    assert public["timestep"] == "TYPE_FP32" and public["hidden_states"] == floats  # raw timestep on the wire
