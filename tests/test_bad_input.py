"""Every bad input to a public model gets an error naming the input and what was expected; the
server stays ready and answers the next valid request exactly as before. Through a real server."""

from __future__ import annotations

import concurrent.futures
import math

import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, SCHNELL
from tritonclient.utils import InferenceServerException

from flux_triton.client.wire import infer_step
from flux_triton.pipeline import inputs

pytestmark = pytest.mark.server

FLOAT_INPUTS = (
    "hidden_states",
    "timestep",
    "guidance",
    "pooled_projections",
    "encoder_hidden_states",
    "txt_ids",
    "img_ids",
)


def server_limits(client, model: str) -> dict[str, int]:
    """B, N and S limits as the server's configs state them (an ensemble's in its preprocessor);
    ``min_N`` only where an engine profile sets one."""
    config = client.get_model_config(model)
    parameters = client.get_model_config("dit_preprocess" if config["platform"] == "ensemble" else model)["parameters"]
    limits = {
        "B": config["max_batch_size"],
        "N": int(parameters["max_image_tokens"]["string_value"]),
        "S": int(parameters["max_text_tokens"]["string_value"]),
    }
    if "min_image_tokens" in parameters:
        limits["min_N"] = int(parameters["min_image_tokens"]["string_value"])
    return limits


def valid(batch: int = 1, **kwargs) -> dict[str, torch.Tensor]:
    return inputs.random_step(DEV, batch=batch, seed=7, **kwargs).wire()


