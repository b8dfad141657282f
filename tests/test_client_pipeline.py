"""FluxPipeline with the remote transformer against the same pipeline with the local one (CPU, fp32)."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import pytest
import torch
from helpers import start_server

from flux_triton.client.connection import RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.pipeline import loop

pytestmark = pytest.mark.server

HEIGHT, WIDTH, TEXT_TOKENS = 64, 48, 8


@pytest.fixture(scope="module")
def remote_dev(dev_server):
    with RemoteFluxTransformer(url=dev_server.url) as remote:
        yield remote


@pytest.fixture(scope="module")
def remote_schnell(schnell_server):
    with RemoteFluxTransformer(url=schnell_server.url) as remote:
        yield remote


def _embeds(seed: int, batch: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
        "pooled_prompt_embeds": torch.randn(batch, 32, generator=generator),
    }


def _run(pipe, seed: int, **kwargs) -> torch.Tensor:
    return pipe(
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images


def _local_then_remote(local, remote, preset: str, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same pipeline twice: with its local transformer, then with ``pipe.transformer`` swapped."""

    pipe = loop.flux_pipeline(local, preset)
    expected = _run(pipe, seed, **kwargs)
    pipe.transformer = remote
    assert pipe.transformer is remote
    served = _run(pipe, seed, **kwargs)
    return served, expected


def test_the_remote_describes_the_served_model(remote_dev, remote_schnell):
    assert remote_dev.config.in_channels == remote_schnell.config.in_channels == 4
    assert remote_dev.config.guidance_embeds is True
    assert remote_schnell.config.guidance_embeds is False
    assert remote_dev.dtype == remote_schnell.dtype == torch.float32

    pipe = loop.flux_pipeline(remote_dev, "dev").to("cpu")
    assert pipe.transformer is remote_dev and pipe._execution_device == torch.device("cpu")


def test_schnell_like_4_steps(remote_schnell, tiny_schnell):
    calls = len(remote_schnell.latencies_s)
    served, expected = _local_then_remote(
        tiny_schnell, remote_schnell, "schnell", seed=1, num_inference_steps=4, **_embeds(1)
    )
    assert len(remote_schnell.latencies_s) - calls == 4
    assert served.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 4)
    assert torch.equal(served, expected)


def test_dev_like_28_steps_guidance(remote_dev, tiny_dev):
    served, expected = _local_then_remote(
        tiny_dev, remote_dev, "dev", seed=2, num_inference_steps=28, guidance_scale=3.5, **_embeds(2)
    )
    assert torch.equal(served, expected)
    # guidance reaches the server: another scale gives other latents
    other, _ = _local_then_remote(
        tiny_dev, remote_dev, "dev", seed=2, num_inference_steps=28, guidance_scale=7.0, **_embeds(2)
    )
    assert not torch.allclose(other, served, atol=1e-4)


def test_true_cfg_with_negative_embeddings(remote_dev, tiny_dev):
    negative = _embeds(4)
    calls = len(remote_dev.latencies_s)
    served, expected = _local_then_remote(
        tiny_dev,
        remote_dev,
        "dev",
        seed=3,
        num_inference_steps=8,
        true_cfg_scale=4.0,
        negative_prompt_embeds=negative["prompt_embeds"],
        negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
        **_embeds(3),
    )
    assert len(remote_dev.latencies_s) - calls == 16  # "cond" and "uncond" each step
    assert torch.equal(served, expected)
    plain, _ = _local_then_remote(tiny_dev, remote_dev, "dev", seed=3, num_inference_steps=8, **_embeds(3))
    assert not torch.allclose(plain, served, atol=1e-4)


def test_two_images_per_prompt(remote_dev, tiny_dev):
    # Not bitwise: a batch-2 forward on the server differs from the same local batch-2 forward by an ulp
    # (~2e-7, seen with direct Triton requests too; batch 1 is bitwise), and the pipeline with prompt_embeds
    # passed in leaves them at batch 1 for the local transformer to broadcast, while Triton needs them batched.
    served, expected = _local_then_remote(
        tiny_dev, remote_dev, "dev", seed=5, num_inference_steps=6, num_images_per_prompt=2, **_embeds(5)
    )
    assert served.shape == expected.shape and served.shape[0] == 2
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(served[0], served[1], atol=1e-3)


