"""The ``aoti`` engine (torch.export + AOTInductor, fp32 on CPU) for both tiny models: its build
record, the attached engine against diffusers, and flux_dit serving it through a real server.

Tolerance: the compiled blocks are a different program (Inductor's C++ kernels) with the same
fp32 math, so one step is within ``rtol = atol = 1e-5`` of eager diffusers (measured ~3e-7 max
abs), the 4-step schnell loop through the server within 1e-4 of ``FluxPipeline``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    BUSY_SIZE,
    CHECKOUT,
    DEV,
    SCHNELL,
    embeds,
    fp8_on_cpu,
    generate,
    infer_concurrently,
    load_tiny,
    start_engine_server,
)
from tritonclient.utils import InferenceServerException

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.contract import InputError, validate
from flux_triton.contract.protocol import END, START, SequenceStep
from flux_triton.deploy.repository import engine_config, write_repository
from flux_triton.engines import aoti, aoti_engine
from flux_triton.engines.build import BuildJob
from flux_triton.engines.kinds import kind_named, load_engine, sidecar_path
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.engines.sidecar import EngineSidecar, sha256_files
from flux_triton.engines.verify import measure
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.fp8 import Float8Linear
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, ScalesError, calibrate, load_scales, save_scales
from flux_triton.model.speedups import Speedups, load_with_speedups
from flux_triton.pipeline import call, inputs, loop
from flux_triton.pipeline.caching import build_cache
from flux_triton.serving import caching
from flux_triton.serving.engine_service import EngineService
from flux_triton.serving.settings import EngineSettings

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
        opt = name == "tiny-flux-dev"  # built with opt-shape packages (on a GPU by default), schnell without
        assert sidecar.build["opt_shape"] == ([profile.batch[1], profile.image_tokens[1]] if opt else None)
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
        kinds = {"double", "single"} | ({"double-opt", "single-opt"} if opt else set())
        assert set(sidecar.artifacts) == set(sidecar.build["compile_s"]) == kinds
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


def test_a_step_of_the_opt_shape_runs_its_own_packages_and_any_other_the_dynamic_ones(aoti_engines, model_root,
                                                                                        tiny_dev):  # fmt: skip
    """The dev engine has opt-shape packages: a step of the tiny profile's opt shape (1024² b1) runs them in every
    block, any other step the profile-wide ones; each within TOL of diffusers."""
    _, run = load_engine(aoti_engines["tiny-flux-dev"], torch.device("cpu"), model_root)
    blocks = [*run.transformer.transformer_blocks, *run.transformer.single_transformer_blocks]
    calls = collections.Counter()

    def counted(runner, name: str):
        return lambda *args: (calls.update([name]), runner(*args))[1]

    for block in blocks:
        for attribute in ("runner", "opt_runner"):
            assert getattr(block.forward, attribute) is not None, attribute
            setattr(block.forward, attribute, counted(getattr(block.forward, attribute), attribute))
    cases = (((1, 1024, 1024, 8), "opt_runner"), ((1, 512, 512, 8), "runner"), ((2, 1024, 1024, 8), "runner"))
    for case, used in cases:
        calls.clear()
        (measured,) = measure(run, tiny_dev, DEV, cases=(case,))
        assert measured.max_abs < TOL["atol"], measured
        assert calls == {used: len(blocks)}, case


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
    """flux_dit over the dev engine, serving MagCache: a stateless step (and a sequence without the cache) runs
    every block, as without it."""
    folder = tmp_path_factory.mktemp("dev-aoti")
    server = start_engine_server(folder, model_root, aoti_engines["tiny-flux-dev"], cache="mag")
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


@pytest.mark.server
def test_engine_steps_of_magcache_sequences_in_lockstep_share_one_forward(aoti_engines, model_root):
    """In process: two cached sequences whose steps come in one batch at the same step count run one forward of
    both (their states side by side, then each given its rows back), each answer within fp32 rounding of the same
    sequence run alone; a sequence a step ahead of another runs alone."""
    sidecar, engine = load_engine(aoti_engines["tiny-flux-dev"], torch.device("cpu"), model_root)
    service = EngineService(EngineSettings(engine="unused", cache="mag"), sidecar, engine)
    batches = []
    engine.transformer.register_forward_pre_hook(lambda _m, _a, call: batches.append(call["hidden_states"].shape[0]),
                                                 with_kwargs=True)  # fmt: skip
    wires = [inputs.random_step(DEV, height=256, width=256, timestep=t, seed=5).wire() for t in (1000.0, 950.0)]
    steps = [validate(wire, DEV).engine_tensors(DEV) for wire in wires]
    start = {"session_key": "k", "cache": json.dumps({"kind": "mag"})}

    def batch(ids: tuple[int, ...], index: int) -> list:
        return service.run([(steps[index], SequenceStep.from_flags(i, START if index == 0 else 0, start)) for i in ids])

    together = [batch((6, 7), index) for index in range(2)]
    alone = [batch((8,), index) for index in range(2)]
    assert batches == [2, 2, 1, 1]
    for index in range(2):
        torch.testing.assert_close(together[index][0], alone[index][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[index][1], alone[index][0], rtol=1e-5, atol=1e-5)
    batches.clear()
    ahead = service.run([(steps[1], SequenceStep.from_flags(6, 0, start)),
                         (steps[0], SequenceStep.from_flags(9, START, start))])  # fmt: skip
    assert batches == [1, 1] and all(isinstance(answer, torch.Tensor) for answer in ahead)


def test_a_served_cached_loop_matches_local_diffusers_with_the_same_cache(dev_aoti_server, model_root):
    """diffusers' MagCache around the compiled blocks: its skips follow the schedule, so the served loop takes the
    same skips as local diffusers and stays within the engine's loop tolerance of it, far from the uncached loop."""
    config = build_cache({"kind": "mag"})
    kwargs = dict(num_inference_steps=28, guidance_scale=3.5, size=256, **embeds(31))
    local = load_tiny(model_root, "tiny-flux-dev")
    uncached = generate(local, "dev", seed=31, **kwargs)
    local.enable_cache(config)
    expected = generate(local, "dev", seed=31, **kwargs)
    with RemoteFluxTransformer(url=dev_aoti_server.url, model_name="flux_dit") as remote:
        remote.enable_cache(config)
        served = generate(remote, "dev", seed=31, **kwargs)
        again = generate(remote, "dev", seed=31, **kwargs)  # a second generation starts from a clean cache
        remote.disable_cache()
        served_uncached = generate(remote, "dev", seed=31, **kwargs)
    torch.testing.assert_close(served, expected, **LOOP_TOL)
    torch.testing.assert_close(again, expected, **LOOP_TOL)
    torch.testing.assert_close(served_uncached, uncached, **LOOP_TOL)
    assert (expected - uncached).abs().max() > 10 * LOOP_TOL["atol"], "the cache skipped nothing"  # ~6e-3


