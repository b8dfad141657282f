"""What runs without TensorRT: profiles, precisions and builder flags, the sidecar, and the clear
failure of ``make engine ENGINE=tensorrt`` where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import types
from dataclasses import asdict

import pytest
import torch

from export.precision import PRECISIONS, precision_for
from export.profiles import PROFILE_PRESETS, ProfileConfig, image_tokens
from export.tensorrt_build import builder_flag_names, network_flags
from flux_triton.contract import DitSignature
from flux_triton.model_store import FLUX_DEV_CONFIG, REPO_ROOT
from flux_triton.sidecar import EngineSidecar

FLUX_DEV = DitSignature.from_config(FLUX_DEV_CONFIG, torch.bfloat16)
FLUX_SCHNELL = DitSignature.from_config({**FLUX_DEV_CONFIG, "guidance_embeds": False}, torch.bfloat16)


def test_image_tokens_follow_the_pipeline_packing():
    assert image_tokens(256, 256) == 256
    assert image_tokens(1024, 1024) == 4096
    assert image_tokens(1344, 1344) == 84 * 84
    assert image_tokens(512, 768) == 32 * 48


def test_default_profile_shapes_for_flux_dev():
    shapes = PROFILE_PRESETS["default"].shapes(FLUX_DEV)
    assert list(shapes) == [
        "hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids", "img_ids",
    ]  # fmt: skip
    assert shapes["hidden_states"] == {"min": (1, 256, 64), "opt": (1, 4096, 64), "max": (4, 7056, 64)}
    assert shapes["encoder_hidden_states"] == {"min": (1, 512, 4096), "opt": (1, 512, 4096), "max": (4, 512, 4096)}
    assert shapes["img_ids"]["max"] == (4, 7056, 3)
    assert shapes["txt_ids"]["opt"] == (1, 512, 3)
    assert shapes["timestep"] == shapes["guidance"] == {"min": (1, 1), "opt": (1, 1), "max": (4, 1)}
    assert shapes["pooled_projections"]["max"] == (4, 768)


def test_schnell_profile_has_no_guidance_and_profiles_are_adjustable():
    profile = ProfileConfig(batch=(1, 2, 8), max_size=(1024, 1536), text_tokens=(256, 256, 256))
    shapes = profile.shapes(FLUX_SCHNELL)
    assert "guidance" not in shapes
    assert shapes["hidden_states"]["max"] == (8, 64 * 96, 64)
    assert shapes["hidden_states"]["opt"] == (2, 4096, 64)
    assert shapes["encoder_hidden_states"]["min"] == (1, 256, 4096)


@pytest.mark.parametrize(
    "fields", [{"batch": (2, 1, 4)}, {"text_tokens": (0, 1, 1)}, {"min_size": (2048, 2048)}], ids=str
)
def test_inconsistent_profiles_are_rejected(fields):
    with pytest.raises(ValueError, match="profile"):
        ProfileConfig(**fields)


def test_precisions_per_engine_kind():
    assert precision_for("onnxruntime", None).name == "fp32"
    assert precision_for("tensorrt", None).name == "bf16"
    assert precision_for("tensorrt", "fp16").io_dtype == "FP16"
    assert precision_for("tensorrt", "fp8").io_dtype == "BF16"
    assert PRECISIONS["fp8"].quantization == "fp8" and PRECISIONS["fp8"].min_compute_capability == (8, 9)
    with pytest.raises(ValueError, match="not supported by the onnxruntime engine"):
        precision_for("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="unknown engine kind"):
        precision_for("tflite", "fp32")


def test_builder_flags_are_strongly_typed():
    # TensorRT 10.x has the STRONGLY_TYPED creation flag (opt-in); 11.x dropped it (always on).
    trt10 = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    trt11 = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert network_flags(trt10) == 1 << 1
    assert network_flags(trt11) == 0
    for name in ("fp16", "bf16", "fp8"):
        assert builder_flag_names(PRECISIONS[name]) == ()  # precision comes from the ONNX graph
    assert builder_flag_names(PRECISIONS["fp32"]) == ()  # no TF32 unless asked for


def test_sidecar_round_trip_and_limits(tmp_path):
    profile = PROFILE_PRESETS["default"]
    sidecar = EngineSidecar(
        kind="tensorrt",
        precision="bf16",
        engine_file="flux-dev-bf16.plan",
        source_model="flux-dev",
        signature=asdict(FLUX_DEV),
        profile=profile.describe(),
        shapes={k: {lvl: list(s) for lvl, s in v.items()} for k, v in profile.shapes(FLUX_DEV).items()},
        onnx_file="flux-dev-bf16.onnx",
        onnx_sha256="0" * 64,
        tensorrt_version="10.13.0",
        gpu="NVIDIA H100",
        compute_capability="9.0",
    )
    read = EngineSidecar.read(sidecar.write(tmp_path / "flux-dev-bf16.tensorrt.json"))
    assert read == sidecar
    assert read.dit_signature == FLUX_DEV
    assert (read.limits.max_batch, read.limits.max_image_tokens, read.limits.max_text_tokens) == (4, 7056, 512)
    # Sidecars written before the AOTI fields existed stay readable.
    legacy = {k: v for k, v in asdict(sidecar).items() if k not in ("device_type", "torch_version", "packages")}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert EngineSidecar.read(tmp_path / "legacy.json") == sidecar
    (tmp_path / "broken.json").write_text('{"kind": "tensorrt"}')
    with pytest.raises(ValueError, match="lacks"):
        EngineSidecar.read(tmp_path / "broken.json")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_make_engine_tensorrt_fails_at_once_without_tensorrt(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "export.engine", "--kind", "tensorrt", "--engines-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "needs TensorRT" in result.stderr and "nvcr.io/nvidia/tritonserver" in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be exported before the TensorRT check"
    assert time.monotonic() - start < 60


def test_runner_loaders_are_chosen_by_the_sidecar_kind(tmp_path):
    from flux_triton.engines import LOADERS, load_engine, register

    profile = PROFILE_PRESETS["tiny"]
    signature = DitSignature(in_channels=4, pooled_dim=32, text_dim=32, guidance_embeds=False, dtype="FP32")
    (tmp_path / "tiny.pt2").write_bytes(b"compiled")
    sidecar = EngineSidecar(
        kind="example-kind",
        precision="fp32",
        engine_file="tiny.pt2",
        source_model="tiny-flux-schnell",
        signature=asdict(signature),
        profile=profile.describe(),
        shapes={},
        onnx_file="tiny.onnx",
        onnx_sha256="0" * 64,
    )
    path = sidecar.write(tmp_path / "tiny.example-kind.json")
    with pytest.raises(ValueError, match="engine kind 'example-kind' has no loader"):
        load_engine(path, torch.device("cpu"))

    @register("example-kind")
    def load_scaled(engine_path, device, sidecar_path):
        assert sidecar_path == path
        scale = len(engine_path.read_bytes())
        return lambda tensors: tensors["hidden_states"] * scale

    try:
        loaded, run = load_engine(path, torch.device("cpu"))
        assert loaded.kind == "example-kind"
        assert torch.equal(run({"hidden_states": torch.ones(1, 2, 4)}), torch.full((1, 2, 4), 8.0))
    finally:
        del LOADERS["example-kind"]
    assert "onnxruntime" in LOADERS
