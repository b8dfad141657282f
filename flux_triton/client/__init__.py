"""The client: ``RemoteFluxTransformer``, a stand-in for ``FluxPipeline.transformer`` that runs every DiT call on
the server (``RemoteSettings`` say where and how), the step router behind it, ``generate`` and ``generate_images``
(a whole generation in one request to ``flux_generate``) and the denoising CLI. Uses only the
contract and the pipeline. The public names load on first use."""

from __future__ import annotations

import importlib

_HOMES = {
    "RemoteFluxTransformer": "remote",
    "RemoteSettings": "connection",
    "RemoteDitError": "connection",
    "generate": "whole_generation",
    "generate_images": "whole_generation",
    "GenerationCancelled": "whole_generation",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
