"""A model whose Python-backend stub died (killed, out of memory) keeps Triton's ready endpoints at 200
but fails every request. ``python -m flux_triton serve`` probes every model with a real inference and
reloads the ones that fail: a test kills stubs under it and gets correct answers again."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient
from helpers import answers_correctly, step_call, stub_pids
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.contract.protocol import ADMIN_HEADER, ADMIN_KEY_ENV
from flux_triton.deploy import health

pytestmark = pytest.mark.server
HEALED_WITHIN_S = 60  # probe interval 1 s, plus reloading a tiny model


# Killed twice: the second reload finds the model's files unchanged, where a plain load is a no-op.
@pytest.mark.parametrize(
    ("killed", "public"),
    [("dit_transformer", "dit_transformer"), ("dit_engine", "flux_dit"), ("dit_transformer", "dit_transformer")],
    ids=["dit_transformer", "dit_engine", "dit_transformer-again"],
)
def test_a_model_whose_stub_died_answers_again(supervised, tiny_dev, killed, public):
    url, repository, log = supervised.url, supervised.repository, supervised.log
    assert answers_correctly(url, public, tiny_dev)
    (pid,) = stub_pids(repository, killed)
    regions = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/" in line}
    assert regions
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
    # The dead stub's IPC region is removed from /dev/shm (the server still maps it: Triton 2.51).
    deadline = time.monotonic() + 40
    while any(Path(region).exists() for region in regions) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [region for region in regions if Path(region).exists()], log.read_text()[-2000:]
    with httpclient.InferenceServerClient(url) as client:  # Triton itself said ready all along
        assert client.is_server_ready()


def test_a_hung_model_is_reloaded(supervised, tiny_dev):
    """A stub that stops answering (stopped here) fails its own probe, within the probe timeout, while the other
    models pass theirs; the supervisor reloads it and it answers again."""
    url, repository, log = supervised.url, supervised.repository, supervised.log
    (pid,) = stub_pids(repository, "dit_transformer")
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while time.monotonic() - stopped_at < HEALED_WITHIN_S:
            if stub_pids(repository, "dit_transformer") not in ([], [pid]) and answers_correctly(
                url, "dit_transformer", tiny_dev
            ):
                break
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    healed_s = time.monotonic() - stopped_at
    print(f"dit_transformer: answering again {healed_s:.1f} s after its stub stopped")
    assert healed_s < HEALED_WITHIN_S, log.read_text()[-3000:]
    assert "[supervisor] dit_transformer failed its probe" in log.read_text()
    assert answers_correctly(url, "flux_dit", tiny_dev)


def test_the_repository_api_needs_the_admin_key(supervised):
    url = supervised.url
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
    url = supervised.url
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
