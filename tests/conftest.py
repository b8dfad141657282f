"""Fixtures: the embedded tiny models, the full-size random model on a GPU, and real tritonserver
processes on loopback serving each public model (helpers in ``helpers.py``)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, REPOSITORY, Supervised, load_tiny, start_engine_server, start_server

from flux_triton.contract import Step
from flux_triton.deploy.repository import write_repository
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.components import write_tiny_components
from flux_triton.model.presets import TINY_PRESETS, build_random, write_tiny_models
from flux_triton.pipeline.call import reference_call
from flux_triton.serving.settings import MODEL_DIR_ENV

# Fixtures that start a tritonserver (besides the ``*_server`` ones): a test that uses one is a ``server`` test.
SERVER_FIXTURES = {"public_dev", "public_schnell", "supervised", "fleet", "pair", "bare", "roomy", "broken"}
# Fixtures that compile an engine or a model: ``make test-unit`` leaves their tests out with the servers'.
BUILD_FIXTURES = {"aoti_engines", "aoti_fp8_engine"}


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA")
    for item in items:
        names = set(item.fixturenames)
        if names & SERVER_FIXTURES or any(name.endswith("_server") for name in names):
            item.add_marker(pytest.mark.server)
        if names & BUILD_FIXTURES:
            item.add_marker(pytest.mark.build)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """The tiny models and their text encoders and VAE, written once per session through save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    write_tiny_components(root)
    return root


@dataclass
class FullSize:
    """GPU: FLUX.1-dev's architecture with random bf16 weights, a 512x512 step, the fp32 answer of the
    same weights and eager bf16's relative error against it."""

    model: torch.nn.Module
    step: Step
    expected: torch.Tensor
    eager_error: float


@pytest.fixture(scope="module")
def full_size() -> Iterator[FullSize]:
    """Per module: the paths of a module change the model in place."""
    from flux_triton.model.presets import full_size_step
    from flux_triton.pipeline.inputs import rel_l2

    model = build_random()
    model.set_attention_backend("native")  # diffusers keeps the last backend set process-wide
    step = full_size_step("512x512-b1")
    model.float()  # bf16 -> fp32 -> bf16 round-trips exactly
    floats = ("hidden_states", "pooled_projections", "encoder_hidden_states")
    expected = reference_call(model, step.replace(**{name: getattr(step, name).float() for name in floats}))
    model.to(torch.bfloat16)
    yield FullSize(model, step, expected, rel_l2(reference_call(model, step), expected))
    del model
    torch._dynamo.reset()  # compiled blocks hold the model
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_dev(model_root):
    return load_tiny(model_root, "tiny-flux-dev")


@pytest.fixture(scope="session")
def tiny_schnell(model_root):
    return load_tiny(model_root, "tiny-flux-schnell")


# Servers are shared by the whole session: a server's start and stop are most of what a test costs. Tests that
# change a server (special settings, faults, kills) start their own.


@pytest.fixture(scope="session", autouse=True)
def shared_servers() -> Iterator[list]:
    """The session's shared servers, stopped together at its end (each stop is mostly waiting)."""
    servers: list = []
    yield servers
    for server in servers:
        server.process.terminate()
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory, model_root, shared_servers) -> TritonServer:
    """dit_transformer serving tiny-flux-dev (guidance embeddings)."""
    server = start_server(tmp_path_factory.mktemp("dev"), model_root, ["dit_transformer"])
    shared_servers.append(server)
    return server


@pytest.fixture(scope="session")
def schnell_server(tmp_path_factory, model_root, shared_servers) -> TritonServer:
    """dit_transformer serving tiny-flux-schnell (no guidance)."""
    env = {MODEL_DIR_ENV: "tiny-flux-schnell"}
    server = start_server(tmp_path_factory.mktemp("schnell"), model_root, ["dit_transformer"], env)
    shared_servers.append(server)
    return server


@pytest.fixture(scope="session")
def onnx_engines(tmp_path_factory, model_root) -> dict[str, Path]:
    """The default engine (``onnxruntime``, fp32) of each tiny model, exported once per session: {model: sidecar}.
    Tests read them; a test that damages an engine builds its own."""
    from flux_triton.engines.build import build_engine

    engines_dir = tmp_path_factory.mktemp("onnx-engines")
    return {name: build_engine("onnxruntime", name, engines_dir=engines_dir, model_root=model_root, verify=False)
            for name in TINY_PRESETS}  # fmt: skip


