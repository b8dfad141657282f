"""The guard's HTTP side: each request's route and key checked (``policy``), its body read within the request's
limit and the guard's memory budget, then parsed and checked (``checks``, the model's ``rules``) and forwarded."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from flux_triton.contract.protocol import ADMIN_HEADER
from flux_triton.deploy.guard import GuardSettings
from flux_triton.deploy.guard.checks import INFER_HEADER, Refused, check_http_infer, header_length, parse_json
from flux_triton.deploy.guard.policy import Policy, Route, check_load
from flux_triton.deploy.guard.rules import RulesCache
from flux_triton.deploy.sockets import UNIX

PARSE_ERRORS = (b'{"error":"Unable to parse', b'{"error":"failed to parse the request JSON')
# Per-connection headers and those the guard sets itself; of a request, also the admin key (checked here).
PER_CONNECTION = {"host", "content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}
NOT_FORWARDED = PER_CONNECTION | {INFER_HEADER.lower(), ADMIN_HEADER}
LARGE_BODY = 1 << 20  # after a body this large, the freed heap is handed back to the system


class Budget:
    """The bytes of request bodies the guard holds at once; a request that does not fit is answered 503."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise Refused(f"request body: the server holds {self.held} bytes of other requests' bodies; retry", 503)
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, and the guard's size would keep the
    largest bodies it ever held)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.asynccontextmanager
async def read_body(request: web.Request, limit: int, budget: Budget, settings: GuardSettings):
    """The request's body (at most ``limit`` bytes), held against ``budget`` until the block ends."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise Refused("request body: Content-Encoding is not accepted; send the body uncompressed", 415)
    announced = request.content_length
    if announced is not None and announced > limit:
        raise Refused(f"request body: {announced} bytes, over this server's limit of {limit} for this request", 413)
    held = announced or 0
    budget.take(held)
    body = bytearray()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        while True:
            wait = min(settings.body_idle_s, deadline - loop.time())
            try:
                chunk = await asyncio.wait_for(request.content.readany(), max(wait, 0.0))
            except TimeoutError:
                raise Refused(f"request body: {len(body)} of {announced or '?'} bytes came, then it stalled or took "
                              f"over {settings.body_timeout_s:g} s", 408) from None  # fmt: skip
            if not chunk:
                if announced is not None and len(body) < announced:
                    raise Refused(f"request body: {len(body)} of the {announced} bytes announced came")
                break
            if len(body) + len(chunk) > limit:
                raise Refused(f"request body: over this server's limit of {limit} bytes for this request", 413)
            if len(body) + len(chunk) > held:  # a chunked body: held as it comes
                budget.take(len(body) + len(chunk) - held)
                held = len(body) + len(chunk)
            body += chunk
        yield body
    finally:
        budget.give(held)
        large = len(body) >= LARGE_BODY
        del body
        if large:
            _trim_heap()


def _refusal(exc: Refused) -> web.Response:
    response = web.json_response({"error": str(exc)}, status=exc.status)
    response.force_close()  # the rest of a refused body is not read
    return response


def _status(status: int, payload: bytes) -> int:
    """Triton 2.51 answers a request it cannot parse (a malformed field) with 500: that is the caller's 400."""
    return 400 if status == 500 and payload.startswith(PARSE_ERRORS) else status


def _backend_session(backend: str) -> tuple[aiohttp.ClientSession, str]:
    """A client session to ``host:port`` or ``unix:PATH``, and the base URL to use with it."""
    if backend.startswith(UNIX):
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(backend.removeprefix(UNIX), limit=0)
        base = "http://localhost"
    else:
        connector, base = aiohttp.TCPConnector(limit=0), f"http://{backend}"
    # The caller's Accept-Encoding only: aiohttp's default would have the server compress every answer.
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                    auto_decompress=False, skip_auto_headers=("Accept-Encoding",))  # fmt: skip
    return session, base


