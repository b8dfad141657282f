"""One HTTP call to an endpoint given as ``host:port`` or ``unix:PATH``: under ``python -m flux_triton serve``,
tritonserver listens only on Unix sockets in a folder that no other local user can enter (``server.TritonServer``),
and the launcher, the supervisor and the guard reach it there."""

from __future__ import annotations

import http.client
import socket

UNIX = "unix:"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connection(endpoint: str, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP connection to ``host:port`` or ``unix:PATH``."""
    if endpoint.startswith(UNIX):
        return _UnixConnection(endpoint.removeprefix(UNIX), timeout_s)
    return http.client.HTTPConnection(endpoint, timeout=timeout_s)


def http_call(
    endpoint: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, bytes]:  # fmt: skip
    """``(status, body)`` of one request; raises ``OSError`` when the endpoint cannot be reached."""
    client = connection(endpoint, timeout_s)
    try:
        client.request(method, path, body or None, headers or {})
        response = client.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"{endpoint}: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()
