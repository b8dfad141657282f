"""Engine precisions: what each means for the ONNX graph, the engine kinds and the GPU.

TensorRT builds strongly typed networks (the only mode in TensorRT 11; ``BuilderFlag.FP16/BF16/
FP8`` were removed), so the precision lives in the ONNX graph itself: weights and float IO in
``onnx_dtype``; FP8 as explicit Q/DQ nodes from NVIDIA ModelOpt around a BF16 graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_triton.contract import TORCH_TO_TRITON


@dataclass(frozen=True)
class Precision:
    name: str
    onnx_dtype: torch.dtype  # weights, float inputs and noise_pred in the graph
    kinds: tuple[str, ...]  # engine kinds that can run it
    quantization: str | None = None  # "fp8": ModelOpt E4M3 Q/DQ
    min_compute_capability: tuple[int, int] = (0, 0)
    tf32: bool = False  # allow TF32 tactics for FP32 math in TensorRT

    @property
    def io_dtype(self) -> str:
        """Triton dtype of the float inputs and noise_pred (the public and the engine side)."""
        return TORCH_TO_TRITON[self.onnx_dtype]


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, ("onnxruntime", "tensorrt"), tf32=False),
    "fp16": Precision("fp16", torch.float16, ("tensorrt",), min_compute_capability=(7, 0)),
    "bf16": Precision("bf16", torch.bfloat16, ("tensorrt",), min_compute_capability=(8, 0)),
    "fp8": Precision("fp8", torch.bfloat16, ("tensorrt",), quantization="fp8", min_compute_capability=(8, 9)),
}
KINDS = ("onnxruntime", "tensorrt")
DEFAULT_PRECISION = {"onnxruntime": "fp32", "tensorrt": "bf16"}


def precision_for(kind: str, name: str | None) -> Precision:
    if kind not in KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(KINDS)}")
    precision = PRECISIONS.get(name or DEFAULT_PRECISION[kind])
    if precision is None:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    if kind not in precision.kinds:
        runs = ", ".join(precision.kinds)
        raise ValueError(f"precision {precision.name} is not supported by the {kind} engine (only by: {runs})")
    return precision
