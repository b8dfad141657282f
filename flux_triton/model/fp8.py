"""FP8 (e4m3) linears for the transformer blocks on Hopper: per-output-channel weight scales computed once, and
activation scales either per token on the fly (dynamic, the default) or one per linear frozen by a calibration
(static, ``model.fp8_scales``: no reduction at run time, so the compiler fuses the multiply-clamp-cast into the
kernel that produced the activation); ``torch._scaled_mm``, optionally with fast accumulation (Hopper's FP8 tensor cores
accumulate in reduced precision between promotions to fp32: faster, slightly less exact).

Only the block linears are converted (the embedders, norms' modulation outside the blocks and
``proj_out`` stay in bf16, as NVIDIA's FLUX FP8 recipe does). The bf16 weights are dropped."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from flux_triton.pipeline.internals import scaled_mm

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class Float8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, input_scale: float | None = None, fast_accum: bool = False):
        super().__init__()
        self.fast_accum = fast_accum
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight_fp8", (weight.float() / scale).to(FP8), persistent=False)
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, out]
        static = None if input_scale is None else _scale(input_scale, weight.device)
        self.register_buffer("input_scale", static, persistent=False)  # or None: per-token scales
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.input_scale is None:
            scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        else:  # _scaled_mm's row-wise form wants a contiguous [rows, 1] scale
            scale = self.input_scale.expand(flat.shape[0], 1).contiguous()
        quantized = (flat.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = scaled_mm(
            quantized,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )
        return out.reshape(*shape[:-1], self.out_features)


def _convertible(name: str, module: nn.Module) -> bool:
    # Keep the AdaLN modulation linears (they act on one vector per sample) in bf16.
    return (
        isinstance(module, nn.Linear)
        and ".norm" not in f".{name}"
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def block_linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    """The linears ``quantize_blocks`` converts, by their names in ``transformer``."""
    found = {}
    for blocks_name in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(transformer, blocks_name)):
            for name, module in block.named_modules():
                if _convertible(name, module):
                    found[f"{blocks_name}.{index}.{name}"] = module
    return found


def quantize_blocks(
    transformer: nn.Module, input_scales: Mapping[str, float] | None = None, fast_accum: bool = False
) -> int:
    """Swap the block linears for FP8 ones in place, with static activation scales where ``input_scales`` (from
    ``model.fp8_scales``, one per linear) is given; returns how many were converted."""
    names = list(block_linears(transformer))  # names only: each bf16 linear is freed as soon as it is swapped
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        scale = None if input_scales is None else float(input_scales[name])
        setattr(parent, child, Float8Linear(getattr(parent, child), scale, fast_accum))
    torch.cuda.empty_cache()  # hand the bf16 weights' memory back to the device, not to this process's cache
    return len(names)


def set_fp8_options(transformer: nn.Module, input_scales: Mapping[str, float] | None, fast_accum: bool = False) -> None:
    """Switch linears already converted between static activation scales and per-token ones (``None``), and
    fast accumulation on or off."""
    for name, module in transformer.named_modules():
        if isinstance(module, Float8Linear):
            module.input_scale = None if input_scales is None else _scale(input_scales[name], module.weight_fp8.device)
            module.fast_accum = fast_accum


def _scale(value: float, device: torch.device) -> torch.Tensor:
    return torch.tensor([[float(value)]], device=device)  # [1, 1]
