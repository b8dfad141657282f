"""The ``aoti`` engine (torch.export + AOTInductor, fp32 on CPU) for both tiny models: its build
record, the attached engine against diffusers, and flux_dit serving it through a real server.

Tolerance: the compiled blocks are a different program (Inductor's C++ kernels) with the same
fp32 math, so one step is within ``rtol = atol = 1e-5`` of eager diffusers (measured ~3e-7 max
abs), the 4-step schnell loop through the server within 1e-4 of ``FluxPipeline``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import BUSY_SIZE, CHECKOUT, DEV, SCHNELL, infer_concurrently, start_engine_server

from flux_triton.client.wire import infer_step
from flux_triton.contract import validate
from flux_triton.deploy.repository import engine_config
from flux_triton.engines import aoti
from flux_triton.engines.kinds import load_engine
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.engines.sidecar import EngineSidecar, sha256_files
from flux_triton.engines.verify import measure
from flux_triton.pipeline import call, inputs, loop

TOL = {"rtol": 1e-5, "atol": 1e-5}
LOOP_TOL = {"rtol": 1e-4, "atol": 1e-4}
# (batch, height, width, text tokens): inside the tiny profile (batch 1-4, 256-7056 image tokens, 8 text tokens).
CASES = ((1, 256, 256, 8), (2, 256, 384, 8), (3, 512, 512, 8), (4, 768, 512, 8))
SIGNATURES = {"tiny-flux-dev": DEV, "tiny-flux-schnell": SCHNELL}


def test_sidecar_records_the_build_and_round_trips(aoti_engines):
    profile = PROFILE_PRESETS["tiny"]
    for name, path in aoti_engines.items():
        sidecar = EngineSidecar.read(path)
        assert path.name == f"{name}-fp32.aoti.json" and sidecar.engine_file == f"{name}-fp32.aoti"
        assert (sidecar.kind, sidecar.precision, sidecar.source_model) == ("aoti", "fp32", name)
        assert sidecar.device == {"type": "cpu", "gpu": None, "compute_capability": None}
        assert sidecar.build["torch_version"] == torch.__version__
        assert sidecar.dit_signature == SIGNATURES[name]
        assert sidecar.build["aoti_profile"] == {
            "min_batch": profile.batch[0],
            "max_batch": profile.batch[2],
            "min_image_tokens": profile.image_tokens[0],
            "max_image_tokens": profile.image_tokens[2],
            "text_tokens": profile.text_tokens[1],
        }
        assert sidecar.profile["axes"]["text_tokens"] == [8, 8, 8]  # fixed per build
        assert sidecar.shapes["encoder_hidden_states"] == {"min": [1, 8, 32], "opt": [1, 8, 32], "max": [4, 8, 32]}
        limits = sidecar.limits
        assert (limits.max_batch, limits.max_image_tokens, limits.max_text_tokens) == (4, 7056, 8)
        assert set(sidecar.artifacts) == set(sidecar.build["compile_s"]) == {"double", "single"}
        for package in sidecar.artifacts.values():
            assert sha256_files(path.parent / package["file"]) == package["sha256"]
        assert EngineSidecar.read(sidecar.write(path.with_name("copy.json"))) == sidecar
        config = engine_config(sidecar, path.name)  # make repo: a Python-backend runner on the compiled device type
        assert config["backend"] == "python" and config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_attached_engine_matches_diffusers(aoti_engines, model_root, name, tiny_dev, tiny_schnell):
    _, run = load_engine(aoti_engines[name], torch.device("cpu"), model_root)
    blocks = [*run.transformer.transformer_blocks, *run.transformer.single_transformer_blocks]
    assert blocks and all(isinstance(block.forward, aoti.CompiledBlock) for block in blocks), "blocks not attached"
    transformer = tiny_dev if name == "tiny-flux-dev" else tiny_schnell
    for measured in measure(run, transformer, SIGNATURES[name], cases=CASES):
        print(f"aoti vs diffusers ({name}): {measured}")
        assert measured.max_abs < TOL["atol"], measured
    step = inputs.random_step(SIGNATURES[name], text_tokens=16, height=256, width=256)
    with pytest.raises(ValueError, match="compiled for 8 text tokens, got 16"):
        run(validate(step.wire(), SIGNATURES[name]).engine_tensors(SIGNATURES[name]))


def test_runner_refuses_packages_compiled_for_another_device(aoti_engines, model_root):
    path = aoti_engines["tiny-flux-dev"]
    data = json.loads(path.read_text())
    data["device"] = {"type": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    other = path.with_name("tiny-flux-dev-gpu.aoti.json")
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{other}: the aoti engine was built for NVIDIA H100.*runner is on cpu"):
        load_engine(other, torch.device("cpu"), model_root)
    data["device"] = {"type": "cpu", "gpu": None, "compute_capability": None}
    data["artifacts"]["single"]["sha256"] = "0" * 64
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        load_engine(other, torch.device("cpu"), model_root)


def test_cuda_graphs_are_refused_on_the_cpu_and_for_a_runner_that_cannot_be_captured(aoti_engines, model_root):
    path = aoti_engines["tiny-flux-dev"]
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need a CUDA device; this model runs on cpu"):
        load_engine(path, torch.device("cpu"), model_root, cuda_graphs=True)
    onnx = path.with_name("tiny-flux-dev-fp32.onnxruntime-named.json")
    onnx.write_text(json.dumps({**json.loads(path.read_text()), "kind": "onnxruntime"}))
    with pytest.raises(ValueError, match=r"the onnxruntime runner cannot be captured \(only: aoti, aoti-fp8\)"):
        load_engine(onnx, torch.device("cpu"), model_root, cuda_graphs=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_make_engine_aoti_fp8_fails_at_once_on_cpu(tmp_path):
    start = time.monotonic()
    # The Makefile's own recipe, with this virtualenv instead of `uv run` (no sync, no network).
    venv = ["UV=/bin/true", "RUN="]
    result = subprocess.run(
        ["make", "--no-print-directory", "engine", "ENGINE=aoti-fp8", f"ENGINE_ARGS=--engines-dir {tmp_path}", *venv],
        cwd=CHECKOUT,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "PRECISION=fp8 needs an NVIDIA GPU of compute capability 8.9+" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be built before the device check"
    assert time.monotonic() - start < 60


def test_build_refuses_a_compiler_that_links_libstdcxx_statically(tmp_path, tiny_dev):
    """Packages built by a compiler that links libstdc++ statically crash at load: such a compiler
    must stop the build before anything is compiled."""
    compiler = tmp_path / "g++"
    compiler.write_text('#!/bin/sh\nexec g++ "$@" -static-libstdc++\n')
    compiler.chmod(0o755)
    assert aoti.links_libstdcxx_dynamically("g++")
    assert not aoti.links_libstdcxx_dynamically(str(compiler))
    engine_dir = tmp_path / "engine"
    static_compiler = torch._inductor.config.patch({"cpp.cxx": (None, str(compiler))})
    with static_compiler, pytest.raises(RuntimeError, match=r"links libstdc\+\+ statically .* CXX=/usr/bin/g\+\+"):
        aoti.build(tiny_dev, engine_dir, aoti.AotiProfile.preset("tiny"))
    assert not engine_dir.exists()


@pytest.fixture(scope="module")
def dev_aoti_server(tmp_path_factory, model_root, aoti_engines):
    folder = tmp_path_factory.mktemp("dev-aoti")
    server = start_engine_server(folder, model_root, aoti_engines["tiny-flux-dev"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schnell_aoti_server(tmp_path_factory, model_root, aoti_engines):
    folder = tmp_path_factory.mktemp("schnell-aoti")
    server = start_engine_server(folder, model_root, aoti_engines["tiny-flux-schnell"])
    yield server
    server.stop()


@pytest.mark.server
def test_served_single_step_matches_diffusers(dev_aoti_server, http_client, tiny_dev):
    step = inputs.random_step(DEV, batch=1, seed=1, height=256, width=256)
    served = infer_step(http_client(dev_aoti_server), "flux_dit", step.wire())
    torch.testing.assert_close(served, call.reference_call(tiny_dev, step), **TOL)


@pytest.mark.server
def test_served_concurrent_requests_are_merged_and_split_in_order(dev_aoti_server, tiny_dev):
    steps = [
        inputs.random_step(DEV, timestep=100.0 * (i + 1), guidance_scale=1.0 + i, seed=20 + i, **BUSY_SIZE)
        for i in range(6)
    ]
    merged, inferences, executions = infer_concurrently(
        dev_aoti_server, "flux_dit", [s.wire() for s in steps], batching_model="dit_engine"
    )
    assert inferences == len(steps) and executions < inferences, "dit_engine merged no requests"
    for step, result in zip(steps, merged, strict=True):
        torch.testing.assert_close(result, call.reference_call(tiny_dev, step), **TOL)


@pytest.mark.server
def test_served_schnell_loop_matches_flux_pipeline(schnell_aoti_server, http_client, tiny_schnell):
    client = http_client(schnell_aoti_server)
    first = inputs.random_step(SCHNELL, height=256, width=320, guidance_scale=0, seed=5)
    scheduler = loop.make_scheduler("schnell")
    served = loop.denoise(lambda step: infer_step(client, "flux_dit", step.wire()), scheduler, first, 4)
    expected = loop.pipeline_latents(tiny_schnell, "schnell", first, 4, height=256, width=320)
    torch.testing.assert_close(served, expected, **LOOP_TOL)
    assert not torch.allclose(served, first.hidden_states, atol=1e-2)
