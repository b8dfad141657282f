"""The connection to one served DiT: settings, readiness, and the model's concrete contract as
the server describes it (its config), with server failures turned into clear exceptions."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from flux_triton.client.transport import TRANSPORTS
from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature, Step
from flux_triton.contract.protocol import ADMIN_KEY_ENV, GUIDANCE_REQUIRED, admin_headers, grpc_endpoint
from flux_triton.contract.served import ServedConfigError, signature_from_config


class RemoteDitError(RuntimeError):
    """The server is unreachable or not ready, the model is missing, or a request failed; the
    message names the URL and model and carries the server's own message."""


@dataclass(frozen=True)
class RemoteSettings:
    """Where and how to reach the DiT; the defaults match the shipped server and model repository."""

    url: str = "localhost:8000"
    grpc_url: str = ""  # Triton's gRPC endpoint (streamed generations); "": url's host, port 8001
    model_name: str = "dit_transformer"
    model_version: str = ""
    connection_timeout_s: float = 5.0
    network_timeout_s: float = 300.0
    wire_dtype: str = "auto"  # auto: the served model's dtype; else FP32/BF16/FP16, checked against the server
    guidance_embeds: bool | None = None  # None: ask the server
    transport: str = "http"  # http: tensors in the request body; shm: system shared memory (same host only)
    sessions: bool | None = None  # one sequence per generation, the prompt sent once; None: where the model keeps them
    # The server's admin key, for the APIs `make serve` restricts (shared-memory registration among them).
    admin_key: str | None = field(default_factory=lambda: os.environ.get(ADMIN_KEY_ENV))
    # Several replicas of the model (client.replicas): each generation stays on one, and moves to another when its
    # own stops answering. ``urls``: their endpoints (empty: ``url`` alone); ``resolve``: every address the host
    # name of ``url`` resolves to (a Kubernetes headless Service), looked up again every ``resolve_interval_s``.
    urls: tuple[str, ...] = ()
    resolve: bool = False
    resolve_interval_s: float = 30.0

    @property
    def grpc_address(self) -> str:
        return grpc_endpoint(self.url, self.grpc_url)

    @property
    def admin_headers(self) -> dict[str, str] | None:
        return admin_headers(self.admin_key)

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        object.__setattr__(self, "urls", tuple(self.urls))
        if self.urls and self.resolve:
            raise ValueError("urls and resolve: give the replicas' endpoints or a name that resolves to them, not both")
        if self.transport == "shm" and (len(self.urls) > 1 or self.resolve):
            raise ValueError("transport shm shares memory with one server on this host; several replicas need http")


def connect(settings: RemoteSettings) -> httpclient.InferenceServerClient:
    """A client for a live, ready server with the model ready; raises ``RemoteDitError`` fast otherwise."""
    client = httpclient.InferenceServerClient(
        settings.url,
        connection_timeout=settings.connection_timeout_s,
        network_timeout=settings.network_timeout_s,
    )
    where = f"Triton server at {settings.url}"
    try:
        ready = client.is_server_ready()
    except Exception as exc:  # connection refused, DNS, timeout: geventhttpclient raises several types
        client.close()
        raise RemoteDitError(f"{where} is not reachable: {type(exc).__name__}: {exc}") from exc
    if not ready:
        client.close()
        raise RemoteDitError(f"{where} is reachable but not ready (still loading, or shutting down)")
    if not client.is_model_ready(settings.model_name, settings.model_version):
        known = _model_names(client)
        client.close()
        raise RemoteDitError(
            f"model '{settings.model_name}' is not ready on the {where}; models there: {', '.join(known) or 'none'}"
        )
    return client


def _model_names(client: httpclient.InferenceServerClient) -> list[str]:
    try:
        return [f"{m['name']} ({m.get('state', '?')})" for m in client.get_model_repository_index()]
    except InferenceServerException:
        return []


def takes_guidance(client: httpclient.InferenceServerClient, settings: RemoteSettings, config: Mapping) -> bool:
    """Whether the served model has guidance embeddings.

    A required ``guidance`` input means yes and no ``guidance`` input means no. The contract
    declares it optional for every model (so a wrong request gets a clear error), so then one
    one-token request without guidance asks the model: a guidance model refuses it with
    ``GUIDANCE_REQUIRED``. Validation checks guidance before anything else, so any other answer
    (an engine's minimum size, say) means the model has no guidance embeddings."""
    entry = next((entry for entry in config.get("input", []) if entry["name"] == "guidance"), None)
    if entry is None:
        return False
    if not entry.get("optional", False):
        return True
    probe = Step.probe(served_signature(config, guidance_embeds=False))
    try:
        infer_step(client, settings.model_name, probe.wire(), settings.model_version)
    except InferenceServerException as exc:
        return GUIDANCE_REQUIRED in str(exc.message())
    return False


def served_signature(config: Mapping, guidance_embeds: bool) -> DitSignature:
    """The served model's signature (``contract.served``), its errors as ``RemoteDitError``."""
    try:
        return signature_from_config(config, guidance_embeds)
    except ServedConfigError as exc:
        raise RemoteDitError(str(exc)) from None


def describe(client: httpclient.InferenceServerClient, settings: RemoteSettings) -> DitSignature:
    """The served model's signature, honouring ``settings.wire_dtype`` and ``settings.guidance_embeds``."""
    try:
        config = client.get_model_config(settings.model_name, settings.model_version)
    except ValueError as exc:  # no JSON: Triton's metrics service answers 200, empty, to every path
        raise RemoteDitError(
            f"{settings.url} answers, but not as a Triton HTTP endpoint (its model config is no JSON: {exc}); "
            "is it the server's metrics port?"
        ) from exc
    guidance = settings.guidance_embeds
    if guidance is None:
        guidance = takes_guidance(client, settings, config)
    signature = served_signature(config, guidance)
    if settings.wire_dtype not in ("auto", signature.dtype):
        raise RemoteDitError(
            f"wire_dtype {settings.wire_dtype} does not match model '{settings.model_name}' at {settings.url}, "
            f"which takes {signature.dtype} floats"
        )
    return signature
