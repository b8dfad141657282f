"""The guard's gRPC side: every method of Triton's ``GRPCInferenceService`` forwarded as raw bytes after the HTTP
side's checks: the admin key (metadata ``flux-admin-key``) for the restricted methods and the internal models,
inference requests parsed and checked against the request limit, the bytes sent and the model's rules, model loads
without overrides. Messages over the request limit are refused by gRPC itself; refusals answer
``INVALID_ARGUMENT``, ``RESOURCE_EXHAUSTED``, ``PERMISSION_DENIED`` or ``UNAVAILABLE`` as HTTP answers 400, 413,
403 or 503."""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2

from flux_triton.contract.protocol import ADMIN_HEADER
from flux_triton.deploy.guard.checks import Refused, check_grpc_infer
from flux_triton.deploy.guard.http_side import HttpGuard
from flux_triton.deploy.guard.policy import check_load

SERVICE = "inference.GRPCInferenceService"
METHODS = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
INFER_METHODS = {"ModelInfer", "ModelStreamInfer"}
CODES = {413: grpc.StatusCode.RESOURCE_EXHAUSTED, 403: grpc.StatusCode.PERMISSION_DENIED,
         404: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip


def _code(exc: Refused) -> grpc.StatusCode:
    return CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)


def _model_named(request) -> str | None:
    """The model a request names (``model_name`` or ``name``), if its message has such a field."""
    for field in ("model_name", "name"):
        if field in request.DESCRIPTOR.fields_by_name:
            return getattr(request, field) or None
    return None


class GrpcGuard:
    """Checks one message of a method as the HTTP side checks a request; the rules and budget are the HTTP side's."""

    def __init__(self, http: HttpGuard):
        self.http, self.policy, self.limit = http, http.policy, http.settings.max_request_bytes

    async def check(self, method, message: bytes, metadata: dict[str, str]) -> None:
        if method.name in INFER_METHODS:
            request, summary = check_grpc_infer(message, self.limit)
        else:
            try:
                request = getattr(service_pb2, method.input_type.name).FromString(message)
            except Exception as exc:  # protobuf's DecodeError, or a message of another type
                raise Refused(f"{method.name}: not a {method.input_type.name} ({exc})") from None
            summary = None
        model, key = _model_named(request), metadata.get(ADMIN_HEADER)
        if self.policy.grpc_restricted(method.name, model):
            self.policy.require_key(key, model if model in self.policy.internal_models else method.name)
        if method.name == "RepositoryModelLoad":
            check_load(request.parameters)
        if summary is not None:
            if summary.shared_memory:
                self.policy.require_key(key, "an inference that names shared memory")
            rules = await self.http.rules.get(request.model_name)
            if rules is not None:
                rules.check(summary)


def _forwarded_metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """The caller's metadata without what the channel sets itself and the admin key (checked here)."""
    skipped = ("user-agent", "grpc-", ":", ADMIN_HEADER)
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith(skipped)]


def _handlers(channel: grpc.aio.Channel, guard: GrpcGuard) -> dict[str, grpc.RpcMethodHandler]:
    handlers = {}
    for method in METHODS:
        path = f"/{SERVICE}/{method.name}"
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream(channel, path, method, guard))
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(channel, path, method, guard))
    return handlers


def _unary(channel: grpc.aio.Channel, path: str, method, guard: GrpcGuard):
    call = channel.unary_unary(path)

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        budget = guard.http.budget
        try:
            await guard.check(method, request, dict(context.invocation_metadata()))
            budget.take(len(request))
        except Refused as exc:
            await context.abort(_code(exc), str(exc))  # raises: the call ends here
        try:
            return await call(request, metadata=_forwarded_metadata(context))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())
        finally:
            budget.give(len(request))

    return forward


def _stream(channel: grpc.aio.Channel, path: str, method, guard: GrpcGuard):
    call_method = channel.stream_stream(path)

    async def forward(requests, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata())
        call = call_method(metadata=_forwarded_metadata(context))
        refused: list[Refused] = []

        async def send() -> None:
            async for request in requests:
                try:
                    await guard.check(method, request, metadata)
                except Refused as exc:  # stop here: the answers in flight still come, then the refusal
                    refused.append(exc)
                    break
                await call.write(request)
            await call.done_writing()

        sender = asyncio.create_task(send())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())
        finally:
            await sender
        if refused:
            await context.abort(_code(refused[0]), str(refused[0]))

    return forward


def grpc_server(address: str, port: int, backend: str, http: HttpGuard) -> grpc.aio.Server:
    """A gRPC server on ``address:port`` forwarding to tritonserver's gRPC endpoint ``backend`` (``host:port`` or
    ``unix:PATH``)."""
    limit = http.settings.max_request_bytes
    sizes = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
    channel = grpc.aio.insecure_channel(backend, options=[("grpc.max_receive_message_length", -1),
                                                          ("grpc.max_send_message_length", limit)])  # fmt: skip
    server = grpc.aio.server(options=sizes)
    handlers = _handlers(channel, GrpcGuard(http))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if not server.add_insecure_port(f"{address}:{port}"):
        raise OSError(f"guard: cannot listen on {address}:{port} (gRPC)")
    return server
