"""The traced module: ``FluxTransformer2DModel`` behind the engine IO of the contract.

Handles FLUX's export traps: ids travel batched and one row is used;
``timestep`` is already ``t / 1000`` in the model dtype and the transformer multiplies by 1000 in
the model dtype, as in eager; RoPE frequencies are computed in float32 (eager uses float64,
which TensorRT's ONNX parser only casts down to float32); ``nn.RMSNorm`` becomes plain ops.
The wrapper patches the transformer it is given: export from a freshly loaded one.
"""

from __future__ import annotations

import torch
from torch import nn

from flux_triton.contract.specs import engine_inputs
from flux_triton.pipeline.call import engine_call


class RopePosEmbed(nn.Module):
    """``diffusers.FluxPosEmbed`` with a chosen frequency dtype instead of float64."""

    def __init__(self, theta: int, axes_dim: list[int], freqs_dtype: torch.dtype):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim
        self.freqs_dtype = freqs_dtype

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = ids.float()
        cos_out, sin_out = [], []
        for axis, dim in enumerate(self.axes_dim):
            cos, sin = get_1d_rotary_pos_embed(
                dim, pos[:, axis], theta=self.theta, repeat_interleave_real=True, use_real=True,
                freqs_dtype=self.freqs_dtype,
            )  # fmt: skip
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


class ExplicitRMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` (used for q/k norms) as plain ops with fp32 math: ``aten::rms_norm``
    has no ONNX symbolic below opset 23, which the TorchScript exporter does not reach."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        upcast = x.float()
        y = (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return y if self.weight is None else y * self.weight


def replace_rms_norms(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.RMSNorm):
            setattr(module, name, ExplicitRMSNorm(child))
            count += 1
        else:
            count += replace_rms_norms(child)
    return count


class EngineGraph(nn.Module):
    """Positional inputs in ``engine_inputs`` order; returns ``noise_pred``."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.names = [spec.name for spec in engine_inputs(bool(transformer.config.guidance_embeds))]
        replace_rms_norms(transformer)
        pos = transformer.pos_embed
        transformer.pos_embed = RopePosEmbed(pos.theta, list(pos.axes_dim), torch.float32)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return engine_call(self.transformer, dict(zip(self.names, tensors, strict=True)))
