"""Several replicas of one served model: where each generation goes, and where it goes when its replica stops
answering.

The replicas are a list of endpoints (``RemoteSettings.urls``) or every address that the host name of
``RemoteSettings.url`` resolves to (``resolve=True``: a Kubernetes headless Service, whose name resolves to one
address per ready pod), looked up again every ``resolve_interval_s`` so that replicas that come and go are seen.
A new generation takes the next replica in turn (from a random start, so that clients spread); a replica that did
not answer is passed over for ``retry_after_s``. Connections open on first use, one client per replica.
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from flux_triton.client.connection import RemoteDitError, RemoteSettings

# A replica that did not answer is passed over this long before it is tried again.
RETRY_AFTER_S = 30.0

Resolver = Callable[[str, int], list[str]]


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica did not answer (refused, reset, timed out) or could not be opened (not
    ready, another model), not that it refused the request."""
    return isinstance(exc, OSError | http.client.HTTPException | RemoteDitError)


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for TCP, in the resolver's order, each once."""
    found = []
    for *_, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if address[0] not in found:
            found.append(address[0])
    return found


def split_endpoint(url: str) -> tuple[str, int, str]:
    """``host:port[/base-path]`` as ``(host, port, "/base-path" or "")``; IPv6 hosts in brackets."""
    address, slash, path = url.partition("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint {url!r}: expected host:port")
    return host.strip("[]"), int(port), slash + path


def endpoint(host: str, port: int, path: str = "") -> str:
    """The endpoint of ``host:port``, an IPv6 address in brackets."""
    try:
        bracketed = ipaddress.ip_address(host).version == 6
    except ValueError:
        bracketed = False
    return f"[{host}]:{port}{path}" if bracketed else f"{host}:{port}{path}"


@dataclass
class Replica:
    url: str
    client: object | None = None  # tritonclient.http.InferenceServerClient, once connected
    transport: object | None = None  # client.transport.Transport
    down_until: float = 0.0


# Opens a replica: its client and transport (raises RemoteDitError when it is not reachable or not serving the model).
Opener = Callable[[RemoteSettings], tuple[object, object]]


class Replicas:
    """The replicas of one model; ``opener`` connects to one (``RemoteSettings`` with its ``url``)."""

    def __init__(
        self,
        settings: RemoteSettings,
        opener: Opener,
        resolver: Resolver = resolve_addresses,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._opener = opener
        self._resolver = resolver
        self._clock = clock
        self._replicas: dict[str, Replica] = {}
        self._endpoints: list[str] = []
        self._resolved_at: float | None = None
        self._turn = random.randrange(1 << 16)  # clients start at different replicas
        self._closed = False
        self.moved = 0  # generations moved to another replica because theirs did not answer

    @property
    def several(self) -> bool:
        """Whether more than one replica may serve (a list, or a name that may resolve to several)."""
        return self.settings.resolve or len(self.settings.urls) > 1

    def endpoints(self) -> list[str]:
        """The replicas' endpoints now (a name's addresses looked up again when due)."""
        if not self.settings.resolve:
            return list(self.settings.urls or (self.settings.url,))
        now = self._clock()
        if self._resolved_at is None or now - self._resolved_at >= self.settings.resolve_interval_s:
            host, port, path = split_endpoint(self.settings.url)
            try:
                addresses = self._resolver(host, port)
            except OSError as exc:
                if not self._endpoints:
                    raise RemoteDitError(f"{self.settings.url}: the name does not resolve ({exc})") from exc
                addresses = None  # keep the last answer
            if addresses:
                self._endpoints = [endpoint(address, port, path) for address in addresses]
            self._resolved_at = now
        return list(self._endpoints)

    def replica(self, url: str) -> Replica:
        """The replica at ``url``, connected (raises ``RemoteDitError`` when it cannot be)."""
        if self._closed:
            raise RemoteDitError("the remote transformer is closed: its transport is closed, and its connections")
        replica = self._replicas.setdefault(url, Replica(url))
        if replica.client is None:
            try:
                own = replace(self.settings, url=url, urls=(), resolve=False)
                replica.client, replica.transport = self._opener(own)
            except RemoteDitError:
                self.mark_down(url)
                raise
        return replica

    def mark_down(self, url: str) -> None:
        """``url`` did not answer: pass it over for a while, and open a new connection when it is tried again."""
        replica = self._replicas.setdefault(url, Replica(url))
        replica.down_until = self._clock() + RETRY_AFTER_S
        self._drop_connection(replica)

    def choose(self, avoid: str | None = None) -> Replica:
        """The replica for a new generation: the next in turn that is up and connects (``avoid`` last)."""
        endpoints = self.endpoints()
        now = self._clock()
        start = self._turn % max(len(endpoints), 1)
        self._turn += 1
        ordered = endpoints[start:] + endpoints[:start]
        up = [url for url in ordered if url != avoid and self._replicas.get(url, Replica(url)).down_until <= now]
        rest = [url for url in ordered if url not in up and url != avoid]
        failures = []
        for url in up + rest + ([avoid] if avoid in endpoints else []):
            try:
                return self.replica(url)
            except RemoteDitError as exc:
                failures.append(exc)
        if len(failures) == 1:  # one server: its own error
            raise failures[0]
        raise RemoteDitError(
            f"no replica of '{self.settings.model_name}' answers: {'; '.join(map(str, failures)) or 'none'}"
        )

    def connected(self, url: str) -> Replica | None:
        """The replica at ``url`` if it has an open connection (none is opened)."""
        replica = self._replicas.get(url)
        return replica if replica is not None and replica.client is not None else None

    def _drop_connection(self, replica: Replica) -> None:
        transport, client = replica.transport, replica.client
        replica.transport = replica.client = None
        for closable in (transport, client):
            try:
                if closable is not None:
                    closable.close()
            except Exception:  # a connection that broke may fail to close; nothing is held
                pass

    def close(self) -> None:
        self._closed = True
        for replica in self._replicas.values():
            self._drop_connection(replica)
