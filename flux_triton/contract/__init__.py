"""The IO contract: tensor specs (public and engine side), the one step type, request validation."""

from flux_triton.contract.step import Step
from flux_triton.contract.tensors import (
    GUIDANCE_RANGE,
    INPUT_BY_NAME,
    INPUTS,
    OUTPUT_NAME,
    OUTPUTS,
    PROMPT_INPUTS,
    TIMESTEP_RANGE,
    TORCH_TO_TRITON,
    TRITON_TO_TORCH,
    DitSignature,
    TensorSpec,
)
from flux_triton.contract.validation import InputError, Limits, OutputError, check_output, validate

__all__ = [
    "GUIDANCE_RANGE",
    "INPUTS",
    "INPUT_BY_NAME",
    "OUTPUTS",
    "OUTPUT_NAME",
    "PROMPT_INPUTS",
    "TIMESTEP_RANGE",
    "TORCH_TO_TRITON",
    "TRITON_TO_TORCH",
    "DitSignature",
    "InputError",
    "Limits",
    "OutputError",
    "Step",
    "TensorSpec",
    "check_output",
    "validate",
]
