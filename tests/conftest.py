"""Fixtures: the embedded tiny models, the full-size random model on a GPU, and real tritonserver
processes on loopback serving each public model (helpers in ``helpers.py``)."""

from __future__ import annotations

import gc
import shutil
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
from flux_triton.locations import Locations
from flux_triton.model.presets import TINY_PRESETS, build_random, write_tiny_models
from flux_triton.pipeline.call import reference_call
from flux_triton.serving.service import MODEL_DIR_ENV


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """The tiny models, written once per session through save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
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


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory, model_root) -> Iterator[TritonServer]:
    """dit_transformer serving tiny-flux-dev (guidance embeddings)."""
    server = start_server(tmp_path_factory.mktemp("dev"), model_root, ["dit_transformer"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schnell_server(tmp_path_factory, model_root) -> Iterator[TritonServer]:
    """dit_transformer serving tiny-flux-schnell (no guidance)."""
    env = {MODEL_DIR_ENV: "tiny-flux-schnell"}
    server = start_server(tmp_path_factory.mktemp("schnell"), model_root, ["dit_transformer"], env)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def aoti_engines(tmp_path_factory, model_root) -> dict[str, Path]:
    """The ``aoti`` engine (fp32, CPU) of each tiny model, compiled once per session: {model: sidecar}."""
    from flux_triton.engines.build import build_engine

    engines_dir = tmp_path_factory.mktemp("aoti-engines")
    return {name: build_engine("aoti", name, engines_dir=engines_dir, model_root=model_root) for name in TINY_PRESETS}


# The public models: what a client may call. The bad-input and load tests run against each.
PUBLIC_MODELS = ("dit_transformer", "flux_dit")


@dataclass
class Served:
    """A public model behind a running server."""

    server: TritonServer
    model: str


def _serve_public(request, tmp_path_factory, model_root, preset: str) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "flux_dit":
        server = start_engine_server(folder, model_root, preset)
    else:
        server = start_server(folder, model_root, ["dit_transformer"], {MODEL_DIR_ENV: preset})
    yield Served(server, request.param)
    server.stop()


@pytest.fixture(scope="module", params=list(PUBLIC_MODELS))
def public_dev(request, tmp_path_factory, model_root) -> Iterator[Served]:
    """Each public model serving tiny-flux-dev (guidance embeddings)."""
    yield from _serve_public(request, tmp_path_factory, model_root, "tiny-flux-dev")


@pytest.fixture(scope="module", params=list(PUBLIC_MODELS))
def public_schnell(request, tmp_path_factory, model_root) -> Iterator[Served]:
    """Each public model serving tiny-flux-schnell (no guidance)."""
    yield from _serve_public(request, tmp_path_factory, model_root, "tiny-flux-schnell")


@pytest.fixture(scope="session")
def supervised(tmp_path_factory, model_root) -> Iterator[Supervised]:
    """serve over dit_transformer and flux_dit (tiny-flux-dev), probing every second (10 s each at most), a request
    body that pauses 2 s refused."""
    from flux_triton.engines.build import build_engine

    folder = tmp_path_factory.mktemp("supervised")
    sidecar = build_engine("onnxruntime", "tiny-flux-dev", engines_dir=folder / "engines", model_root=model_root,
                           verify=False)  # fmt: skip
    repository = folder / "model_repository"
    write_repository(sidecar, repository, Locations(CHECKOUT))
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
