"""The shipped server (``python -m flux_triton serve``) puts a guard in front of tritonserver 2.51. The
requests that crash that server or one of its models are refused with a reason, over HTTP and gRPC; the
server and the models' stubs keep their processes and every model answers correctly afterwards. The guard
reads a request exactly as the server will (fuzzed against a bare server under a crash watchdog)."""

from __future__ import annotations

import http.client
import json
import math

import grpc
import numpy as np
import pytest
import torch
from helpers import DEV, answers_correctly, stub_pids
from tritonclient.grpc import service_pb2, service_pb2_grpc

from flux_triton.contract import INPUTS, OUTPUT_NAME, TORCH_TO_TRITON, DitSignature, to_numpy
from flux_triton.contract.protocol import ADMIN_HEADER
from flux_triton.contract.specs import engine_tensor_name
from flux_triton.deploy.guard import GuardSettings
from flux_triton.deploy.guard.checks import INFER_HEADER, Refused, check_grpc_infer, check_http_infer, header_length
from flux_triton.deploy.guard.rules import ModelRules
from flux_triton.model.presets import FLUX_DEV_CONFIG
from flux_triton.pipeline import call, inputs
from flux_triton.serving.settings import TransformerSettings

LIMIT = GuardSettings().max_request_bytes
WRAPPING_TOKENS = 2**60 + 16  # x 4 channels x 4 bytes = 2^64 + 256: wraps to the 256 bytes sent
# (model called, input sent, the stub that would abort)
WRAP_TARGETS = [
    ("dit_transformer", "hidden_states", "dit_transformer"),
    ("flux_dit", "hidden_states", "dit_preprocess"),
    ("dit_engine", engine_tensor_name("hidden_states"), "dit_engine"),
]


