"""The wire protocol both ends share, besides the tensors: the headers, request parameters and sequence flags a
client sends, and the session settings a server announces. Needs no torch (the guard reads it)."""

from __future__ import annotations

from dataclasses import dataclass

# The server's admin key: model control, shared memory, logging, trace and statistics need it, and so do the
# internal models and any inference that names a shared-memory region. The same header on HTTP and gRPC.
ADMIN_HEADER = "flux-admin-key"
ADMIN_KEY_ENV = "FLUX_ADMIN_KEY"

# Every step of a generation session carries its sequence id in this header too, so that an ingress can keep the
# steps of one generation on one replica (Istio: a DestinationRule's consistentHash on this header). The id alone
# does not let anyone step on the sequence: that takes the session key.
SEQUENCE_HEADER = "flux-sequence-id"

# Request parameters. ``session_key``: the secret that binds a sequence to the client that started it, sent with
# every step of a sequence in the request body (never in a header, which proxies log); it also names the client
# for the per-client limit. ``cache``: at a sequence's START, the step cache it runs with (JSON; "": none).
SESSION_KEY_PARAMETER = "session_key"
CACHE_PARAMETER = "cache"

# How a guidance model refuses a request without guidance: a client asks a model whose config declares guidance
# optional (every model does, so that a wrong request gets the contract's message) with one request without it.
GUIDANCE_REQUIRED = "guidance: required"

# flux_dit's prompt across its two models: where dit_engine holds each sequence's prompt (one instance), dit_preprocess
# passes these on with zero text tokens on the steps whose request did not carry them; dit_engine fills in its own.
HELD_BY_ENGINE = ("encoder_hidden_states", "txt_ids")

# TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END, as the Python backend's request.flags() gives them.
START, END = 1, 2


@dataclass(frozen=True)
class SequenceStep:
    """A request's place in a generation session: its sequence id (0: a stateless step), the START and END flags,
    the session key, and at START the step cache the sequence runs with (JSON; "": none)."""

    sequence_id: int | str = 0
    start: bool = False
    end: bool = False
    key: str = ""
    cache: str = ""

    @classmethod
    def from_flags(cls, sequence_id: int | str, flags: int, parameters: dict) -> SequenceStep:
        """As Triton delivers it: the correlation id, the request's flags and its parameters."""
        key, cache = parameters.get(SESSION_KEY_PARAMETER, ""), parameters.get(CACHE_PARAMETER, "")
        return cls(sequence_id, bool(flags & START), bool(flags & END), str(key), str(cache))


STATELESS = SequenceStep()  # a step outside any sequence


@dataclass(frozen=True)
class SessionSettings:
    """How many generation sessions a model keeps: ``max_sessions`` live at most (at the limit, a START reclaims
    the least recently used one), ``max_per_client`` per session key (past it, a START reclaims that client's least
    recently used one), and each freed once idle for ``idle_timeout_s``."""

    max_sessions: int = 64
    max_per_client: int = 8
    idle_timeout_s: float = 120.0  # a client between two steps of one generation waits well under this


def admin_headers(key: str | None) -> dict[str, str] | None:
    """The request headers that carry a server's admin key (none without a key)."""
    return {ADMIN_HEADER: key} if key else None


def grpc_endpoint(http_url: str, grpc_url: str = "") -> str:
    """Where a server's gRPC endpoint is: ``grpc_url`` if given, else Triton's default port on ``http_url``'s host."""
    return grpc_url or f"{http_url.rsplit(':', 1)[0]}:8001"
