"""How step tensors reach the server: ``http`` (binary data in the request body, any host) or
``shm`` (system shared memory, same host only; unchanged inputs are not rewritten)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import tritonclient.http as httpclient

from flux_triton.client.wire import infer_step
from flux_triton.contract.protocol import SequenceStep

TRANSPORTS = ("http", "shm")


class Transport(Protocol):
    def infer(
        self,
        model_name: str,
        tensors: Mapping[str, torch.Tensor],
        model_version: str = "",
        slot: str = "call",
        sequence: SequenceStep | None = None,
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class HttpTransport:
    """Every input in every request body (``client.wire``)."""

    def __init__(self, client: httpclient.InferenceServerClient):
        self._client = client

    def infer(
        self,
        model_name: str,
        tensors: Mapping[str, torch.Tensor],
        model_version: str = "",
        slot: str = "call",
        sequence: SequenceStep | None = None,
    ) -> torch.Tensor:
        return infer_step(self._client, model_name, tensors, model_version, sequence)

    def close(self) -> None:
        pass


def make_transport(
    kind: str, client: httpclient.InferenceServerClient, admin_headers: dict[str, str] | None = None
) -> Transport:
    """``admin_headers``: the server's admin key, where its shared-memory API is restricted."""
    if kind == "http":
        return HttpTransport(client)
    if kind == "shm":
        from flux_triton.client.shm import ShmTransport

        return ShmTransport(client, admin_headers)
    raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {kind!r}")
