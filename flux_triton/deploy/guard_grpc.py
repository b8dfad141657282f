"""The guard's gRPC side: every method of Triton's ``GRPCInferenceService`` forwarded as raw bytes, with
inference requests parsed and their inputs checked first (``guard.check_input``); messages over the
request limit are refused by gRPC itself."""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2

from flux_triton.deploy.guard import GuardSettings, Refused, check_input

SERVICE = "inference.GRPCInferenceService"
INFER_METHODS = {"ModelInfer", "ModelStreamInfer"}


def check_grpc_infer(message: bytes, limit: int) -> None:
    """Check a serialized ``ModelInferRequest``: every input's size against the limit and the bytes sent."""
    request = service_pb2.ModelInferRequest.FromString(message)
    raw = request.raw_input_contents
    for index, tensor in enumerate(request.inputs):
        sent = None
        if "shared_memory_byte_size" in tensor.parameters:
            sent = tensor.parameters["shared_memory_byte_size"].int64_param
        elif index < len(raw):
            sent = len(raw[index])
        check_input(tensor.name, tensor.datatype, list(tensor.shape), limit, sent)


def _forwarded_metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
    """The caller's metadata (the admin key among it), without what the channel sets itself."""
    skipped = ("user-agent", "grpc-")
    return [(key, value) for key, value in context.invocation_metadata() if not key.startswith((":", *skipped))]


def _handlers(channel: grpc.aio.Channel, limit: int) -> dict[str, grpc.RpcMethodHandler]:
    handlers = {}
    for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        path = f"/{SERVICE}/{method.name}"
        checked = method.name in INFER_METHODS
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream(channel, path, checked, limit))
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary(channel, path, checked, limit))
    return handlers


def _unary(channel: grpc.aio.Channel, path: str, checked: bool, limit: int):
    method = channel.unary_unary(path)

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if checked:
            try:
                check_grpc_infer(request, limit)
            except Refused as exc:
                await context.abort(_code(exc), str(exc))
        try:
            return await method(request, metadata=_forwarded_metadata(context))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())

    return forward


def _stream(channel: grpc.aio.Channel, path: str, checked: bool, limit: int):
    method = channel.stream_stream(path)

    async def forward(requests, context: grpc.aio.ServicerContext):
        call = method(metadata=_forwarded_metadata(context))
        refused: list[Refused] = []

        async def send() -> None:
            async for request in requests:
                if checked:
                    try:
                        check_grpc_infer(request, limit)
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


def _code(exc: Refused) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if exc.status == 413 else grpc.StatusCode.INVALID_ARGUMENT


def grpc_server(address: str, port: int, backend: str, settings: GuardSettings) -> grpc.aio.Server:
    """A gRPC server on ``address:port`` forwarding to tritonserver's gRPC endpoint ``backend``."""
    limit = settings.max_request_bytes
    sizes = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)]
    channel = grpc.aio.insecure_channel(backend, options=[("grpc.max_receive_message_length", -1),
                                                          ("grpc.max_send_message_length", limit)])  # fmt: skip
    server = grpc.aio.server(options=sizes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _handlers(channel, limit)),))
    if not server.add_insecure_port(f"{address}:{port}"):
        raise OSError(f"guard: cannot listen on {address}:{port} (gRPC)")
    return server
