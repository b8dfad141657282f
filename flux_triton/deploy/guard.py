"""A guard in front of tritonserver: requests that would crash the bundled 2.51 never reach it.

Two requests crash that server before any project code runs: an input whose declared shape makes its
byte size wrap past 2^64 (it passes Triton's size check and aborts the Python-backend stub), and an HTTP
JSON body nested ~40,000 levels deep (the whole server segfaults). The guard listens on the public HTTP,
gRPC and metrics ports and forwards to a server bound to loopback. Before forwarding it checks, with
Python's unbounded integers, that every input's element count times its element size fits the
request-size limit and equals the bytes sent (binary data, raw contents or a shared-memory byte size);
it caps every body (gzip and deflate bodies after inflating) and parses every JSON body, whose nesting
Python's parser bounds far below the crash. Everything else is Triton's to check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# Bytes per element of Triton's datatypes; BYTES elements carry at least a 4-byte length.
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                 "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}  # fmt: skip
INFER_HEADER = "Inference-Header-Content-Length"
PARSE_ERRORS = (b'{"error":"Unable to parse', b'{"error":"failed to parse the request JSON')
# Per-connection headers, and those the guard sets itself (the body it forwards is inflated).
NOT_FORWARDED = {"host", "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class GuardSettings:
    # Above the largest request the shipped limits allow: dit_transformer's B=16, 16384 image tokens and
    # 512 text tokens in FP32 are 205 MB (tests/test_guard.py computes it from the contract).
    max_request_mib: int = 256

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mib << 20


class Refused(ValueError):
    """A request the guard does not forward; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_input(name: str, datatype: str, shape, limit: int, sent_bytes: int | None) -> None:
    """Refuse an input whose shape is not a list of counts, whose bytes exceed ``limit``, or whose
    ``sent_bytes`` (binary, raw or shared-memory bytes; ``None``: JSON data) differ from its shape's."""
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Refused(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    size = math.prod(shape) * ELEMENT_BYTES.get(datatype, 1)
    if size > limit:
        raise Refused(f"input '{name}': shape {list(shape)} of {datatype} is {size} bytes, over this server's "
                      f"request limit of {limit} bytes", 413)  # fmt: skip
    if sent_bytes is not None and datatype != "BYTES" and sent_bytes != size:
        raise Refused(f"input '{name}': shape {list(shape)} of {datatype} is {size} bytes, but {sent_bytes} were sent")


def parse_json(body: bytes, what: str):
    """``body`` parsed; Python's parser stops at its recursion limit (~1,000 levels), far below the
    nesting that crashes the server."""
    try:
        return json.loads(body)
    except RecursionError:
        raise Refused(f"{what}: JSON nested deeper than {sys.getrecursionlimit()} levels") from None
    except ValueError as exc:
        raise Refused(f"{what}: not valid JSON ({exc})") from None


def check_http_infer(body: bytes, header_length: str | None, limit: int) -> None:
    """Check an HTTP/REST inference request: its JSON header and every input's size."""
    header = body if header_length is None else body[: _header_length(header_length, len(body))]
    request = parse_json(header, "inference request")
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        raise Refused("inference request: expected a JSON object with a list of 'inputs'")
    for entry in inputs:
        if not isinstance(entry, dict):
            raise Refused(f"inference request: each input must be a JSON object, got {entry!r:.80}")
        name, datatype, parameters = entry.get("name"), entry.get("datatype"), entry.get("parameters", {})
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(parameters, dict):
            raise Refused(f"inference request: each input needs a string 'name' and 'datatype' and object "
                          f"'parameters', got {entry!r:.120}")  # fmt: skip
        sent = parameters.get("binary_data_size", parameters.get("shared_memory_byte_size"))
        if sent is not None and (not isinstance(sent, int) or isinstance(sent, bool)):
            raise Refused(f"input '{name}': byte size must be an integer, got {sent!r:.80}")
        check_input(name, datatype, entry.get("shape"), limit, sent)


def _header_length(value: str, body_length: int) -> int:
    if not value.isdigit() or int(value) > body_length:
        raise Refused(f"{INFER_HEADER}: expected a byte count of at most {body_length}, got {value!r:.40}")
    return int(value)


def http_app(backend: str, settings: GuardSettings, check_infer: bool = True) -> web.Application:
    """An app that forwards every request to ``backend`` (``host:port``), checking inference requests."""
    limit = settings.max_request_bytes
    # aiohttp inflates gzip/deflate bodies as it reads and stops at client_max_size (413).
    app = web.Application(client_max_size=limit)

    async def session(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        # The caller's Accept-Encoding only: aiohttp's default would have the server compress every answer.
        app["session"] = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        )
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        try:
            if request.content_length is not None and request.content_length > limit:
                raise Refused(f"request body: {request.content_length} bytes, over this server's limit of {limit}", 413)
            body = await request.read()
            if check_infer and request.method == "POST" and request.path.endswith("/infer"):
                check_http_infer(body, request.headers.get(INFER_HEADER), limit)
            elif body and request.content_type == "application/json":
                parse_json(body, "request body")
        except Refused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"request body: over this server's limit of {limit} bytes"}, status=413)
        headers = {key: value for key, value in request.headers.items() if key.lower() not in NOT_FORWARDED}
        url = f"http://{backend}{request.rel_url}"
        try:
            async with app["session"].request(request.method, url, data=body, headers=headers) as answer:
                payload = await answer.read()
                kept = {key: value for key, value in answer.headers.items() if key.lower() not in NOT_FORWARDED}
                if "Content-Encoding" in answer.headers:  # passed through still compressed
                    kept["Content-Encoding"] = answer.headers["Content-Encoding"]
                return web.Response(status=_status(answer.status, payload), body=payload, headers=kept)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"tritonserver at {backend} is unavailable: {exc}"}, status=503)

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def _status(status: int, payload: bytes) -> int:
    """Triton 2.51 answers a request it cannot parse (a malformed field) with 500: that is the caller's 400."""
    return 400 if status == 500 and payload.startswith(PARSE_ERRORS) else status


