"""FP8 (e4m3) linears for the transformer blocks on Hopper: per-output-channel weight scales
computed once, per-token activation scales computed on the fly, ``torch._scaled_mm``.

Only the block linears are converted (the embedders, norms' modulation outside the blocks and
``proj_out`` stay in bf16, as NVIDIA's FLUX FP8 recipe does). The bf16 weights are dropped."""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class Float8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (weight.float() / scale).to(FP8), persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (flat.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = torch._scaled_mm(
            quantized, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return out.reshape(*shape[:-1], self.out_features)


def _convertible(name: str, module: nn.Module) -> bool:
    # Keep the AdaLN modulation linears (they act on one vector per sample) in bf16.
    return isinstance(module, nn.Linear) and ".norm" not in f".{name}" and module.in_features % 16 == 0


def quantize_blocks(transformer: nn.Module) -> int:
    """Swap the block linears for FP8 ones in place; returns how many were converted."""
    count = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                if not _convertible(name, module) or module.out_features % 16:
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, Float8Linear(module))
                count += 1
    torch.cuda.empty_cache()
    return count
