"""One settings schema per Triton model (``flux_triton/serving/settings.py``): the shipped configs list every
parameter of their schema, at its default (``dit_transformer``) or as ``make repo`` writes it (the ensemble's
models), and read back as the settings that wrote them; bad values and combinations are refused at load, naming
the setting."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from helpers import REPOSITORY

from flux_triton.deploy.pbtxt import parse_pbtxt
from flux_triton.model.speedups import Speedups
from flux_triton.serving.settings import (
    MODEL_DIR_ENV,
    SCHEMAS,
    TRITON_PARAMETERS,
    PreprocessSettings,
    TransformerSettings,
    check_cache_instances,
    check_prompt_instances,
    instance_count,
)


def shipped(model: str) -> dict:
    return json_format.MessageToDict(parse_pbtxt(REPOSITORY / model / "config.pbtxt"), preserving_proto_field_name=True)


def parameters(config: dict) -> dict[str, str]:
    own = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    return {key: value for key, value in own.items() if key not in TRITON_PARAMETERS}


@pytest.mark.parametrize("model", list(SCHEMAS))
def test_every_shipped_config_holds_exactly_its_schema(model):
    config, schema = shipped(model), SCHEMAS[model]
    settings = schema.from_config(config, environment=False)
    assert parameters(config).keys() == settings.parameters().keys()
    written = {key: {"string_value": value} for key, value in settings.parameters().items()}
    rewritten = {"max_batch_size": config.get("max_batch_size"), "parameters": written}
    assert schema.from_config(rewritten, environment=False) == settings  # the writer and the reader agree
    if model == "dit_transformer":  # hand-written: every setting at its default
        assert settings == TransformerSettings()


def test_the_environment_overrides_the_model_folder(monkeypatch):
    monkeypatch.setenv(MODEL_DIR_ENV, "FLUX.1-dev")
    assert TransformerSettings.from_config(shipped("dit_transformer")).model_dir == "FLUX.1-dev"
    assert TransformerSettings.from_config(shipped("dit_transformer"), environment=False).model_dir == "tiny-flux-dev"


BAD = {
    "max_sessions": ("many", "max_sessions parameter: expected int, got 'many'"),
    "fp8": ("maybe", "fp8 parameter: expected true or false, got 'maybe'"),
    "dtype": ("int8", "dtype parameter: expected one of auto, bfloat16, float32, float16, got 'int8'"),
    "max_image_tokens": ("0", "max_image_tokens parameter: expected 1 or more, got 0"),
    "cache": ("pyramid", "cache parameter: cache kind 'pyramid' is not served"),
    "parallel": ("tensor", "parallel: expected none or one of ulysses, ring, usp, got 'tensor'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_value_is_refused_naming_the_setting(name):
    value, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        TransformerSettings.from_parameters({name: value})


def test_bad_combinations_are_refused_naming_both_settings():
    for values, message in [
        ({"cache": "mag", "compile": "full"}, "cache and compile full"),
        ({"parallel": "ring", "parallel_degree": "2"}, "parallel ring: ring attention needs"),
        ({"fp8_scales": "scales.safetensors"}, "static activation scales are for fp8 true"),
    ]:
        with pytest.raises(ValueError, match=message):
            TransformerSettings.from_parameters(values)
    with pytest.raises(ValueError, match="min_image_tokens 8 and max_image_tokens 4"):
        PreprocessSettings(min_image_tokens=8, max_image_tokens=4)


def test_the_speedups_are_parameters_of_their_own():
    settings = TransformerSettings.from_parameters({"attention_backend": "_native_cudnn", "compile": "regional"})
    assert settings.speedups == Speedups("_native_cudnn", compile="regional")
    assert settings.parameters()["compile"] == "regional" and "speedups" not in settings.parameters()


def test_a_step_cache_and_held_prompts_are_served_from_one_instance():
    gpus = {"instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}], "name": "dit_engine"}
    cases = [({}, 1), (gpus, 2), ({"instance_group": [{"kind": "KIND_MODEL", "count": 1}]}, 1),
             ({"instance_group": [{"kind": "KIND_CPU", "count": 3}]}, 3)]  # fmt: skip
    assert [instance_count(config) for config, _ in cases] == [count for _, count in cases]
    with pytest.raises(ValueError, match=r"cache mag and instance_group: .* dit_engine's instance_group starts 2"):
        check_cache_instances(gpus, "mag")
    check_cache_instances(gpus, "none")  # without a cache, any instances
    check_cache_instances({"instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [0]}]}, "mag")
    with pytest.raises(
        ValueError, match=r"hold_prompts true and instance_group: .* dit_engine's instance_group starts"
    ):
        check_prompt_instances(gpus, True)
    check_prompt_instances(gpus, False)