@dataclass(frozen=True)
class Endpoint:
    """One public port and the server port behind it (``check``: inspect inference requests)."""

    port: int
    backend: str
    check: bool = True


async def serve_guard(address: str, http: Endpoint, grpc: Endpoint, metrics: Endpoint, settings: GuardSettings):
    from flux_triton.deploy.guard_grpc import grpc_server

    runners = []
    for endpoint in (http, metrics):
        runner = web.AppRunner(http_app(endpoint.backend, settings, endpoint.check), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, address, endpoint.port).start()
        runners.append(runner)
    server = grpc_server(address, grpc.port, grpc.backend, settings)
    await server.start()
    print(f"guard: {address}:{http.port} (HTTP), {grpc.port} (gRPC), {metrics.port} (metrics) -> "
          f"{http.backend}, {grpc.backend}, {metrics.backend}; requests up to {settings.max_request_mib} MiB",
          flush=True)  # fmt: skip
    try:
        await server.wait_for_termination()
    finally:
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """``python -m flux_triton guard``: the guard alone, in front of a running tritonserver."""
    parser = argparse.ArgumentParser(prog="python -m flux_triton guard", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1", help="bind address (default: loopback only)")
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002}
    for name, port in ports.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"public {name} port")
        parser.add_argument(f"--{name}-backend", required=True, help=f"tritonserver's {name} HOST:PORT")
    parser.add_argument("--max-request-mib", type=int, default=GuardSettings.max_request_mib)
    args = parser.parse_args(argv)
    http, grpc, metrics = (
        Endpoint(getattr(args, f"{name}_port"), getattr(args, f"{name}_backend"), name != "metrics") for name in ports
    )
    asyncio.run(serve_guard(args.address, http, grpc, metrics, GuardSettings(args.max_request_mib)))


@dataclass
class GuardProcess:
    """``python -m flux_triton guard`` as a child process (it imports neither torch nor the models)."""

    address: str
    ports: tuple[int, int, int]  # public HTTP, gRPC, metrics
    settings: GuardSettings
    process: subprocess.Popen | None = None

    def command(self, backends: tuple[str, str, str]) -> list[str]:
        command = [sys.executable, "-m", "flux_triton", "guard", "--address", self.address]
        for name, port, backend in zip(("http", "grpc", "metrics"), self.ports, backends, strict=True):
            command += [f"--{name}-port={port}", f"--{name}-backend={backend}"]
        return [*command, f"--max-request-mib={self.settings.max_request_mib}"]

    def start(self, backends: tuple[str, str, str], timeout_s: float = 30.0) -> GuardProcess:
        """Start in front of tritonserver's HTTP, gRPC and metrics endpoints; return once it listens."""
        self.process = subprocess.Popen(self.command(backends))
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running():
            try:
                with socket.create_connection((host, self.ports[0]), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the guard did not listen on {host}:{self.ports[0]} within {timeout_s:.0f} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running():
            self.process.terminate()
            self.process.wait(timeout=30)
