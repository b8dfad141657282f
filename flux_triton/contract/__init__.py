"""The IO contract: tensor specs (public and engine side), the one step type, request validation, the wire
protocol both ends share, and ``flux_generate``'s request and answer (``generation``). Names are imported on first
use, so that the torch-free parts (``specs``, ``protocol``, ``generation``) load without torch (the guard uses
them)."""

from __future__ import annotations

import importlib

_HOMES = {
    "specs": ("GUIDANCE_RANGE", "INPUTS", "INPUT_BY_NAME", "OUTPUTS", "OUTPUT_NAME", "PROMPT_INPUTS", "TIMESTEP_RANGE",
              "TensorSpec"),
    "tensors": ("TORCH_TO_TRITON", "TORCH_TO_WIRE", "TRITON_TO_TORCH", "WIRE_TO_TORCH", "DitSignature", "from_numpy",
                "to_numpy"),
    "step": ("Step",),
    "validation": ("InputError", "Limits", "OutputError", "check_output", "validate"),
    "generation": ("GENERATE_INPUTS", "GENERATE_INPUT_TYPES", "GENERATE_MODEL", "GENERATE_OUTPUTS",
                   "GENERATE_STREAM_MODEL", "IMAGES", "LATENTS", "PROGRESS", "STRING_INPUTS"),
}  # fmt: skip
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
