"""The shipped server (``python -m flux_triton serve``) puts a guard in front of tritonserver 2.51. The
requests that crash that server or one of its models are refused with a reason, over HTTP and gRPC; the
server and the models' stubs keep their processes, every model answers correctly afterwards, and the
largest refused requests leave no memory behind."""

from __future__ import annotations

import http.client
import json
import math
import zlib

import grpc
import numpy as np
import pytest
import torch
from helpers import DEV, answers_correctly, rss_mib, stub_pids
from tritonclient.grpc import service_pb2, service_pb2_grpc

from flux_triton.client.wire import to_numpy
from flux_triton.contract import INPUTS, OUTPUT_NAME, TORCH_TO_TRITON, DitSignature
from flux_triton.contract.tensors import engine_tensor_name
from flux_triton.deploy.guard import INFER_HEADER, GuardSettings, Refused, check_http_infer
from flux_triton.deploy.guard_grpc import check_grpc_infer
from flux_triton.model.presets import FLUX_DEV_CONFIG
from flux_triton.pipeline import call, inputs
from flux_triton.serving.service import ServeSettings

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
    processes, stubs = supervised.children(), stub_pids(supervised.repository, stub)
    assert stubs
    status, text = http_post(supervised.url, f"/v2/models/{model}/infer", *wrapping_http_request(input_name))
    assert status == 413, text
    assert f"input '{input_name}': shape [1, {WRAPPING_TOKENS}, 4] of FP32 is {WRAPPING_TOKENS * 16} bytes" in text
    with grpc.insecure_channel(supervised.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(wrapping_grpc_request(model, input_name))
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


def gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(wbits=31)  # gzip
    chunk = bytes(1 << 20)
    return b"".join(packer.compress(chunk) for _ in range(size >> 20)) + packer.flush()


@pytest.mark.server
def test_oversized_bodies_are_refused_and_leave_no_memory(supervised, tiny_dev):
    processes = supervised.children()
    before = {name: rss_mib(pid) for name, pid in processes.items()}
    connection = http.client.HTTPConnection(supervised.url, timeout=60)  # 1 GiB announced, never sent
    connection.putrequest("POST", "/v2/models/dit_transformer/infer")
    connection.putheader("Content-Length", str(1 << 30))
    connection.endheaders(bytes(1 << 16))
    response = connection.getresponse()
    assert (response.status, f"request body: {1 << 30} bytes, over this server's limit of {LIMIT}") == (
        413, json.loads(response.read())["error"]
    )  # fmt: skip
    connection.close()
    bomb = gzip_of_zeros(1 << 30)  # ~1 MiB inflating to 1 GiB
    status, text = http_post(supervised.url, "/v2/models/dit_transformer/infer", bomb, {"Content-Encoding": "gzip"})
    assert (status, f"request body: over this server's limit of {LIMIT} bytes") == (413, json.loads(text)["error"])
    after = {name: rss_mib(pid) for name, pid in processes.items()}
    print(f"resident MiB before {before}, after the refused requests {after}")
    assert all(after[name] - before[name] < 64 for name in processes), (before, after)
    assert supervised.children() == processes
    assert answers_correctly(supervised.url, "dit_transformer", tiny_dev)


def test_the_limit_admits_the_largest_request_the_models_allow():
    """dit_transformer's limits in FP32 (the CPU wire dtype; BF16 halves it) against the guard's limit."""
    settings = ServeSettings()
    signature = DitSignature.from_config(FLUX_DEV_CONFIG, torch.float32)
    sizes = {**signature.sizes, "N": settings.max_image_tokens, "S": settings.max_text_tokens}
    largest = settings.max_batch * sum(math.prod(spec.resolve(sizes)) * 4 for spec in INPUTS)
    assert largest <= LIMIT < 2 * largest, (largest, LIMIT)


def test_the_checks_refuse_sizes_that_do_not_add_up():
    header = {"name": "hidden_states", "shape": [1, 16, 4], "datatype": "FP32"}
    good = json.dumps({"inputs": [{**header, "parameters": {"binary_data_size": 256}}]}).encode()
    check_http_infer(good + bytes(256), str(len(good)), LIMIT)
    for entry, message in [
        ({**header, "parameters": {"binary_data_size": 255}}, "is 256 bytes, but 255 were sent"),
        ({**header, "parameters": {"shared_memory_byte_size": 512}}, "is 256 bytes, but 512 were sent"),
        ({**header, "shape": [1, -16, 4]}, "shape must be a list of non-negative integers"),
        ({**header, "shape": "16"}, "shape must be a list of non-negative integers"),
    ]:
        with pytest.raises(Refused, match=message):
            check_http_infer(json.dumps({"inputs": [entry]}).encode(), None, LIMIT)
    with pytest.raises(Refused, match=f"{INFER_HEADER}: expected a byte count"):
        check_http_infer(good, str(len(good) + 1), LIMIT)
    request = grpc_request("m", {"hidden_states": np.zeros((1, 16, 4), np.float32)})
    check_grpc_infer(request.SerializeToString(), LIMIT)
    request.raw_input_contents[0] = bytes(255)
    with pytest.raises(Refused, match="is 256 bytes, but 255 were sent"):
        check_grpc_infer(request.SerializeToString(), LIMIT)


TIMESTEP = {"name": "timestep", "shape": [1, 1], "datatype": "FP32", "data": [500.0]}
MALFORMED = {
    "not-json": (b"{nope", "not valid JSON"),
    "no-inputs-list": (json.dumps({"inputs": {"timestep": 1}}).encode(), "a list of 'inputs'"),
    "datatype-number": (json.dumps({"inputs": [{**TIMESTEP, "datatype": 5}]}).encode(), "string 'name' and 'datatype'"),
    "no-name": (json.dumps({"inputs": [{k: v for k, v in TIMESTEP.items() if k != "name"}]}).encode(), "'name'"),
    "shape-float": (json.dumps({"inputs": [{**TIMESTEP, "shape": [1.5]}]}).encode(), "non-negative integers"),
    "data-string": (json.dumps({"inputs": [{**TIMESTEP, "data": "abc"}]}).encode(), "Unable to parse 'data'"),
    "outputs-string": (json.dumps({"inputs": [TIMESTEP], "outputs": "x"}).encode(), "Unable to parse 'outputs'"),
}


@pytest.mark.server
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fields_get_400_naming_the_field(supervised, case):
    """Triton 2.51 answers several of these with 500; through the guard each is the caller's 400."""
    body, message = MALFORMED[case]
    status, text = http_post(supervised.url, "/v2/models/dit_transformer/infer", body, {})
    assert status == 400 and message in json.loads(text)["error"], (status, text)
