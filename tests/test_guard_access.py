"""Who may call what through ``python -m flux_triton serve``: the restricted APIs (model control, shared memory,
logging, trace, statistics), the internal models and inferences that name shared-memory regions need the admin key,
on HTTP and gRPC alike (``flux-admin-key``; gRPC refusals are PERMISSION_DENIED, which clients do not retry);
model loads that override a config or a file are refused whatever the key; Triton's generate extension is refused,
and every other body is parsed, whatever its path or content type."""

from __future__ import annotations

import http.client
import json

import grpc
import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, TEXT_TOKENS, answers_correctly, step_call
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_inputs
from flux_triton.contract.protocol import ADMIN_HEADER
from flux_triton.pipeline import inputs

pytestmark = pytest.mark.server
KEY = {ADMIN_HEADER: "test-key"}
NESTED = b"[" * 100_000 + b"]" * 100_000


def call(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection(url, timeout=60)
    try:
        connection.request(method, path, body or None, headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


RESTRICTED_HTTP = [
    ("POST", "/v2/repository/index"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/logging"),
    ("GET", "/v2/trace/setting"),
    ("GET", "/v2/models/stats"),
    ("GET", "/v2/models/dit_transformer/stats"),
    ("GET", "/v2/models/dit_transformer/trace/setting"),
    ("GET", "/v2/models/dit_engine/config"),
    ("GET", "/v2/models/dit_preprocess/ready"),
]
RESTRICTED_GRPC = {
    "RepositoryIndex": service_pb2.RepositoryIndexRequest(),
    "SystemSharedMemoryStatus": service_pb2.SystemSharedMemoryStatusRequest(),
    "LogSettings": service_pb2.LogSettingsRequest(),
    "TraceSetting": service_pb2.TraceSettingRequest(),
    "ModelStatistics": service_pb2.ModelStatisticsRequest(name="dit_transformer"),
    "ModelConfig": service_pb2.ModelConfigRequest(name="dit_engine"),
}


def test_restricted_apis_and_internal_models_need_the_key_over_http_and_grpc(supervised):
    for method, path in RESTRICTED_HTTP:
        status, text = call(supervised.url, method, path, b"{}" if method == "POST" else b"")
        assert status == 403 and "needs this server's admin key (header flux-admin-key)" in text, (path, text)
        assert call(supervised.url, method, path, b"{}" if method == "POST" else b"", KEY)[0] == 200, path
    assert call(supervised.url, "GET", "/v2/models/dit_transformer/config")[0] == 200  # a public model's
    with grpc.insecure_channel(supervised.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for method, request in RESTRICTED_GRPC.items():
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "admin key" in refused.value.details()
            getattr(stub, method)(request, metadata=list(KEY.items()))
        stub.ModelConfig(service_pb2.ModelConfigRequest(name="flux_dit"))


def test_the_internal_models_answer_only_with_the_key_and_the_probes_carry_it(supervised, tiny_dev):
    step = inputs.random_step(DEV, height=256, width=256, seed=3)
    engine_step = step.engine_tensors(DEV)
    with httpclient.InferenceServerClient(supervised.url) as client:
        for model, tensors in (("dit_preprocess", step.wire()), ("dit_engine", engine_step)):
            with pytest.raises(InferenceServerException, match="needs this server's admin key"):
                client.infer(model, infer_inputs(tensors))
        answer = client.infer("dit_engine", infer_inputs(engine_step), headers=dict(KEY)).as_numpy("noise_pred")
        assert answer.shape == step.hidden_states.shape
    with grpc.insecure_channel(supervised.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
        request = service_pb2.ModelInferRequest(model_name="dit_engine")
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "[supervisor] dit_engine failed" not in supervised.log.read_text()  # its probes pass, with the key
    assert answers_correctly(supervised.url, "flux_dit", tiny_dev)


def test_model_loads_with_overrides_are_refused_whatever_the_key(supervised, tiny_dev):
    for parameters in ({"config": "{}"}, {"file:1/model.py": "aW1wb3J0IG9z"}):
        status, text = call(supervised.url, "POST", "/v2/repository/models/dit_transformer/load",
                            json.dumps({"parameters": parameters}).encode(), KEY)  # fmt: skip
        assert status == 403 and "is refused; the server loads models from its repository only" in text, text
    with grpc.insecure_channel(supervised.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
        request = service_pb2.RepositoryModelLoadRequest(model_name="dit_transformer")
        request.parameters["file:1/model.py"].bytes_param = b"import os"
        service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, metadata=list(KEY.items()))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert call(supervised.url, "POST", "/v2/repository/models/dit_transformer/load", b"{}", KEY)[0] == 200
    assert answers_correctly(supervised.url, "dit_transformer", tiny_dev)


def test_the_generate_extension_is_refused_and_every_body_is_parsed(supervised, tiny_dev):
    processes = supervised.children()
    for path in ("/v2/models/dit_transformer/generate", "/v2/models/dit_transformer/versions/1/generate_stream"):
        status, text = call(supervised.url, "POST", path, NESTED)  # no JSON content type
        assert status == 404 and "generate extension is not served" in text, text
    for path in ("/v2/repository/index", "/v2/models/dit_transformer/config"):
        status, text = call(supervised.url, "POST", path, NESTED, {**KEY, "Content-Type": "text/plain"})
        assert status == 400 and "JSON nested deeper than" in text, (path, text)
    status, text = call(supervised.url, "POST", "/v2/models/dit%5Ftransformer/infer", b"{}")
    assert status == 400 and "only letters, digits and _./- are accepted" in text
    for path in ("/v2/models/dit_transformer/../../repository/index", "/v2/models//stats", "/v2/./logging"):
        status, text = call(supervised.url, "POST" if "index" in path else "GET", path, b"")
        assert status == 400 and "segments are not accepted" in text, (path, text)
    assert call(supervised.metrics_url, "POST", "/metrics", NESTED)[0] == 405
    assert "nv_inference_request_success" in call(supervised.metrics_url, "GET", "/metrics")[1]
    assert supervised.children() == processes
    assert answers_correctly(supervised.url, "dit_transformer", tiny_dev)


def test_a_region_is_used_only_with_the_key(supervised, tiny_dev):
    """A client's shared-memory region, even by its secret name, cannot be read or written through an inference
    without the key; the client that registered it (with the key) uses it as before."""
    with RemoteFluxTransformer(url=supervised.url, transport="shm", admin_key="test-key") as victim:
        arguments = step_call(torch.randn(1, TEXT_TOKENS, 32), seed=4)
        (before,) = victim(**arguments)
        names = {name for name, _ in victim.transport.regions}
        step = inputs.random_step(DEV, height=64, width=64, seed=5)
        request = infer_inputs(step.wire())
        request[0].set_shared_memory(sorted(names)[0], step.hidden_states.nbytes)  # hidden_states
        with httpclient.InferenceServerClient(supervised.url) as attacker:
            with pytest.raises(InferenceServerException, match="an inference that names shared memory needs"):
                attacker.infer("dit_transformer", request)
            output = httpclient.InferRequestedOutput("noise_pred")
            output.set_shared_memory(sorted(names)[0], 256)
            with pytest.raises(InferenceServerException, match="an inference that names shared memory needs"):
                attacker.infer("dit_transformer", infer_inputs(step.wire()), outputs=[output])
        (after,) = victim(**arguments)
    assert torch.equal(before, after) and torch.equal(after, tiny_dev(**arguments)[0])
