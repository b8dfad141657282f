"""The IO contract made concrete: Triton's float dtypes as torch's, and ``DitSignature``, the contract's symbols
sized for one loaded model (the tensor specs themselves are in ``contract.specs``, which needs no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from flux_triton.contract.specs import TensorSpec

TRITON_TO_TORCH: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
}
TORCH_TO_TRITON = {dtype: name for name, dtype in TRITON_TO_TORCH.items()}
# Every tensor a request may carry: the DiT's floats, and flux_generate's sizes, steps and seed.
TORCH_TO_WIRE = {**TORCH_TO_TRITON, torch.int32: "INT32", torch.int64: "INT64"}
WIRE_TO_TORCH = {name: dtype for dtype, name in TORCH_TO_WIRE.items()}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as Triton's clients send it: a host array, BF16 through ``ml_dtypes``."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """An answer's array as a tensor of its own memory."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


@dataclass(frozen=True)
class DitSignature:
    """The contract made concrete for one loaded model."""

    in_channels: int
    pooled_dim: int
    text_dim: int
    guidance_embeds: bool
    dtype: str  # Triton name of the model dtype

    @classmethod
    def from_config(cls, config: Mapping, dtype: torch.dtype | str) -> DitSignature:
        patch = config.get("patch_size", 1)
        out_channels = config.get("out_channels") or config["in_channels"]
        if out_channels * patch * patch != config["in_channels"]:
            raise ValueError("noise_pred must be shaped like hidden_states: out_channels != in_channels")
        return cls(
            in_channels=config["in_channels"],
            pooled_dim=config["pooled_projection_dim"],
            text_dim=config["joint_attention_dim"],
            guidance_embeds=bool(config.get("guidance_embeds", False)),
            dtype=dtype if isinstance(dtype, str) else TORCH_TO_TRITON[dtype],
        )

    @property
    def sizes(self) -> dict[str, int]:
        return {"C": self.in_channels, "P": self.pooled_dim, "D": self.text_dim}

    @property
    def torch_dtype(self) -> torch.dtype:
        return TRITON_TO_TORCH[self.dtype]

    def tensor_config(self, spec: TensorSpec) -> dict:
        """The Triton model-config entry (auto-complete format) of one tensor."""
        entry = {
            "name": spec.name,
            "data_type": "TYPE_" + spec.wire_dtype(self.dtype),
            "dims": list(spec.resolve(self.sizes)),
        }
        if spec.optional:
            entry["optional"] = True
        return entry
