"""A guard in front of tritonserver: every request is read, checked and forwarded by it, so that what would crash
the bundled 2.51, take a model down or reach what only the admin may use never gets there.

The guard listens on the public HTTP, gRPC and metrics ports and forwards to a server that listens only on Unix
sockets in a folder no other local user can enter (``python -m flux_triton serve``). Before forwarding it
- parses every body as strict JSON, whatever its path or content type, and checks inference requests field by
  field, so that it reads what the server will read (``checks``);
- applies each model's own limits, so that a request the model would refuse for its shapes never reaches it
  (``rules``);
- enforces the admin key, the internal models and the refused model loads (``policy``);
- bounds the memory of request bodies: a per-request limit (the model's largest request), a budget across all
  requests, a deadline and an idle timeout for a body that stalls, and no compressed bodies.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from flux_triton.deploy.pbtxt import ENGINE, PREPROCESS, TEXT_ENCODER, VAE


@dataclass(frozen=True)
class GuardSettings:
    # Above the largest request the shipped limits allow: dit_transformer's B=16, 16384 image tokens and
    # 512 text tokens in FP32 are 205 MB (tests/test_guard.py computes it from the contract).
    max_request_mib: int = 256
    max_buffered_mib: int = 1024  # request bodies held at once, across connections
    body_timeout_s: float = 120.0  # a body must arrive within this ...
    body_idle_s: float = 15.0  # ... and never pause longer than this
    max_json_kib: int = 1024  # a body other than an inference request's
    internal_models: tuple[str, ...] = (PREPROCESS, ENGINE, TEXT_ENCODER, VAE)

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mib << 20

    def arguments(self) -> list[str]:
        """These settings as command-line options (``add_arguments``)."""
        return [f"--{_flag(name)}={getattr(self, name)}" for name in _options()]

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add these settings' options to an ``argparse`` parser or group."""
        for name in _options():
            default = getattr(cls, name)
            parser.add_argument(f"--{_flag(name)}", type=type(default), default=default, help=f"{_HELP[name]} "
                                f"(default {default})")  # fmt: skip

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> GuardSettings:
        return cls(**{name: getattr(args, name) for name in _options()})


_HELP = {
    "max_request_mib": "the largest request (each model's own largest request is the limit below it)",
    "max_buffered_mib": "request bodies held at once, across connections",
    "body_timeout_s": "seconds a request body may take to arrive",
    "body_idle_s": "seconds a request body may pause",
    "max_json_kib": "the largest body other than an inference request's",
}


def _options() -> list[str]:
    return [f.name for f in fields(GuardSettings) if f.name != "internal_models"]


def _flag(name: str) -> str:
    return name.replace("_", "-")