class HttpGuard:
    """The HTTP side: reads a request's body, checks it for its route (``_check``), then forwards it to
    ``backend``."""

    def __init__(self, backend: str, settings: GuardSettings, policy: Policy):
        self.settings, self.policy = settings, policy
        self.budget = Budget(settings.max_buffered_mib << 20)
        self.session, self.base = _backend_session(backend)  # in the running event loop
        self.rules = RulesCache(self.model_config)

    async def close(self) -> None:
        await self.session.close()

    async def model_config(self, model: str) -> Mapping | None:
        """A model's config as the server serves it (``None``: not loaded)."""
        try:
            async with self.session.get(f"{self.base}/v2/models/{model}/config") as answer:
                return await answer.json() if answer.status == 200 else None
        except (aiohttp.ClientError, ValueError):
            return None

    async def _limit(self, route: Route) -> int:
        if route.kind != "infer":
            return self.settings.max_json_kib << 10
        rules = await self.rules.get(route.model)
        model_limit = rules.max_body_bytes() if rules is not None else None
        return min(self.settings.max_request_bytes, model_limit or self.settings.max_request_bytes)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            route = self.policy.http_route(request.raw_path.split("?", 1)[0])  # as sent: not percent-decoded
            if route.restricted:
                internal = route.model in self.policy.internal_models
                self.policy.require_key(request.headers.get(ADMIN_HEADER), route.model if internal else request.path)
            async with read_body(request, await self._limit(route), self.budget, self.settings) as body:
                headers = await self._check(request, route, body)
                return await self._forward(request, body, headers)
        except Refused as exc:
            return _refusal(exc)

    async def _check(self, request: web.Request, route: Route, body: bytearray) -> dict[str, str]:
        """Check the body for its route; returns the headers to forward."""
        headers = {key: value for key, value in request.headers.items() if key.lower() not in NOT_FORWARDED}
        if route.kind != "infer" and INFER_HEADER in request.headers:
            raise Refused(f"{INFER_HEADER}: only an inference request has one")
        if route.kind == "infer":
            if len(request.headers.getall(INFER_HEADER, [])) > 1:
                raise Refused(f"{INFER_HEADER}: given more than once")
            length = header_length(request.headers.get(INFER_HEADER), len(body))
            summary = check_http_infer(body, length, self.settings.max_request_bytes)
            if summary.shared_memory:
                self.policy.require_key(request.headers.get(ADMIN_HEADER), "an inference that names shared memory")
            rules = await self.rules.get(route.model)
            if rules is not None:
                rules.check(summary)
            if length is not None:
                headers[INFER_HEADER] = str(length)
        elif body:
            parsed = parse_json(body, "request body")
            if isinstance(parsed, dict) and "inputs" in parsed:  # checked as an inference, wherever it goes
                check_http_infer(body, None, self.settings.max_request_bytes)
            if route.kind == "load":
                check_load(parsed.get("parameters", {}) if isinstance(parsed, dict) else {})
        return headers

    async def _forward(self, request: web.Request, body: bytearray, headers: dict[str, str]) -> web.Response:
        try:
            async with self.session.request(request.method, f"{self.base}{request.path}", data=body or None,
                                            headers=headers) as answer:  # fmt: skip
                payload = await answer.read()
                kept = {key: value for key, value in answer.headers.items() if key.lower() not in PER_CONNECTION}
                if "Content-Encoding" in answer.headers:  # passed through still compressed
                    kept["Content-Encoding"] = answer.headers["Content-Encoding"]
                return web.Response(status=_status(answer.status, payload), body=payload, headers=kept)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"tritonserver is unavailable: {exc}"}, status=503)


def metrics_app(backend: str) -> web.Application:
    """The metrics port: ``GET /metrics`` forwarded, nothing with a body."""
    app = web.Application()

    async def session(app: web.Application):
        app["session"], app["base"] = _backend_session(backend)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") or request.body_exists:
            return web.json_response({"error": "the metrics port answers GET only"}, status=405)
        try:
            async with request.app["session"].get(f"{request.app['base']}{request.path}") as answer:
                payload = await answer.read()
                content_type = answer.headers.get("Content-Type", "text/plain")
                return web.Response(status=answer.status, body=payload, headers={"Content-Type": content_type})
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"tritonserver is unavailable: {exc}"}, status=503)

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def http_app(guard: HttpGuard) -> web.Application:
    """The public HTTP port (``client_max_size``: aiohttp's own cap, never reached: ``read_body`` reads)."""
    app = web.Application(client_max_size=guard.settings.max_request_bytes)
    app.router.add_route("*", "/{tail:.*}", guard.handle)
    return app
