"""The DiT's IO contract: the one definition of its tensors' names, dtypes and shapes, public and
on the engine side.

Everything that talks to the transformer (the Triton configs, request validation, the ONNX
export, the engine build and the client) derives its names and shapes from here.

Shapes are per sample: Triton adds the leading batch dim ``B`` (``max_batch_size > 0``).
Symbols resolve as follows:

- ``N`` image tokens (packed latents) and ``S`` text tokens vary per request;
- ``C`` (packed latent channels), ``P`` (pooled CLIP width) and ``D`` (T5 width) come from the
  loaded model's config;
- integers are fixed.

Dtype ``MODEL`` means the loaded model's dtype (BF16 on GPU, FP32 on CPU). The raw scheduler
timestep, the guidance scale and the position ids travel as FP32, exactly as the pipeline makes
them (the model casts them itself, as ``FluxPipeline`` does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

MODEL = "MODEL"

TIMESTEP_RANGE = (0.0, 1000.0)
"""Raw scheduler timesteps (``FlowMatchEulerDiscreteScheduler``: sigma * 1000)."""
GUIDANCE_RANGE = (0.0, 50.0)
"""Guidance scales served: FLUX.1-dev is used at about 1-10; the model embeds ``guidance * 1000`` in its
dtype, which stays finite in FP16 up to 65."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]
    dtype: str
    optional: bool = False

    def wire_dtype(self, model_dtype: str) -> str:
        return model_dtype if self.dtype == MODEL else self.dtype

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Per-sample dims with known symbols filled in and the others as -1 (dynamic)."""
        return tuple(d if isinstance(d, int) else sizes.get(d, -1) for d in self.dims)


# guidance is declared (optional) for every model, so that a request sending it to a model
# without guidance embeddings reaches validation and gets a clear error.
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("hidden_states", ("N", "C"), MODEL),
    TensorSpec("timestep", (1,), "FP32"),
    TensorSpec("guidance", (1,), "FP32", optional=True),
    TensorSpec("pooled_projections", ("P",), MODEL),
    TensorSpec("encoder_hidden_states", ("S", "D"), MODEL),
    TensorSpec("txt_ids", ("S", 3), "FP32"),
    TensorSpec("img_ids", ("N", 3), "FP32"),
)
OUTPUTS: tuple[TensorSpec, ...] = (TensorSpec("noise_pred", ("N", "C"), MODEL),)

INPUT_BY_NAME = {spec.name: spec for spec in INPUTS}
# The prompt's inputs: in a generation session (a sequence) they come with its first step, or when they change.
PROMPT_INPUTS = ("encoder_hidden_states", "pooled_projections", "txt_ids", "guidance")
OUTPUT_NAME = OUTPUTS[0].name


# The engine side. A compiled engine sees the public tensors with two differences, both made by
# dit_preprocess exactly as FluxPipeline makes them: ``timestep`` arrives already scaled
# (``t.to(model_dtype) / 1000``, in the model dtype), and ``guidance`` exists only for guidance
# (dev-like) models, where it is required. Every engine input keeps its batch dim (ids as ``[B, ., 3]``,
# one row used), so that Triton can batch requests for the engine.
ENGINE_INPUTS: tuple[TensorSpec, ...] = tuple(
    replace(spec, dtype=MODEL) if spec.name == "timestep" else spec for spec in INPUTS
)
ENGINE_OUTPUTS: tuple[TensorSpec, ...] = OUTPUTS

# Names of the dynamic axes in the ONNX graph and of the TensorRT profile dimensions.
AXIS_NAMES = {"B": "batch", "N": "image_tokens", "S": "text_tokens"}


def engine_inputs(guidance_embeds: bool) -> tuple[TensorSpec, ...]:
    """The engine's inputs for one model, in graph order."""
    return tuple(replace(spec, optional=False) for spec in ENGINE_INPUTS if spec.name != "guidance" or guidance_embeds)


def engine_tensor_name(name: str) -> str:
    """The ensemble tensor carrying the engine input ``name`` from dit_preprocess to dit_engine."""
    return f"engine_{name}"


def dynamic_axes(spec: TensorSpec) -> dict[int, str]:
    """ONNX dynamic axes of one engine tensor: batch plus its token axis, if any."""
    axes = {0: AXIS_NAMES["B"]}
    for index, dim in enumerate(spec.dims, start=1):
        if dim in AXIS_NAMES:
            axes[index] = AXIS_NAMES[dim]
    return axes
