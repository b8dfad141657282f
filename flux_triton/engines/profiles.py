"""Optimization profiles: min/opt/max batch, image tokens and text tokens, as engine input shapes.

Image tokens come from pixel sizes as ``FluxPipeline`` packs latents (``pipeline.inputs.image_tokens``).
The text length is a dynamic ONNX axis; the shipped TensorRT profile fixes it at 512 (``max_sequence_length``, T5 padding is always to the maximum), as NVIDIA's demo
does; the tiny models get a dynamic text range so that tests can use short prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flux_triton.contract import DitSignature
from flux_triton.contract.specs import AXIS_NAMES, engine_inputs
from flux_triton.pipeline.inputs import image_tokens

Range = tuple[int, int, int]
Size = tuple[int, int]  # height, width in pixels


@dataclass(frozen=True)
class ProfileConfig:
    batch: Range = (1, 1, 4)
    min_size: Size = (256, 256)
    opt_size: Size = (1024, 1024)
    max_size: Size = (1344, 1344)
    text_tokens: Range = (512, 512, 512)

    def __post_init__(self):
        for name in ("batch", "text_tokens"):
            low, opt, high = getattr(self, name)
            if not 1 <= low <= opt <= high:
                raise ValueError(f"profile {name}: expected 1 <= min <= opt <= max, got {getattr(self, name)}")
        low, opt, high = self.image_tokens
        if not 1 <= low <= opt <= high:
            raise ValueError(f"profile sizes: image tokens must grow min <= opt <= max, got {self.image_tokens}")

    @property
    def image_tokens(self) -> Range:
        return tuple(image_tokens(*size) for size in (self.min_size, self.opt_size, self.max_size))  # type: ignore[return-value]

    def ranges(self) -> dict[str, Range]:
        """min/opt/max per symbolic dim of the contract (B, N, S)."""
        return {"B": self.batch, "N": self.image_tokens, "S": self.text_tokens}

    def shapes(self, signature: DitSignature) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{input: {"min": shape, "opt": shape, "max": shape}}`` for every engine input."""
        ranges = self.ranges()
        shapes = {}
        for spec in engine_inputs(signature.guidance_embeds):
            shapes[spec.name] = {}
            for index, level in enumerate(("min", "opt", "max")):
                sizes = {**signature.sizes, **{symbol: r[index] for symbol, r in ranges.items()}}
                shapes[spec.name][level] = (sizes["B"], *spec.resolve(sizes))
        return shapes

    def describe_shapes(self, signature: DitSignature) -> dict[str, dict[str, list[int]]]:
        """``shapes`` as JSON-ready lists (the sidecar's ``shapes``)."""
        return {name: {k: list(v) for k, v in levels.items()} for name, levels in self.shapes(signature).items()}

    def describe(self) -> dict:
        """JSON-ready (lists): the sizes and the min/opt/max of every named axis."""
        named = {AXIS_NAMES[symbol]: list(r) for symbol, r in self.ranges().items()}
        return {**{key: list(value) for key, value in asdict(self).items()}, "axes": named}


PROFILE_PRESETS: dict[str, ProfileConfig] = {
    "default": ProfileConfig(),
    "tiny": ProfileConfig(min_size=(32, 32), text_tokens=(1, 8, 512)),
}


def preset_for(model: str) -> str:
    return "tiny" if model.startswith("tiny-") else "default"
