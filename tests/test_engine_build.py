"""What runs without TensorRT: profiles, precisions and builder flags, the sidecar, and the clear
failure of ``make engine ENGINE=tensorrt`` where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import types

import pytest
import torch
from helpers import CHECKOUT

from flux_triton.contract import DitSignature
from flux_triton.engines.kinds import KINDS, kind_named
from flux_triton.engines.precision import PRECISIONS
from flux_triton.engines.profiles import PROFILE_PRESETS, ProfileConfig
from flux_triton.engines.sidecar import EngineSidecar
from flux_triton.engines.tensorrt_engine import builder_flag_names, network_flags
from flux_triton.model.presets import FLUX_DEV_CONFIG
from flux_triton.pipeline.inputs import image_tokens

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
    assert kind_named("onnxruntime").precision().name == "fp32"
    assert kind_named("tensorrt").precision().name == "bf16"
    assert kind_named("tensorrt").precision("fp16").io_dtype == "FP16"
    assert kind_named("tensorrt").precision("fp8").io_dtype == "BF16"
    assert kind_named("aoti-fp8").precision().name == "fp8"
    assert (
        kind_named("aoti").default_precision("cuda") == "bf16" and kind_named("aoti").default_precision("cpu") == "fp32"
    )
    assert PRECISIONS["fp8"].quantization == "fp8" and PRECISIONS["fp8"].min_compute_capability == (8, 9)
    with pytest.raises(ValueError, match=r"not supported by the onnxruntime engine \(only: fp32\)"):
        kind_named("onnxruntime").precision("bf16")
    with pytest.raises(ValueError, match="unknown engine kind"):
        kind_named("tflite")


def test_every_kind_is_one_complete_entry():
    """A kind's entry names an importable module with build() (and load() where this runner serves it)."""
    for kind in KINDS.values():
        module = kind.implementation()
        assert callable(module.build), kind.name
        assert (kind.platform == "python") == callable(getattr(module, "load", None)), kind.name
        assert all(name in PRECISIONS for name in kind.precisions if name != "device"), kind.name


def test_makefile_asks_the_package_for_defaults():
    """No kind, precision or platform is spelled out in the Makefile."""
    makefile = (CHECKOUT / "Makefile").read_text()
    for word in (*KINDS, *PRECISIONS, "tensorrt_plan"):
        assert word not in makefile, word


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
    sidecar = EngineSidecar.for_build(
        "tensorrt",
        "bf16",
        "flux-dev-bf16.plan",
        "flux-dev",
        FLUX_DEV,
        profile,
        FLUX_DEV_CONFIG,
        artifacts={"plan": {"file": "flux-dev-bf16.plan", "sha256": "0" * 64}},
        device={"type": "cuda", "gpu": "NVIDIA H100", "compute_capability": "9.0"},
        build={"tensorrt_version": "10.13.0"},
    )
    read = EngineSidecar.read(sidecar.write(tmp_path / "flux-dev-bf16.tensorrt.json"))
    assert read == sidecar
    assert read.dit_signature == FLUX_DEV
    assert (read.limits.max_batch, read.limits.max_image_tokens, read.limits.max_text_tokens) == (4, 7056, 512)
    (tmp_path / "broken.json").write_text('{"kind": "tensorrt"}')
    with pytest.raises(ValueError, match="lacks"):
        EngineSidecar.read(tmp_path / "broken.json")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_make_engine_tensorrt_fails_at_once_without_tensorrt(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "flux_triton", "engine", "--kind", "tensorrt", "--engines-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "needs TensorRT" in result.stderr and "nvcr.io/nvidia/tritonserver" in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be exported before the TensorRT check"
    assert time.monotonic() - start < 60


def test_the_runner_refuses_kinds_it_does_not_serve(tmp_path):
    from flux_triton.engines.kinds import load_engine

    signature = DitSignature(in_channels=4, pooled_dim=32, text_dim=32, guidance_embeds=False, dtype="FP32")
    (tmp_path / "tiny.plan").write_bytes(b"plan")
    for kind in ("tensorrt", "example-kind"):
        sidecar = EngineSidecar.for_build(kind, "fp32", "tiny.plan", "tiny-flux-schnell", signature,
                                          PROFILE_PRESETS["tiny"], {})  # fmt: skip
        path = sidecar.write(tmp_path / f"tiny.{kind}.json")
        with pytest.raises(ValueError, match=f"engine kind '{kind}' has no loader in this runner"):
            load_engine(path, torch.device("cpu"), tmp_path)


def test_engine_files_keep_dotted_model_names(tmp_path):
    from flux_triton.engines.build import BuildJob
    from flux_triton.engines.kinds import sidecar_path

    for kind, suffix in (("aoti", ".aoti"), ("tensorrt", ".plan"), ("onnxruntime", ".onnx")):
        path = sidecar_path(tmp_path, "FLUX.1-dev", "bf16", kind)
        job = BuildJob(KINDS[kind], "FLUX.1-dev", PRECISIONS["bf16"], PROFILE_PRESETS["default"], path, tmp_path)
        assert path.name == f"FLUX.1-dev-bf16.{kind}.json"
        assert job.engine_path(suffix) == tmp_path / f"FLUX.1-dev-bf16{suffix}"


def test_every_profile_builds_a_fixed_dimension_included(tmp_path, model_root, tiny_dev):
    """A profile dimension whose minimum is its maximum (``--max-batch 1``, one image size) is a static dimension
    of the AOTI export (``torch.export.Dim`` refuses an empty range), and the ONNX engine of such a profile is
    built and verified within it."""
    from flux_triton.engines.aoti import BLOCK_KINDS, AotiProfile, export_block
    from flux_triton.engines.build import build_engine

    for profile in (AotiProfile(1, 1, 16, 4096, 8), AotiProfile(2, 2, 256, 256, 8), AotiProfile(1, 1, 256, 256, 8)):
        for kind in BLOCK_KINDS:
            exported = export_block(tiny_dev, kind, profile)
            assert exported.module()  # exported, without "Cannot create Dim with inconsistent min ..."
    fixed = ProfileConfig(batch=(1, 1, 1), min_size=(256, 256), opt_size=(256, 256), max_size=(256, 256),
                          text_tokens=(8, 8, 8))  # fmt: skip
    sidecar = EngineSidecar.read(build_engine("onnxruntime", "tiny-flux-dev", profile=fixed, engines_dir=tmp_path,
                                              model_root=model_root))  # fmt: skip
    assert sidecar.limits.max_batch == 1
    assert [line.split(":")[0] for line in sidecar.build["verification"]] == ["B=1 256x256 S=8"]  # within it


def test_engine_options_of_another_kind_or_precision_are_refused_before_anything_is_built(tmp_path):
    from flux_triton.deploy.commands import engine

    common = ["--engines-dir", str(tmp_path), "--no-repo"]
    with pytest.raises(SystemExit, match="--opt-packages: opt-shape packages are for the aoti kinds, not onnxruntime"):
        engine(["--kind", "onnxruntime", "--opt-packages", *common])
    with pytest.raises(SystemExit, match="--fp8-scales: static scales are for PRECISION fp8, not fp32"):
        engine(["--kind", "aoti", "--fp8-scales", "fp8_scales.safetensors", *common])
    assert list(tmp_path.iterdir()) == []