def http_post(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    connection = http.client.HTTPConnection(url, timeout=60)
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def wrapping_http_request(input_name: str) -> tuple[bytes, dict[str, str]]:
    entry = {"name": input_name, "shape": [1, WRAPPING_TOKENS, 4], "datatype": "FP32"}
    header = json.dumps({"inputs": [{**entry, "parameters": {"binary_data_size": 256}}]}).encode()
    return header + bytes(256), {INFER_HEADER: str(len(header))}


def grpc_request(model: str, tensors: dict[str, np.ndarray | torch.Tensor]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, tensor in tensors.items():
        array = tensor if isinstance(tensor, np.ndarray) else to_numpy(tensor)
        request.inputs.add(name=name, datatype=TORCH_TO_TRITON[torch.float32], shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def wrapping_grpc_request(model: str, input_name: str) -> service_pb2.ModelInferRequest:
    request = grpc_request(model, {input_name: np.zeros(64, np.float32)})
    request.inputs[0].shape[:] = [1, WRAPPING_TOKENS, 4]
    return request


def noise_pred(response: service_pb2.ModelInferResponse) -> torch.Tensor:
    (output,) = response.outputs
    assert output.name == OUTPUT_NAME
    array = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(output.shape)
    return torch.from_numpy(array.copy())


@pytest.mark.server
@pytest.mark.parametrize(("model", "input_name", "stub"), WRAP_TARGETS, ids=[t[0] for t in WRAP_TARGETS])
def test_a_byte_size_that_wraps_is_refused_over_http_and_grpc(supervised, tiny_dev, model, input_name, stub):
    """With the admin key, which the internal dit_engine needs: the size check itself refuses it."""
    processes, stubs = supervised.children(), stub_pids(supervised.repository, stub)
    assert stubs
    body, headers = wrapping_http_request(input_name)
    status, text = http_post(supervised.url, f"/v2/models/{model}/infer", body, {**headers, ADMIN_HEADER: "test-key"})
    assert status == 413, text
    assert f"input '{input_name}': shape [1, {WRAPPING_TOKENS}, 4] of FP32 is {WRAPPING_TOKENS * 16} bytes" in text
    with grpc.insecure_channel(supervised.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            wrapping_grpc_request(model, input_name), metadata=[(ADMIN_HEADER, "test-key")]
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"input '{input_name}'" in refused.value.details()
    # Nothing crashed or was restarted, and the public models answer as diffusers does.
    assert supervised.children() == processes
    assert stub_pids(supervised.repository, stub) == stubs
    assert answers_correctly(supervised.url, "dit_transformer", tiny_dev)
    assert answers_correctly(supervised.url, "flux_dit", tiny_dev)


@pytest.mark.server
def test_json_nested_40000_levels_deep_is_refused(supervised, tiny_dev):
    processes = supervised.children()
    data = b"[" * 40_000 + b"1" + b"]" * 40_000
    body = b'{"inputs": [{"name": "timestep", "shape": [1], "datatype": "FP32", "data": ' + data + b"}]}"
    status, text = http_post(supervised.url, "/v2/models/dit_transformer/infer", body, {})
    assert status == 400, text
    assert json.loads(text)["error"].startswith("inference request: JSON nested deeper than")
    assert supervised.children() == processes
    assert answers_correctly(supervised.url, "dit_transformer", tiny_dev)


@pytest.mark.server
def test_grpc_inference_and_streams_pass_the_guard(supervised, tiny_dev):
    step = inputs.random_step(DEV, height=128, width=128, seed=5)
    expected = call.reference_call(tiny_dev, step)
    valid = grpc_request("dit_transformer", step.wire())
    with grpc.insecure_channel(supervised.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (noise_pred(stub.ModelInfer(valid)) - expected).abs().max() < 1e-4
        stream = stub.ModelStreamInfer(iter([valid, wrapping_grpc_request("dit_transformer", "hidden_states")]))
        first = next(stream)
        assert not first.error_message
        assert (noise_pred(first.infer_response) - expected).abs().max() < 1e-4
        with pytest.raises(grpc.RpcError) as refused:
            next(stream)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "input 'hidden_states'" in refused.value.details()


def test_the_limit_admits_the_largest_request_the_models_allow():
    """dit_transformer's limits in FP32 (the CPU wire dtype; BF16 halves it): its largest valid request, as the
    guard's rules for it compute it, fits the guard's overall limit."""
    settings = TransformerSettings()
    signature = DitSignature.from_config(FLUX_DEV_CONFIG, torch.float32)
    sizes = {**signature.sizes, "N": settings.max_image_tokens, "S": settings.max_text_tokens}
    largest = settings.max_batch * sum(math.prod(spec.resolve(sizes)) * 4 for spec in INPUTS)
    config = {"name": "dit_transformer", "max_batch_size": settings.max_batch,
              "input": [signature.tensor_config(spec) for spec in INPUTS],
              "parameters": {"max_image_tokens": {"string_value": str(settings.max_image_tokens)},
                             "max_text_tokens": {"string_value": str(settings.max_text_tokens)}}}  # fmt: skip
    rules = ModelRules.from_config(config)
    assert largest < rules.max_body_bytes() <= largest + (64 << 10)
    assert rules.max_body_bytes() <= LIMIT < 2 * largest, (largest, LIMIT)


def test_the_checks_refuse_sizes_that_do_not_add_up():
    header = {"name": "hidden_states", "shape": [1, 16, 4], "datatype": "FP32"}
    good = json.dumps({"inputs": [{**header, "parameters": {"binary_data_size": 256}}]}).encode()
    check_http_infer(good + bytes(256), len(good), LIMIT)
    shared = {"shared_memory_region": "r", "shared_memory_byte_size": 512}
    for entry, binary, message in [
        ({**header, "parameters": {"binary_data_size": 255}}, 255, "is 256 bytes, but 255 were sent"),
        ({**header, "parameters": shared}, None, "is 256 bytes, but 512 were sent"),
        ({**header, "shape": [1, -16, 4], "data": [1]}, None, "shape must be a list of non-negative integers"),
        ({**header, "shape": "16", "data": [1]}, None, "shape must be a list of non-negative integers"),
    ]:
        body = json.dumps({"inputs": [entry]}).encode()
        with pytest.raises(Refused, match=message):
            check_http_infer(body + bytes(binary or 0), len(body) if binary else None, LIMIT)
    with pytest.raises(Refused, match=f"{INFER_HEADER}: expected a byte count"):
        header_length(str(len(good) + 1), len(good))
    with pytest.raises(Refused, match="declare 256 bytes of binary data, but 255 follow"):
        check_http_infer(good + bytes(255), len(good), LIMIT)
    request = grpc_request("m", {"hidden_states": np.zeros((1, 16, 4), np.float32)})
    check_grpc_infer(request.SerializeToString(), LIMIT)
    request.raw_input_contents[0] = bytes(255)
    with pytest.raises(Refused, match="is 256 bytes, but 255 were sent"):
        check_grpc_infer(request.SerializeToString(), LIMIT)
    with pytest.raises(Refused, match="not a ModelInferRequest"):
        check_grpc_infer(b"\xff\xff\xff", LIMIT)


TIMESTEP = {"name": "timestep", "shape": [1, 1], "datatype": "FP32", "data": [500.0]}
MALFORMED = {
    "not-json": (b"{nope", "not valid JSON"),
    "no-inputs-list": (json.dumps({"inputs": {"timestep": 1}}).encode(), "a list of 'inputs'"),
    "datatype-number": (json.dumps({"inputs": [{**TIMESTEP, "datatype": 5}]}).encode(), "a string 'datatype'"),
    "no-name": (json.dumps({"inputs": [{k: v for k, v in TIMESTEP.items() if k != "name"}]}).encode(), "'name'"),
    "shape-float": (json.dumps({"inputs": [{**TIMESTEP, "shape": [1.5]}]}).encode(), "non-negative integers"),
    "data-string": (json.dumps({"inputs": [{**TIMESTEP, "data": "abc"}]}).encode(), "Unable to parse 'data'"),
    "outputs-string": (json.dumps({"inputs": [TIMESTEP], "outputs": "x"}).encode(), "(and of 'outputs')"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fields_get_400_naming_the_field(supervised, case):
    """Triton 2.51 answers several of these with 500; through the guard each is the caller's 400."""
    body, message = MALFORMED[case]
    status, text = http_post(supervised.url, "/v2/models/dit_transformer/infer", body, {})
    assert status == 400 and message in json.loads(text)["error"], (status, text)
