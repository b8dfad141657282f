"""Faults: an out-of-memory forward fails its batch and frees its memory while the model keeps
serving; a client whose server dies mid-request gets a clear error, not a hang."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, rss_mib, start_server, stub_pids
from tritonclient.utils import InferenceServerException

from flux_triton.client.wire import ServerUnavailable, infer_step
from flux_triton.pipeline import call, inputs
from flux_triton.serving.faults import FAULT_FORWARD_BYTES_ENV

pytestmark = pytest.mark.server

BUDGET = 1_000_000  # a one-sample 64x64 forward holds ~50 kB, sixteen 256x256 samples ~7.6 MB


@pytest.fixture(scope="module")
def oom_server(tmp_path_factory, model_root):
    """dit_transformer with the fault-injection memory budget switched on."""
    server = start_server(
        tmp_path_factory.mktemp("oom"), model_root, ["dit_transformer"], {FAULT_FORWARD_BYTES_ENV: str(BUDGET)}
    )
    yield server
    server.stop()


def test_out_of_memory_fails_the_batch_frees_memory_and_keeps_serving(oom_server, tiny_dev):
    small = inputs.random_step(DEV, seed=1)
    large = inputs.random_step(DEV, batch=16, height=256, width=256, seed=2).wire()
    with httpclient.InferenceServerClient(oom_server.url, network_timeout=60) as client:
        for _ in range(3):  # repeatedly: nothing leaks from one failure to the next
            with pytest.raises(InferenceServerException) as info:
                infer_step(client, "dit_transformer", large)
            message = info.value.message()
            assert info.value.status() == "500", message
            assert "ForwardOutOfMemory" in message and f"over its {BUDGET}-byte budget" in message, message
            assert "memory was released (0 bytes still held)" in message, message
            assert client.is_server_ready() and client.is_model_ready("dit_transformer")
            served = infer_step(client, "dit_transformer", small.wire())
            assert torch.equal(served, call.reference_call(tiny_dev, small))


def test_out_of_memory_fails_only_its_own_merged_batch(oom_server):
    """Large requests that merge run out together; a small one of another shape is answered."""
    large = [inputs.random_step(DEV, batch=8, height=256, width=256, seed=s).wire() for s in (3, 4)]
    small = inputs.random_step(DEV, seed=5).wire()
    with httpclient.InferenceServerClient(oom_server.url, network_timeout=60) as client:
        alone = infer_step(client, "dit_transformer", small)

    def send(wire):
        with httpclient.InferenceServerClient(oom_server.url, network_timeout=60) as own:
            return infer_step(own, "dit_transformer", wire)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(send, wire) for wire in [*large, small]]
    assert torch.equal(futures[2].result(), alone)
    for future in futures[:2]:
        error = future.exception()
        assert isinstance(error, InferenceServerException) and "out of memory" in error.message()


def _infer_fresh(url: str, wire) -> torch.Tensor:
    with httpclient.InferenceServerClient(url, network_timeout=60) as client:  # one client per thread
        return infer_step(client, "dit_transformer", wire)


def test_client_gets_a_clear_error_when_the_server_dies_mid_request(tmp_path, model_root):
    server = start_server(tmp_path, model_root, ["dit_transformer"])
    slow = inputs.random_step(DEV, batch=16, height=2048, width=1024, text_tokens=512, seed=6).wire()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(_infer_fresh, server.url, slow)
            time.sleep(1.0)  # the forward of 16 x 8192 image tokens takes seconds on CPU
            assert not future.done(), "the request finished before the server was killed"
            server.process.kill()
            start = time.monotonic()
            error = future.exception(timeout=30)
            assert time.monotonic() - start < 30
        with pytest.raises(ServerUnavailable, match="refused"):  # and a request after the death
            _infer_fresh(server.url, inputs.random_step(DEV).wire())
    finally:
        server.stop()
    assert isinstance(error, ServerUnavailable), repr(error)
    message = str(error)
    assert "dit_transformer" in message and server.url in message and "connection lost" in message, message


def test_the_largest_request_an_engine_allows_gives_its_memory_back(dev_engine_server):
    """flux_dit on the ONNX Runtime engine: the profile's largest request (B=4, 1344x1344, 512 text
    tokens) must not leave gigabytes pinned in dit_engine (ONNX Runtime's CPU arena would keep them)."""
    (pid,) = stub_pids(dev_engine_server.model_repository, "dit_engine")
    small = inputs.random_step(DEV, height=256, width=256).wire()
    with httpclient.InferenceServerClient(dev_engine_server.url, network_timeout=300) as client:
        infer_step(client, "flux_dit", small)
        before = rss_mib(pid)
        largest = inputs.random_step(DEV, batch=4, height=1344, width=1344, text_tokens=512).wire()
        assert infer_step(client, "flux_dit", largest).shape == largest["hidden_states"].shape
        for _ in range(3):
            infer_step(client, "flux_dit", small)
        after = rss_mib(pid)
    print(f"dit_engine resident memory: {before:.0f} MiB before the largest request, {after:.0f} MiB after")
    assert after - before < 256, (before, after)
