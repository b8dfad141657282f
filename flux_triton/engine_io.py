"""The engine side of the IO contract, derived from ``contract.INPUTS``/``OUTPUTS``.

A compiled engine (ONNX, TensorRT plan) sees the public tensors with two differences, both done
by ``dit_preprocess`` exactly as ``FluxPipeline`` does them:

- ``timestep`` arrives already scaled: ``t.to(model_dtype) / 1000``, in the model dtype;
- ``guidance`` exists only for guidance (dev-like) models, and is then required.

Every engine input keeps the leading batch dim (ids as ``[B, ., 3]``, one row used), so Triton can
batch requests for the engine. ``N`` (image tokens) and ``S`` (text tokens) are dynamic axes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from flux_triton.contract import INPUTS, MODEL, OUTPUTS, DitSignature, TensorSpec
from flux_triton.validation import StepInputs

ENGINE_INPUTS: tuple[TensorSpec, ...] = tuple(
    replace(spec, dtype=MODEL) if spec.name == "timestep" else spec for spec in INPUTS
)
ENGINE_OUTPUTS: tuple[TensorSpec, ...] = OUTPUTS

# Names of the dynamic axes in the ONNX graph and of the TensorRT profile dimensions.
AXIS_NAMES = {"B": "batch", "N": "image_tokens", "S": "text_tokens"}


def engine_inputs(guidance_embeds: bool) -> tuple[TensorSpec, ...]:
    """The engine's inputs for one model, in graph order: guidance only (and required) for
    guidance models."""
    return tuple(replace(spec, optional=False) for spec in ENGINE_INPUTS if spec.name != "guidance" or guidance_embeds)


def dynamic_axes(spec: TensorSpec) -> dict[int, str]:
    """ONNX dynamic axes of one engine tensor: batch plus its token axis, if any."""
    axes = {0: AXIS_NAMES["B"]}
    for index, dim in enumerate(spec.dims, start=1):
        if dim in AXIS_NAMES:
            axes[index] = AXIS_NAMES[dim]
    return axes


def engine_tensors(step: StepInputs, signature: DitSignature) -> dict[str, torch.Tensor]:
    """One validated request as the engine's inputs (``dit_preprocess``'s work).

    The raw fp32 timestep is cast to the model dtype, then divided by 1000, as ``FluxPipeline``
    does (the engine multiplies by 1000 again in the model dtype); floats are cast to the engine's
    dtype; guidance stays fp32; the 2-D ids get the batch dim back."""
    dtype = signature.torch_dtype
    batch = step.batch_size
    tensors = {
        "hidden_states": step.hidden_states.to(dtype),
        "timestep": (step.timestep.to(dtype) / 1000).reshape(batch, 1),
        "guidance": None if step.guidance is None else step.guidance.float().reshape(batch, 1),
        "pooled_projections": step.pooled_projections.to(dtype),
        "encoder_hidden_states": step.encoder_hidden_states.to(dtype),
        "txt_ids": step.txt_ids.float().expand(batch, -1, -1),
        "img_ids": step.img_ids.float().expand(batch, -1, -1),
    }
    return {spec.name: tensors[spec.name].contiguous() for spec in engine_inputs(signature.guidance_embeds)}
