"""The IO contract: tensor specs (public and engine side), the one step type, request validation, and the wire
protocol both ends share. Names are imported on first use, so that the torch-free parts (``specs``, ``protocol``)
load without torch (the guard uses them)."""

from __future__ import annotations

import importlib

_HOMES = {
    "specs": ("GUIDANCE_RANGE", "INPUTS", "INPUT_BY_NAME", "OUTPUTS", "OUTPUT_NAME", "PROMPT_INPUTS", "TIMESTEP_RANGE",
              "TensorSpec"),
    "tensors": ("TORCH_TO_TRITON", "TORCH_TO_WIRE", "TRITON_TO_TORCH", "DitSignature", "from_numpy", "to_numpy"),
    "step": ("Step",),
    "validation": ("InputError", "Limits", "OutputError", "check_output", "validate"),
}  # fmt: skip
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