@pytest.mark.server
def test_a_sequence_asking_for_another_cache_is_refused_by_flux_dit(dev_aoti_server, http_client):
    step = inputs.random_step(DEV, height=256, width=256, seed=3)
    client = http_client(dev_aoti_server)
    other = json.dumps({"kind": "taylorseer"})
    with pytest.raises(InferenceServerException, match=r'cache: this model caches with \{"kind": "mag"'):
        infer_step(client, "flux_dit", step.wire(), sequence=SequenceStep(51, start=True, key="k", cache=other))
    infer_step(client, "flux_dit", step.wire(), sequence=SequenceStep(51, start=True, end=True, key="k"))


def test_engine_cache_state_is_dropped_when_its_sequence_ends_fails_or_is_reclaimed(aoti_engines, model_root):
    """In process: the hooks' state per context as cached sequences end, fail and are reclaimed; a reclaimed
    sequence's next step is refused, not run uncached."""
    sidecar, engine = load_engine(aoti_engines["tiny-flux-dev"], torch.device("cpu"), model_root)
    settings = EngineSettings(engine="unused", cache="mag", max_sessions=2)
    service = EngineService(settings, sidecar, engine)
    step = validate(inputs.random_step(DEV, height=256, width=256, seed=5).wire(), DEV).engine_tensors(DEV)
    cache = json.dumps({"kind": "mag"})

    def run(sequence_id: int, flags: int, tensors=None):
        parameters = {"session_key": "k", "cache": cache if flags & START else ""}
        return service.run([(tensors or step, SequenceStep.from_flags(sequence_id, flags, parameters))])[0]

    for sequence_id in (1, 2):
        assert isinstance(run(sequence_id, START), torch.Tensor)
    assert caching.live_contexts(engine.transformer) == {"1", "2"}
    run(1, END)
    bad = {**step, "timestep": torch.tensor([float("nan")])}
    assert isinstance(run(2, 0, bad), Exception)  # a failed step
    assert caching.live_contexts(engine.transformer) == set()
    for sequence_id in (3, 4, 5):  # past max_sessions: the least recently used is reclaimed
        run(sequence_id, START)
    assert caching.live_contexts(engine.transformer) == {"4", "5"}
    refused = run(3, 0)
    assert isinstance(refused, InputError) and "sequence 3: its step cache state is unknown or expired" in str(refused)
    assert isinstance(run(3, START), torch.Tensor)  # a START takes it up again
    uncached = service.run([(step, SequenceStep())])[0]  # a stateless step computes every block, keeps no state
    assert caching.live_contexts(engine.transformer) == {"3", "5"}
    with caching.cache_context(engine.transformer, None):
        assert torch.equal(uncached, engine(step))