@pytest.fixture(scope="module")
def client(public_dev):
    with httpclient.InferenceServerClient(public_dev.server.url, network_timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def baseline(public_dev, client):
    """A valid request and the server's answer to it before any bad input."""
    wire = valid()
    return wire, infer_step(client, public_dev.model, wire)


def assert_rejected(served, client, baseline, wire, name: str, *expected: str) -> None:
    """``wire`` fails with a 400 whose message names ``name`` and holds one of ``expected``;
    then the server is ready and answers the baseline request exactly as before."""
    with pytest.raises(InferenceServerException) as info:
        infer_step(client, served.model, wire)
    message = info.value.message()
    assert info.value.status() == "400", message
    assert name in message, message
    assert any(text in message for text in expected), message
    assert client.is_server_ready() and client.is_model_ready(served.model)
    good, expected_result = baseline
    assert torch.equal(infer_step(client, served.model, good), expected_result)


def test_wrong_rank(public_dev, client, baseline):
    wire = {**valid(), "hidden_states": valid()["hidden_states"][None]}  # [1, 1, N, C]
    assert_rejected(public_dev, client, baseline, wire, "hidden_states", "[-1,-1,4]", "expected rank 3")


def test_batch_sizes_disagree(public_dev, client, baseline):
    wire = {**valid(), "pooled_projections": valid(batch=2)["pooled_projections"]}
    assert_rejected(public_dev, client, baseline, wire, "pooled_projections", "batch size does not match", "B=1")


def test_img_ids_rows_do_not_match_n(public_dev, client, baseline):
    wire = {**valid(), "img_ids": valid(height=64, width=80)["img_ids"]}  # N=20 against N=16
    assert_rejected(public_dev, client, baseline, wire, "img_ids", "expected N=16")


def test_txt_ids_do_not_match_s(public_dev, client, baseline):
    wire = {**valid(), "txt_ids": valid(text_tokens=9)["txt_ids"]}
    assert_rejected(public_dev, client, baseline, wire, "txt_ids", "expected S=8")


@pytest.mark.parametrize(
    ("name", "symbol", "shape", "expected"),
    [
        ("hidden_states", "C", (1, 16, 8), "[-1,-1,4]"),
        ("pooled_projections", "P", (1, 16), "[-1,32]"),
        ("encoder_hidden_states", "D", (1, 8, 64), "[-1,-1,32]"),
    ],
)
def test_channel_dim_does_not_match_the_model(public_dev, client, baseline, name, symbol, shape, expected):
    wire = {**valid(), name: torch.randn(shape)}
    assert_rejected(public_dev, client, baseline, wire, name, expected, f"expected {symbol}=")


@pytest.mark.parametrize(("name", "dtype"), [("hidden_states", torch.float16), ("timestep", torch.bfloat16)])
def test_wrong_dtype(public_dev, client, baseline, name, dtype):
    wire = {**valid(), name: valid()[name].to(dtype)}
    assert_rejected(public_dev, client, baseline, wire, name, "expects 'FP32'", "expected dtype FP32")


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", FLOAT_INPUTS)
def test_nan_or_inf(public_dev, client, baseline, name, value):
    wire = valid()
    wire[name] = wire[name].clone()
    wire[name].view(-1)[-1] = value
    assert_rejected(public_dev, client, baseline, wire, name, "expected finite values")


@pytest.mark.parametrize("timestep", [-0.5, 1000.5, 1e9])
def test_timestep_outside_the_scheduler_range(public_dev, client, baseline, timestep):
    wire = {**valid(), "timestep": torch.tensor([[timestep]])}
    assert_rejected(public_dev, client, baseline, wire, "timestep", "in [0, 1000]")


@pytest.mark.parametrize("guidance", [-0.5, 50.5, -1e30, 1e30])
def test_guidance_outside_the_served_range(public_dev, client, baseline, guidance):
    wire = {**valid(), "guidance": torch.tensor([[guidance]])}
    assert_rejected(public_dev, client, baseline, wire, "guidance", "guidance scales in [0, 50]")


def test_a_timestep_just_past_1000_is_shown_as_it_is(public_dev, client, baseline):
    wire = {**valid(), "timestep": torch.tensor([[1000.00006]])}
    assert_rejected(public_dev, client, baseline, wire, "timestep", "got 1000.00006")


def test_inputs_that_overflow_the_model_get_an_error_not_nan(public_dev, client, baseline):
    """Finite but huge inputs make the model's answer NaN: the server refuses to return it, names the
    request's inputs, and keeps serving."""
    wire = valid()
    wire["pooled_projections"] = torch.full_like(wire["pooled_projections"], 3e38)
    with pytest.raises(InferenceServerException) as info:
        infer_step(client, public_dev.model, wire)
    message = info.value.message()
    assert info.value.status() == "500", message
    assert "noise_pred: NaN or Inf for the request with" in message, message
    assert "max |pooled_projections| 3e+38" in message and "guidance 3.5" in message, message
    assert ("scaled timestep 0.5" if public_dev.model == "flux_dit" else "timestep 500") in message, message
    assert client.is_server_ready() and client.is_model_ready(public_dev.model)
    good, expected = baseline
    assert torch.equal(infer_step(client, public_dev.model, good), expected)


def test_guidance_missing_for_a_guidance_model(public_dev, client, baseline):
    wire = {name: tensor for name, tensor in valid().items() if name != "guidance"}
    assert_rejected(public_dev, client, baseline, wire, "guidance", "required")


def test_guidance_given_to_a_model_without_it(public_schnell):
    wire = inputs.random_step(SCHNELL, seed=7).wire()
    with httpclient.InferenceServerClient(public_schnell.server.url, network_timeout=60) as client:
        before = infer_step(client, public_schnell.model, wire)
        baseline = (wire, before)
        with_guidance = {**wire, "guidance": torch.tensor([[3.5]])}
        assert_rejected(public_schnell, client, baseline, with_guidance, "guidance", "no guidance embeddings")


@pytest.mark.parametrize("name", ["txt_ids", "img_ids"])
def test_ids_rows_differ_inside_one_request(public_dev, client, baseline, name):
    wire = valid(batch=2)
    wire[name] = wire[name].clone()
    wire[name][1, 0, 1] += 1.0
    assert_rejected(public_dev, client, baseline, wire, name, "rows differ within the request")


@pytest.mark.parametrize("symbol", ["B", "N", "S"])
def test_zero_size_dims(public_dev, client, baseline, symbol):
    wire = valid()
    if symbol == "B":
        wire = {name: tensor[:0] for name, tensor in wire.items()}
        name, expected = "txt_ids", ("byte size", "B is zero")
    elif symbol == "N":
        wire.update(hidden_states=wire["hidden_states"][:, :0], img_ids=wire["img_ids"][:, :0])
        name, expected = "hidden_states", ("dimension N is zero",)
    else:
        wire.update(encoder_hidden_states=wire["encoder_hidden_states"][:, :0], txt_ids=wire["txt_ids"][:, :0])
        name, expected = "encoder_hidden_states", ("dimension S is zero",)
    assert_rejected(public_dev, client, baseline, wire, name, *expected)


def test_batch_beyond_the_server_limit(public_dev, client, baseline):
    # Triton's own check, before the model: it names the request's batch size and the limit.
    limit = server_limits(client, public_dev.model)["B"]
    with pytest.raises(InferenceServerException, match=f"batch-size must be <= {limit}"):
        infer_step(client, public_dev.model, valid(batch=limit + 1))
    assert client.is_server_ready() and client.is_model_ready(public_dev.model)
    assert torch.equal(infer_step(client, public_dev.model, baseline[0]), baseline[1])


@pytest.mark.parametrize(("symbol", "name"), [("N", "hidden_states"), ("S", "encoder_hidden_states")])
def test_tokens_beyond_the_server_limits(public_dev, client, baseline, symbol, name):
    limit = server_limits(client, public_dev.model)[symbol]
    wire = valid(height=16, width=16 * (limit + 1)) if symbol == "N" else valid(text_tokens=limit + 1)
    assert_rejected(
        public_dev, client, baseline, wire, name, f"{symbol}={limit + 1} exceeds this server's limit of {limit}"
    )


def test_image_tokens_below_the_engine_profile(public_dev, client, baseline):
    limits = server_limits(client, public_dev.model)
    if limits.get("min_N", 1) <= 1:
        pytest.skip(f"{public_dev.model} has no engine profile minimum (any N >= 1 runs)")
    wire = valid(height=16, width=16)  # N = 1
    assert_rejected(
        public_dev, client, baseline, wire, "hidden_states", f"N=1 is below this engine's minimum of {limits['min_N']}"
    )


@pytest.mark.parametrize(
    "name", ["hidden_states", "timestep", "pooled_projections", "encoder_hidden_states", "txt_ids", "img_ids"]
)
def test_missing_required_input(public_dev, client, baseline, name):
    wire = {key: tensor for key, tensor in valid().items() if key != name}
    assert_rejected(public_dev, client, baseline, wire, name, "missing required input", "expected")


def test_a_bad_request_merged_with_good_ones_fails_alone(public_dev, client):
    """Requests arriving together are batched; the bad one fails, the others are answered."""
    goods = [inputs.random_step(DEV, timestep=100.0 * i, seed=20 + i).wire() for i in range(1, 6)]
    singles = [infer_step(client, public_dev.model, wire) for wire in goods]
    bad = {**goods[0], "timestep": torch.tensor([[math.nan]])}

    def send(wire):
        with httpclient.InferenceServerClient(public_dev.server.url, network_timeout=60) as own:
            return infer_step(own, public_dev.model, wire)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, wire) for wire in [*goods[:3], bad, *goods[3:]]]
    results = [future.exception() or future.result() for future in futures]
    assert isinstance(results[3], InferenceServerException) and "timestep" in results[3].message()
    for served, single in zip(results[:3] + results[4:], singles, strict=True):
        torch.testing.assert_close(served, single, rtol=1e-5, atol=1e-5)