@pytest.fixture(scope="session")
def dev_engine_server(tmp_path_factory, model_root, onnx_engines, shared_servers) -> TritonServer:
    """flux_dit over tiny-flux-dev's ONNX Runtime engine."""
    server = start_engine_server(
        tmp_path_factory.mktemp("dev-engine"), model_root, sidecar=onnx_engines["tiny-flux-dev"]
    )
    shared_servers.append(server)
    return server


@pytest.fixture(scope="session")
def schnell_engine_server(tmp_path_factory, model_root, onnx_engines, shared_servers) -> TritonServer:
    """flux_dit over tiny-flux-schnell's ONNX Runtime engine."""
    folder = tmp_path_factory.mktemp("schnell-engine")
    server = start_engine_server(folder, model_root, sidecar=onnx_engines["tiny-flux-schnell"])
    shared_servers.append(server)
    return server


@pytest.fixture(scope="session")
def aoti_engines(tmp_path_factory, model_root) -> dict[str, Path]:
    """The ``aoti`` engine (fp32, CPU) of each tiny model, compiled once per session: {model: sidecar}. The dev one
    with opt-shape packages as on a GPU; the schnell one without, by ``make engine``'s command in another process at
    the same time (each compile is mostly one core's work)."""
    from flux_triton.engines.build import build_engine
    from flux_triton.engines.kinds import kind_named, sidecar_path

    engines_dir = tmp_path_factory.mktemp("aoti-engines")
    command = [sys.executable, "-m", "flux_triton", "engine", "--kind", "aoti", "--model", "tiny-flux-schnell",
               "--engines-dir", str(engines_dir), "--no-repo", "--no-opt-packages"]  # fmt: skip
    # its own Inductor cache: the two builds compile blocks of the same shapes, and sharing one cache folder let one
    # read the other's half-written package files (an empty JSON inside double.pt2)
    cache = tmp_path_factory.mktemp("inductor")
    environment = {**os.environ, MODEL_ROOT_ENV: str(model_root), "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    other = subprocess.Popen(command, cwd=CHECKOUT, env=environment, stdout=subprocess.DEVNULL)
    built = {"tiny-flux-dev": build_engine("aoti", "tiny-flux-dev", engines_dir=engines_dir, model_root=model_root,
                                           opt_packages=True)}  # fmt: skip
    assert other.wait(timeout=600) == 0
    precision = kind_named("aoti").precision(None).name
    return {**built, "tiny-flux-schnell": sidecar_path(engines_dir, "tiny-flux-schnell", precision, "aoti")}


# The public models: what a client may call. The bad-input and load tests run against each.
PUBLIC_MODELS = ("dit_transformer", "flux_dit")


@dataclass
class Served:
    """A public model behind a running server."""

    server: TritonServer
    model: str


@pytest.fixture(scope="session", params=list(PUBLIC_MODELS))
def public_dev(request) -> Served:
    """Each public model serving tiny-flux-dev (guidance embeddings)."""
    server = "dev_engine_server" if request.param == "flux_dit" else "dev_server"
    return Served(request.getfixturevalue(server), request.param)


@pytest.fixture(scope="session", params=list(PUBLIC_MODELS))
def public_schnell(request) -> Served:
    """Each public model serving tiny-flux-schnell (no guidance)."""
    server = "schnell_engine_server" if request.param == "flux_dit" else "schnell_server"
    return Served(request.getfixturevalue(server), request.param)


@pytest.fixture(scope="session")
def supervised(tmp_path_factory, model_root, onnx_engines) -> Iterator[Supervised]:
    """serve over dit_transformer and flux_dit (tiny-flux-dev), probing every second (10 s each at most), a request
    body that pauses 2 s refused."""
    folder = tmp_path_factory.mktemp("supervised")
    repository = folder / "model_repository"
    write_repository(onnx_engines["tiny-flux-dev"], repository, Locations(CHECKOUT))
    shutil.copytree(REPOSITORY / "dit_transformer", repository / "dit_transformer")
    served = Supervised.start(folder, repository, model_root, "--heal-interval", "1", "--probe-timeout", "10",
                              "--body-idle-s", "2")  # fmt: skip
    yield served
    served.stop()


@pytest.fixture
def http_client():
    clients = []

    def connect(server: TritonServer, **kwargs) -> httpclient.InferenceServerClient:
        clients.append(httpclient.InferenceServerClient(server.url, **kwargs))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()