def test_a_cache_is_refused_for_an_engine_that_is_one_graph(aoti_engines, tmp_path):
    path = aoti_engines["tiny-flux-dev"]
    onnx = path.with_name("tiny-flux-dev-fp32.onnxruntime-cached.json")
    onnx.write_text(json.dumps({**json.loads(path.read_text()), "kind": "onnxruntime"}))
    with pytest.raises(ValueError, match="the onnxruntime engine is one compiled graph"):
        write_repository(onnx, tmp_path / "repository", Locations(CHECKOUT), "mag")
    # with a cache, the hooked blocks are captured, not the whole step
    assert not EngineSettings(engine="e.json", cache="mag", cuda_graphs=True).whole_step_graphs
    assert EngineSettings(engine="e.json", cuda_graphs=True).whole_step_graphs


@pytest.fixture(scope="module")
def aoti_fp8_engine(tmp_path_factory, model_root):
    """An ``aoti-fp8`` engine of tiny-flux-dev compiled on the CPU (``make engine`` builds FP8 kinds only on an FP8
    GPU; the pinned torch runs FP8 GEMMs on the CPU too), its model folder a copy without a scales file, which the
    build calibrates: ``(sidecar, model root)``."""
    root = tmp_path_factory.mktemp("fp8-models")
    shutil.copytree(store.resolve_model_dir("tiny-flux-dev", model_root), root / "tiny-flux-dev")
    kind = kind_named("aoti-fp8")
    precision = kind.precision(None)
    path = sidecar_path(root / "engines", "tiny-flux-dev", precision.name, kind.name)
    path.parent.mkdir()
    job = BuildJob(kind, "tiny-flux-dev", precision, PROFILE_PRESETS["tiny"], path, root)
    return aoti_engine.build(job, torch.device("cpu")), root


@fp8_on_cpu
def test_the_fp8_engine_runs_static_scales_and_fast_accumulation(aoti_fp8_engine):
    """The fastest FP8 recipe (``dit_transformer``'s): the scales the build calibrated into the model folder,
    recorded by sha256, loaded into every FP8 linear, with fast accumulation; the step as the eager recipe's."""
    path, root = aoti_fp8_engine
    sidecar = EngineSidecar.read(path)
    scales_path = root / "tiny-flux-dev" / SCALES_FILE
    recorded = sidecar.build["fp8_scales"]
    assert recorded["file"] == SCALES_FILE and recorded["sha256"] == sha256_files(scales_path)
    assert recorded["calibrated_s"] is not None, "the build did not calibrate the missing file"
    assert sidecar.build["speedups"] | {"fp8_scales": SCALES_FILE, "fp8_fast_accum": True} == sidecar.build["speedups"]
    _, run = load_engine(path, torch.device("cpu"), root)
    scales = load_scales(scales_path, store.load_transformer(root / "tiny-flux-dev", torch.float32, "cpu"))
    linears = {name: m for name, m in run.transformer.named_modules() if isinstance(m, Float8Linear)}
    assert linears.keys() == scales.keys()
    assert all(m.fast_accum and m.input_scale.item() == scales[name] for name, m in linears.items())
    signature = sidecar.dit_signature
    step = inputs.random_step(signature, 1, 256, 256, 8, 700.0, seed=3)
    eager_speedups = Speedups(**sidecar.build["speedups"])
    eager = load_with_speedups(root / "tiny-flux-dev", signature.torch_dtype, torch.device("cpu"), eager_speedups)
    served = run(validate(step.wire(), signature).engine_tensors(signature))
    torch.testing.assert_close(served, call.transformer_call(eager, step), rtol=1e-2, atol=1e-2)  # bf16: ~1 ulp


