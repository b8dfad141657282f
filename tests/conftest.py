"""Shared fixtures: the embedded tiny models and real tritonserver processes on loopback."""

from __future__ import annotations

import concurrent.futures
import gc
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient

from flux_triton import model_store
from flux_triton.server import TritonServer, set_parameter

REPO_ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = REPO_ROOT / "model_repository"


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
    model_store.write_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def full_size():
    """GPU only: the FLUX.1-dev transformer with random weights (bf16), its 512x512 step, the fp32
    answer of the same weights, eager bf16's error against it, and the error function. Per module:
    the paths of a module change the model in place."""
    from benchmarks.gpu_bench import rel_l2, step_for
    from benchmarks.random_model import build_model
    from flux_triton import reference

    model = build_model()
    model.set_attention_backend("native")  # diffusers keeps the last backend set process-wide
    step = step_for("512x512-b1")
    model.float()  # bf16 -> fp32 -> bf16 round-trips exactly
    step32 = reference.PipelineStep(**vars(step))
    for name in ("latents", "pooled_prompt_embeds", "prompt_embeds"):
        setattr(step32, name, getattr(step32, name).float())
    expected = reference.diffusers_call(model, step32)
    model.to(torch.bfloat16)
    eager_error = rel_l2(reference.diffusers_call(model, step), expected)
    yield model, step, expected, eager_error, rel_l2
    del model
    torch._dynamo.reset()  # compiled blocks hold the model
    gc.collect()
    torch.cuda.empty_cache()


def load_tiny(model_root: Path, name: str):
    return model_store.load_transformer(model_store.resolve_model_dir(name, model_root), torch.float32, "cpu")


@pytest.fixture(scope="session")
def tiny_dev(model_root):
    return load_tiny(model_root, "tiny-flux-dev")


@pytest.fixture(scope="session")
def tiny_schnell(model_root):
    return load_tiny(model_root, "tiny-flux-schnell")


def start_server(
    tmp_path: Path,
    model_root: Path,
    models: list[str],
    env: dict[str, str] | None = None,
    wait_for: str = "ready",
    parameters: dict[str, dict[str, str]] | None = None,
) -> TritonServer:
    """A tritonserver over a copy of the listed repository models, bound to loopback.
    ``parameters`` sets config parameters per model; ``wait_for="live"`` returns before the
    models are loaded (to check why one does not load)."""
    repository = tmp_path / "model_repository"
    for name in models:
        shutil.copytree(REPOSITORY / name, repository / name, ignore=shutil.ignore_patterns("__pycache__"))
        for key, value in (parameters or {}).get(name, {}).items():
            set_parameter(repository / name / "config.pbtxt", key, value)
    server = TritonServer(
        repository,
        env={model_store.MODEL_ROOT_ENV: str(model_root), **(env or {})},
        log_path=tmp_path / "tritonserver.log",
        cache=REPO_ROOT / ".triton",
        args=["--exit-timeout-secs=5"],
    )
    return server.start(wait_for=wait_for)


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory, model_root) -> Iterator[TritonServer]:
    """dit_transformer serving tiny-flux-dev (guidance embeddings)."""
    server = start_server(tmp_path_factory.mktemp("dev"), model_root, ["dit_transformer"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schnell_server(tmp_path_factory, model_root) -> Iterator[TritonServer]:
    """dit_transformer serving tiny-flux-schnell (no guidance)."""
    env = {model_store.MODEL_DIR_ENV: "tiny-flux-schnell"}
    server = start_server(tmp_path_factory.mktemp("schnell"), model_root, ["dit_transformer"], env)
    yield server
    server.stop()


def start_engine_server(
    folder: Path, model_root: Path, preset: str, kind: str = "onnxruntime", sidecar: Path | None = None
) -> TritonServer:
    """flux_dit over an engine of ``kind`` for ``preset``, built with ``make engine``'s code (or the
    already built ``sidecar``), in a repository generated and checked like ``make repo``."""
    from export.engine import build_engine
    from flux_triton.repository import write_repository
    from flux_triton.repository_check import check_repository

    if sidecar is None:
        sidecar = build_engine(kind, preset, engines_dir=folder / "engines", model_root=model_root, verify=False)
    repository = folder / "model_repository"
    write_repository(sidecar, repository)
    check_repository(repository)
    server = TritonServer(
        repository,
        env={model_store.MODEL_ROOT_ENV: str(model_root)},  # runners that load the source model (aoti)
        log_path=folder / "tritonserver.log",
        cache=REPO_ROOT / ".triton",
        args=["--exit-timeout-secs=5"],
    )
    return server.start()


@pytest.fixture(scope="session")
def aoti_engines(tmp_path_factory, model_root) -> dict[str, Path]:
    """The ``aoti`` engine (fp32, CPU) of each tiny model, compiled once per session: {model: sidecar}."""
    from export.engine import build_engine

    engines_dir = tmp_path_factory.mktemp("aoti-engines")
    return {
        name: build_engine("aoti", name, engines_dir=engines_dir, model_root=model_root)
        for name in model_store.TINY_PRESETS
    }


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
        server = start_server(folder, model_root, ["dit_transformer"], {model_store.MODEL_DIR_ENV: preset})
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


def settled_counts(client: httpclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """``(inference_count, execution_count)`` of ``model`` once they stop moving: the server
    updates its statistics just after it answers, so a read right after a response can lag."""
    previous = None
    for _ in range(40):
        stats = client.get_inference_statistics(model)["model_stats"][0]
        counts = stats["inference_count"], stats["execution_count"]
        if counts == previous:
            return counts
        previous = counts
        time.sleep(0.05)
    return previous


def infer_concurrently(
    server: TritonServer, model: str, wires: list[dict[str, torch.Tensor]], batching_model: str | None = None
) -> tuple[list[torch.Tensor], int, int]:
    """Send ``wires`` at once, each on its own connection, so that the dynamic batcher can merge
    them; returns the results in order, and how many inferences and executions ``batching_model``
    (default ``model``) ran for them."""
    from client.wire import infer_step

    def infer(wire):
        with httpclient.InferenceServerClient(server.url) as client:
            return infer_step(client, model, wire)

    counted = batching_model or model
    with httpclient.InferenceServerClient(server.url) as client:
        before = settled_counts(client, counted)
        with concurrent.futures.ThreadPoolExecutor(len(wires)) as pool:
            results = list(pool.map(infer, wires))
        after = settled_counts(client, counted)
    return results, after[0] - before[0], after[1] - before[1]


@pytest.fixture
def http_client():
    clients = []

    def connect(server: TritonServer, **kwargs) -> httpclient.InferenceServerClient:
        clients.append(httpclient.InferenceServerClient(server.url, **kwargs))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()
