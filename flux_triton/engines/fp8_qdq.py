"""FP8 block linears as standard ONNX Q/DQ, the form TensorRT's strongly typed builds read (explicit quantization).

The recipe is ``dit_transformer``'s (``model.fp8``): e4m3 weights with one scale per output channel, and a static
per-tensor activation scale from the calibrated file (``model.fp8_scales``). In the exported graph each converted
linear becomes

    x -> QuantizeLinear(s_x, e4m3 zero, saturate) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(s_w, axis 1)
                                                                               <- W (e4m3 initializer, [in, out])

plus its bias: the weights are stored in FP8 (half a BF16 graph's bytes), the activation scale is the calibrated
one. Scales take the graph's float type (ONNX's ``QuantizeLinear`` wants the input's), so a BF16 graph holds them
rounded to BF16, as NVIDIA's ModelOpt exports do. ``QdqLinear``'s own forward computes the same fake-quantized
product in torch, which the TorchScript exporter traces through ``symbolic``."""

from __future__ import annotations

import torch
from torch import nn

from flux_triton.model.fp8 import FP8, FP8_MAX, Float8Linear


class _QdqMatmul(torch.autograd.Function):
    """``fake_quant(x, input_scale) @ (weight_t * weight_scale)``; exported as Q/DQ nodes around a MatMul."""

    @staticmethod
    def forward(ctx, x, weight_t, weight_scale, input_scale):
        quantized = (x / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype) * input_scale
        return quantized @ (weight_t.to(x.dtype) * weight_scale)

    @staticmethod
    def symbolic(g, x, weight_t, weight_scale, input_scale):
        zero = g.op("Constant", value_t=torch.zeros((), dtype=FP8))
        quantized = g.op("QuantizeLinear", x, input_scale, zero, saturate_i=1)
        activations = g.op("DequantizeLinear", quantized, input_scale, zero)
        channels = weight_t.type().sizes()[1]
        channel_zeros = g.op("Constant", value_t=torch.zeros(channels, dtype=FP8))
        weights = g.op("DequantizeLinear", weight_t, weight_scale, channel_zeros, axis_i=1)
        return g.op("MatMul", activations, weights)


class QdqLinear(nn.Module):
    """A ``Float8Linear`` with a static activation scale, in the graph's float ``dtype``, as exportable Q/DQ."""

    def __init__(self, linear: Float8Linear, dtype: torch.dtype):
        super().__init__()
        if linear.input_scale is None:
            raise ValueError("FP8 Q/DQ need static activation scales (model.fp8_scales), not per-token ones")
        self.register_buffer("weight_t", linear.weight_fp8.t().contiguous())  # [in, out], e4m3
        self.register_buffer("weight_scale", linear.weight_scale.reshape(-1).to(dtype))  # [out]
        self.register_buffer("input_scale", linear.input_scale.reshape(()).to(dtype))  # a scalar: per tensor
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QdqMatmul.apply(x, self.weight_t, self.weight_scale, self.input_scale)
        return out if self.bias is None else out + self.bias


def use_qdq(transformer: nn.Module) -> int:
    """Swap every ``Float8Linear`` of ``transformer`` for its ``QdqLinear`` in place; returns how many."""
    converted = [(name, module) for name, module in transformer.named_modules() if isinstance(module, Float8Linear)]
    for name, module in converted:
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent), child, QdqLinear(module, transformer.dtype))
    return len(converted)
