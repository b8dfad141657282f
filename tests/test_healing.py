"""A model whose Python-backend stub died (killed, out of memory) keeps Triton's ready endpoints at 200
but fails every request. ``python -m flux_triton serve`` probes every model with a real inference and
reloads the ones that fail: a test kills stubs under it and gets correct answers again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, DEV, REPOSITORY, step_call, stub_pids
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import ADMIN_HEADER, ADMIN_KEY_ENV, RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.deploy import health
from flux_triton.deploy.repository import write_repository
from flux_triton.deploy.server import free_port
from flux_triton.engines.build import build_engine
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.pipeline import call, inputs

pytestmark = pytest.mark.server
HEALED_WITHIN_S = 60  # probe interval 1 s, plus reloading a tiny model


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, model_root):
    """``python -m flux_triton serve`` over dit_transformer and flux_dit, probing every second."""
    folder = tmp_path_factory.mktemp("supervised")
    sidecar = build_engine("onnxruntime", "tiny-flux-dev", engines_dir=folder / "engines", model_root=model_root,
                           verify=False)  # fmt: skip
    repository = folder / "model_repository"
    write_repository(sidecar, repository, Locations(CHECKOUT))
    shutil.copytree(REPOSITORY / "dit_transformer", repository / "dit_transformer")
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "flux_triton", "serve", "--model-repository", str(repository)]
    command += ["--heal-interval", "1", "--exit-timeout-secs=5"]
    command += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    env = {**os.environ, MODEL_ROOT_ENV: str(model_root), ADMIN_KEY_ENV: "test-key"}
    log = folder / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=CHECKOUT, env=env, stdout=output, stderr=output)
    url = f"127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 180
    while "every model probed" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, log.read_text()[-3000:]
    yield url, repository, log
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def answers_correctly(url: str, model: str, tiny_dev) -> bool:
    step = inputs.random_step(DEV, height=256, width=256, seed=3)
    try:
        with httpclient.InferenceServerClient(url, network_timeout=30) as client:
            served = infer_step(client, model, step.wire())
    except Exception:
        return False
    expected = call.reference_call(tiny_dev, step)
    return served.shape == expected.shape and bool((served - expected).abs().max() < 1e-4)


# Killed twice: the second reload finds the model's files unchanged, where a plain load is a no-op.
@pytest.mark.parametrize(
    ("killed", "public"),
    [("dit_transformer", "dit_transformer"), ("dit_engine", "flux_dit"), ("dit_transformer", "dit_transformer")],
    ids=["dit_transformer", "dit_engine", "dit_transformer-again"],
)
def test_a_model_whose_stub_died_answers_again(supervised, tiny_dev, killed, public):
    url, repository, log = supervised
    assert answers_correctly(url, public, tiny_dev)
    (pid,) = stub_pids(repository, killed)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < HEALED_WITHIN_S:
        if stub_pids(repository, killed) not in ([], [pid]) and answers_correctly(url, public, tiny_dev):
            break
        time.sleep(0.5)
    healed_s = time.monotonic() - killed_at
    print(f"{killed}: answering again {healed_s:.1f} s after its stub was killed")
    assert healed_s < HEALED_WITHIN_S, log.read_text()[-3000:]
    assert f"[supervisor] {killed} failed its probe" in log.read_text()
    with httpclient.InferenceServerClient(url) as client:  # Triton itself said ready all along
        assert client.is_server_ready()


def test_the_repository_api_needs_the_admin_key(supervised):
    url, _, _ = supervised
    with httpclient.InferenceServerClient(url) as client:
        with pytest.raises(Exception, match=r"403|[Ff]orbidden|restricted"):
            client.load_model("dit_transformer")
        assert {m["name"] for m in client.get_model_repository_index(headers={ADMIN_HEADER: "test-key"})} == {
            "dit_transformer", "flux_dit", "dit_preprocess", "dit_engine"
        }  # fmt: skip
        assert health.check(url, {ADMIN_HEADER: "test-key"}) == dict.fromkeys(
            ("dit_transformer", "flux_dit", "dit_preprocess", "dit_engine")
        )


def test_shared_memory_and_logging_need_the_admin_key(supervised, tiny_dev):
    url, _, _ = supervised
    call = step_call(torch.randn(1, 8, 32))
    with (
        RemoteFluxTransformer(url=url, transport="shm", admin_key=None) as remote,
        pytest.raises(RemoteDitError, match=f"{ADMIN_KEY_ENV}"),
    ):
        remote(**call)
    with RemoteFluxTransformer(url=url, transport="shm", admin_key="test-key") as remote:
        (served,) = remote(**call)
    assert torch.equal(served, tiny_dev(**call)[0])
    with httpclient.InferenceServerClient(url) as client:
        with pytest.raises(InferenceServerException, match=r"403|restricted"):
            client.update_log_settings({"log_verbose_level": 1})
        with pytest.raises(InferenceServerException, match=r"403|restricted"):
            client.get_system_shared_memory_status()
        assert client.get_system_shared_memory_status(headers={ADMIN_HEADER: "test-key"}) == []
