"""dit_transformer through a real tritonserver against diffusers (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEV, SCHNELL, infer_concurrently

from flux_triton.client.wire import infer_step
from flux_triton.pipeline import call, inputs, loop

pytestmark = pytest.mark.server


def test_single_latent_is_bitwise_equal_to_the_pipeline_call(dev_server, http_client, tiny_dev):
    step = inputs.random_step(DEV, batch=1, seed=1)
    served = infer_step(http_client(dev_server), "dit_transformer", step.wire())
    expected = call.reference_call(tiny_dev, step)
    assert served.shape == expected.shape == step.hidden_states.shape
    assert torch.equal(served, expected)


@pytest.mark.parametrize("timestep", [0.0, 1.0, 137.25, 500.0, 999.5, 1000.0])
def test_timesteps_across_the_range(dev_server, http_client, tiny_dev, timestep):
    step = inputs.random_step(DEV, timestep=timestep, seed=2)
    served = infer_step(http_client(dev_server), "dit_transformer", step.wire())
    assert torch.equal(served, call.reference_call(tiny_dev, step))
    # The scaling is t / 1000 exactly: the raw timestep fed unscaled would not match.
    wrong = step.replace(timestep=step.timestep / 1000)
    if timestep > 0:
        assert not torch.allclose(served, call.reference_call(tiny_dev, wrong), atol=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5, 7.0])
def test_guidance_scales(dev_server, http_client, tiny_dev, guidance_scale):
    step = inputs.random_step(DEV, guidance_scale=guidance_scale, seed=3)
    served = infer_step(http_client(dev_server), "dit_transformer", step.wire())
    assert torch.equal(served, call.reference_call(tiny_dev, step))
    other = inputs.random_step(DEV, guidance_scale=guidance_scale + 1.0, seed=3)
    assert not torch.allclose(served, call.reference_call(tiny_dev, other), atol=1e-4)


def test_batch_in_one_request_matches_single_requests(dev_server, http_client, tiny_dev):
    client = http_client(dev_server)
    wire = inputs.random_step(DEV, batch=3, seed=4).wire()
    wire["timestep"] = torch.tensor([[10.0], [400.0], [900.0]])  # per-sample timesteps
    wire["guidance"] = torch.tensor([[1.0], [3.5], [7.0]])  # per-sample guidance
    served = infer_step(client, "dit_transformer", wire)
    for row in range(3):
        single = {name: tensor[row : row + 1] for name, tensor in wire.items()}
        alone = infer_step(client, "dit_transformer", single)
        torch.testing.assert_close(served[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    # rows must not be swapped: each differs from its neighbours
    assert not torch.allclose(served[0], served[1], atol=1e-3)


def test_concurrent_requests_are_merged_and_split_in_order(dev_server, http_client):
    client = http_client(dev_server)
    steps = [inputs.random_step(DEV, timestep=50.0 * (i + 1), guidance_scale=1.0 + i, seed=10 + i) for i in range(8)]
    singles = [infer_step(client, "dit_transformer", s.wire()) for s in steps]
    merged, inferences, executions = infer_concurrently(dev_server, "dit_transformer", [s.wire() for s in steps])
    assert inferences == len(steps)
    assert executions < inferences, "the dynamic batcher did not merge any requests"
    for single, result in zip(singles, merged, strict=True):
        torch.testing.assert_close(result, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "steps", "guidance_scale"), [("schnell", 4, None), ("dev", 28, 3.5)], ids=["schnell-4", "dev-28"]
)
def test_denoising_loop_matches_flux_pipeline(
    request, http_client, tiny_dev, tiny_schnell, preset, steps, guidance_scale
):
    signature, transformer = (SCHNELL, tiny_schnell) if preset == "schnell" else (DEV, tiny_dev)
    server = request.getfixturevalue(f"{preset}_server")
    client = http_client(server)
    first = inputs.random_step(signature, batch=1, height=64, width=48, guidance_scale=guidance_scale or 0, seed=5)
    served = loop.denoise(
        lambda step: infer_step(client, "dit_transformer", step.wire()), loop.make_scheduler(preset), first, steps
    )
    expected = loop.pipeline_latents(transformer, preset, first, steps, height=64, width=48)
    assert torch.equal(served, expected)
    assert not torch.allclose(served, first.hidden_states, atol=1e-2)


def test_every_text_length_and_batch_is_bitwise_equal(dev_server, http_client, tiny_dev):
    """Triton hands the model its inputs at any byte offset; on CPU a small matrix product over misaligned input
    rounds differently, so the model copies such inputs into aligned memory first (else some text lengths and
    batch sizes were off by an ulp)."""
    client = http_client(dev_server)
    steps = [inputs.random_step(DEV, text_tokens=tokens, seed=30 + tokens) for tokens in range(1, 17)]
    steps += [inputs.random_step(DEV, batch=batch, seed=50 + batch) for batch in range(1, 6)]
    differing = []
    for step in steps:
        served = infer_step(client, "dit_transformer", step.wire())
        if not torch.equal(served, call.reference_call(tiny_dev, step)):
            differing.append((step.batch_size, step.encoder_hidden_states.shape[1]))
    assert differing == [], f"(batch, text tokens) not bitwise: {differing}"