def test_a_server_error_carries_the_servers_message(remote_dev):
    call = dict(
        hidden_states=torch.randn(1, 12, 4),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(12, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )
    with pytest.raises(RemoteDitError, match=r"dit_transformer.*S=513 exceeds this server's limit of 512"):
        remote_dev(encoder_hidden_states=torch.randn(1, 513, 32), txt_ids=torch.zeros(513, 3), **call)
    nan = torch.full((1, 8, 32), float("nan"))
    with pytest.raises(RemoteDitError, match="encoder_hidden_states: expected finite values, got NaN or Inf"):
        remote_dev(encoder_hidden_states=nan, txt_ids=torch.zeros(8, 3), **call)
    # and the same call with finite inputs goes through
    (noise_pred,) = remote_dev(encoder_hidden_states=torch.randn(1, 8, 32), txt_ids=torch.zeros(8, 3), **call)
    assert noise_pred.shape == (1, 12, 4)


def test_a_bad_model_name_is_a_clear_error(dev_server):
    with pytest.raises(RemoteDitError, match=r"model 'no_such_model' is not ready.*models there: dit_transformer"):
        RemoteFluxTransformer(url=dev_server.url, model_name="no_such_model")


def test_a_wire_dtype_the_server_does_not_take_is_refused(dev_server):
    with pytest.raises(RemoteDitError, match=r"wire_dtype BF16 does not match .* takes FP32"):
        RemoteFluxTransformer(url=dev_server.url, wire_dtype="BF16")


def test_a_stopped_server_is_a_clear_error_not_a_hang(tmp_path, model_root):
    server = start_server(tmp_path, model_root, ["dit_transformer"])
    try:
        remote = RemoteFluxTransformer(url=server.url, connection_timeout_s=2.0, network_timeout_s=5.0)
    finally:
        server.stop()
    step = dict(
        hidden_states=torch.randn(1, 12, 4),
        encoder_hidden_states=torch.randn(1, 8, 32),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(12, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )
    start = time.monotonic()
    with pytest.raises(RemoteDitError, match=f"dit_transformer' at {server.url} is not reachable"):
        remote(**step)
    with pytest.raises(RemoteDitError, match=f"Triton server at {server.url} is not reachable"):
        RemoteFluxTransformer(url=server.url, connection_timeout_s=2.0)
    assert time.monotonic() - start < 10


def test_a_server_that_never_answers_times_out(tmp_path):
    with socket.socket() as listener:  # accepts connections, never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RemoteDitError, match=f"Triton server at {url} is not reachable"):
            RemoteFluxTransformer(url=url, connection_timeout_s=1.0, network_timeout_s=1.0)
        assert time.monotonic() - start < 10


def test_the_metrics_port_is_named_not_parsed(dev_server):
    """Triton's metrics service answers 200, empty, to every path, health checks included: a client pointed at it
    says so instead of failing to parse the model config."""
    metrics = dev_server.endpoints[2]
    with pytest.raises(RemoteDitError, match=f"^{metrics} answers, but not as a Triton HTTP endpoint.*metrics port"):
        RemoteFluxTransformer(url=metrics)


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_one_remote_transformer_serves_pipelines_in_pool_threads(dev_server, tiny_dev, transport):
    """A web server's pattern: the remote transformer and one pipeline per request made in the main thread, the
    requests run by pool threads, several at once. Each thread gets its own connection (tritonclient's client
    serves only the thread that made it) and each generation its own latents (merged forwards on the server:
    within fp32 rounding of the local run)."""
    seeds = range(20, 26)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5)
    local = loop.flux_pipeline(tiny_dev, "dev")
    expected = {seed: _run(local, seed, **kwargs, **_embeds(seed)) for seed in seeds}
    with RemoteFluxTransformer(url=dev_server.url, transport=transport) as remote:
        pipes = {seed: loop.flux_pipeline(remote, "dev") for seed in seeds}

        def generate(seed: int) -> tuple[torch.Tensor, str]:
            return _run(pipes[seed], seed, **kwargs, **_embeds(seed)), threading.current_thread().name

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = dict(zip(seeds, pool.map(generate, seeds), strict=True))
            threads = {name for _, name in results.values()}
            assert len(remote.routers._routers) == len(threads) + 1  # the main thread's, and one per pool thread
        assert len(threads) > 1, "the pool ran every generation in one thread"
        for seed, (served, _) in results.items():
            torch.testing.assert_close(served, expected[seed], rtol=1e-5, atol=1e-5)
        assert len(remote.routers._routers) == 1, "a finished thread's router was not freed"
        served = _run(pipes[seeds[0]], seeds[0], **kwargs, **_embeds(seeds[0]))  # the main thread, after them
        assert torch.equal(served, expected[seeds[0]])
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        pytest.raises(RemoteDitError, match="the remote transformer is closed"),
    ):
        pool.submit(generate, seeds[0]).result()