@fp8_on_cpu
def test_the_fp8_engine_refuses_scales_it_was_not_built_with(aoti_fp8_engine, model_root, tmp_path):
    path, root = aoti_fp8_engine
    folder = tmp_path / "tiny-flux-dev"
    shutil.copytree(root / "tiny-flux-dev", folder)
    sidecar = tmp_path / "engines" / path.name
    shutil.copytree(path.parent, sidecar.parent)
    dev, schnell = load_tiny(model_root, "tiny-flux-dev"), load_tiny(model_root, "tiny-flux-schnell")
    small = Calibration(shapes=((64, 64, 1),), timesteps=(500.0,), seeds=(0,), text_tokens=8)
    save_scales(folder / SCALES_FILE, calibrate(dev, small), dev.config, small)  # recalibrated: another file
    with pytest.raises(ScalesError, match=r"is not the file the engine was built with .* rebuild the engine"):
        load_engine(sidecar, torch.device("cpu"), tmp_path)
    save_scales(folder / SCALES_FILE, calibrate(schnell, small), schnell.config, small)  # another model's
    data = json.loads(sidecar.read_text())
    data["build"]["fp8_scales"]["sha256"] = sha256_files(folder / SCALES_FILE)
    sidecar.write_text(json.dumps(data))
    with pytest.raises(ScalesError, match="was calibrated for another model"):
        load_engine(sidecar, torch.device("cpu"), tmp_path)
    (folder / SCALES_FILE).unlink()
    with pytest.raises(ScalesError, match="which the engine was built with, is missing"):
        load_engine(sidecar, torch.device("cpu"), tmp_path)


def test_a_cached_engine_refuses_a_step_whose_start_it_has_not_seen(aoti_engines, model_root):
    """In process: an engine loaded again (or reached by a step whose START another instance ran) knows neither the
    sequence's cache state nor whether it chose one; its step is refused ("unknown or expired": the client starts
    the sequence again), not run uncached. A sequence that chose no cache goes on uncached."""
    sidecar, engine = load_engine(aoti_engines["tiny-flux-dev"], torch.device("cpu"), model_root)
    step = validate(inputs.random_step(DEV, height=256, width=256, seed=5).wire(), DEV).engine_tensors(DEV)
    cache = json.dumps({"kind": "mag"})

    def run(service: EngineService, sequence_id: int, flags: int, cached: bool = True):
        parameters = {"session_key": "k", "cache": cache if flags & START and cached else ""}
        return service.run([(step, SequenceStep.from_flags(sequence_id, flags, parameters))])[0]

    first = EngineService(EngineSettings(engine="unused", cache="mag"), sidecar, engine)
    answers = [run(first, 1, START), run(first, 2, START, cached=False), run(first, 2, 0)]  # 2: uncached, as chosen
    assert all(isinstance(answer, torch.Tensor) for answer in answers)
    run(first, 1, END), run(first, 2, END)
    _, reloaded = load_engine(aoti_engines["tiny-flux-dev"], torch.device("cpu"), model_root)
    again = EngineService(EngineSettings(engine="unused", cache="mag"), sidecar, reloaded)  # the model loaded again
    for service, sequence_id in ((first, 1), (first, 2), (again, 3)):
        refused = run(service, sequence_id, 0)
        assert isinstance(refused, InputError), sequence_id
        assert "its step cache state is unknown or expired (this instance has not seen its START" in str(refused)
    assert isinstance(run(again, 3, START), torch.Tensor) and isinstance(run(again, 3, 0), torch.Tensor)
