"""The one step type: a FLUX denoising step's transformer inputs, as every piece reads them.

``Step`` holds what ``FluxPipeline`` passes its transformer (2-D ids, the raw fp32 scheduler timestep
per sample) and converts itself to the two tensor forms of the contract: the public Triton request
(``wire``: every input with its batch dim) and the engine's inputs (``engine_tensors``: the timestep
scaled as the pipeline does, floats in the engine's dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from flux_triton.contract.specs import engine_inputs
from flux_triton.contract.tensors import DitSignature


@dataclass(frozen=True)
class Step:
    hidden_states: torch.Tensor  # [B, N, C] packed latents
    timestep: torch.Tensor  # [B] fp32, the raw scheduler timestep in [0, 1000]
    guidance: torch.Tensor | None  # [B] fp32, or None for models without guidance embeddings
    pooled_projections: torch.Tensor  # [B, P]
    encoder_hidden_states: torch.Tensor  # [B, S, D]
    txt_ids: torch.Tensor  # [S, 3]
    img_ids: torch.Tensor  # [N, 3]

    @classmethod
    def probe(cls, signature: DitSignature, image_tokens: int = 1, text_tokens: int = 1) -> Step:
        """The smallest valid step of a model (zeros; its guidance as ``signature`` says): what a client asks a model
        to learn about it, and what the supervisor's probes send."""
        dtype = signature.torch_dtype
        return cls(
            hidden_states=torch.zeros(1, image_tokens, signature.in_channels, dtype=dtype),
            timestep=torch.full([1], 500.0),
            guidance=torch.full([1], 3.5) if signature.guidance_embeds else None,
            pooled_projections=torch.zeros(1, signature.pooled_dim, dtype=dtype),
            encoder_hidden_states=torch.zeros(1, text_tokens, signature.text_dim, dtype=dtype),
            txt_ids=torch.zeros(text_tokens, 3),
            img_ids=torch.zeros(image_tokens, 3),
        )

    @classmethod
    def closing(cls, signature: DitSignature) -> Step:
        """The step of a request that only ends its sequence (END): zero image and text tokens, which the models
        answer without a forward."""
        dtype = signature.torch_dtype
        return cls(
            hidden_states=torch.zeros(1, 0, signature.in_channels, dtype=dtype),
            timestep=torch.zeros(1),
            guidance=torch.zeros(1) if signature.guidance_embeds else None,
            pooled_projections=torch.zeros(1, signature.pooled_dim, dtype=dtype),
            encoder_hidden_states=torch.zeros(1, 0, signature.text_dim, dtype=dtype),
            txt_ids=torch.zeros(0, 3),
            img_ids=torch.zeros(0, 3),
        )

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def replace(self, **changes) -> Step:
        return replace(self, **changes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by contract name (no copies)."""
        return {name: value for name, value in vars(self).items() if value is not None}

    def scaled_timestep(self, dtype: torch.dtype) -> torch.Tensor:
        """What the pipeline hands its transformer: ``t.to(dtype) / 1000`` (the transformer multiplies
        by 1000 again in the same dtype)."""
        return self.timestep.to(dtype) / 1000

    def row(self, index: int) -> Step:
        """One sample as a batch of one."""
        rows = slice(index, index + 1)
        return self.replace(
            hidden_states=self.hidden_states[rows],
            timestep=self.timestep[rows],
            guidance=None if self.guidance is None else self.guidance[rows],
            pooled_projections=self.pooled_projections[rows],
            encoder_hidden_states=self.encoder_hidden_states[rows],
        )

    def wire(self) -> dict[str, torch.Tensor]:
        """The public Triton request: every input with its batch dim, ids repeated per sample."""
        batch = self.batch_size
        tensors = {
            "hidden_states": self.hidden_states,
            "timestep": self.timestep.float().reshape(batch, 1),
            "pooled_projections": self.pooled_projections,
            "encoder_hidden_states": self.encoder_hidden_states,
            "txt_ids": self.txt_ids.expand(batch, -1, -1),
            "img_ids": self.img_ids.expand(batch, -1, -1),
        }
        if self.guidance is not None:
            tensors["guidance"] = self.guidance.reshape(batch, 1)
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_wire(cls, tensors: Mapping[str, torch.Tensor]) -> Step:
        """The step of a request already checked against the contract (``validation.validate``)."""
        guidance = tensors.get("guidance")
        return cls(
            hidden_states=tensors["hidden_states"],
            timestep=tensors["timestep"].reshape(-1),
            guidance=None if guidance is None else guidance.reshape(-1),
            pooled_projections=tensors["pooled_projections"],
            encoder_hidden_states=tensors["encoder_hidden_states"],
            txt_ids=tensors["txt_ids"][0],
            img_ids=tensors["img_ids"][0],
        )

    def engine_tensors(self, signature: DitSignature) -> dict[str, torch.Tensor]:
        """The engine's inputs (dit_preprocess's work): the timestep scaled as the pipeline does, floats
        in the engine's dtype, guidance and ids fp32, ids with the batch dim back."""
        dtype, batch = signature.torch_dtype, self.batch_size
        tensors = {
            "hidden_states": self.hidden_states.to(dtype),
            "timestep": self.scaled_timestep(dtype).reshape(batch, 1),
            "guidance": None if self.guidance is None else self.guidance.float().reshape(batch, 1),
            "pooled_projections": self.pooled_projections.to(dtype),
            "encoder_hidden_states": self.encoder_hidden_states.to(dtype),
            "txt_ids": self.txt_ids.float().expand(batch, -1, -1),
            "img_ids": self.img_ids.float().expand(batch, -1, -1),
        }
        return {spec.name: tensors[spec.name].contiguous() for spec in engine_inputs(signature.guidance_embeds)}

    def mergeable(self, other: Step) -> bool:
        """Whether two steps can share one forward: same token counts, guidance or not, and ids."""
        return (
            self.hidden_states.shape[1:] == other.hidden_states.shape[1:]
            and self.encoder_hidden_states.shape[1:] == other.encoder_hidden_states.shape[1:]
            and (self.guidance is None) == (other.guidance is None)
            and torch.equal(self.img_ids, other.img_ids)
            and torch.equal(self.txt_ids, other.txt_ids)
        )

    @staticmethod
    def concat(steps: Sequence[Step]) -> Step:
        """Mergeable steps as one batch, in order."""
        if len(steps) == 1:
            return steps[0]
        first = steps[0]
        return first.replace(
            hidden_states=torch.cat([s.hidden_states for s in steps]),
            timestep=torch.cat([s.timestep for s in steps]),
            guidance=None if first.guidance is None else torch.cat([s.guidance for s in steps]),
            pooled_projections=torch.cat([s.pooled_projections for s in steps]),
            encoder_hidden_states=torch.cat([s.encoder_hidden_states for s in steps]),
        )
