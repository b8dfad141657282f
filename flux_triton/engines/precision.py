"""Engine precisions: what each means for the engine's dtype and the GPU it needs.

TensorRT builds strongly typed networks (the only mode in TensorRT 11; ``BuilderFlag.FP16/BF16/
FP8`` were removed), so the precision lives in the ONNX graph itself: weights and float IO in
``dtype``; FP8 as explicit Q/DQ nodes with the calibrated scales in a BF16 graph (``engines.fp8_qdq``). The AOTI kinds
compile the loaded model in ``dtype``, FP8 as e4m3 block linears (``model.fp8``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_triton.contract import TORCH_TO_TRITON


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # weights, float inputs and noise_pred
    quantization: str | None = None  # "fp8": E4M3 linears inside a bf16 model
    min_compute_capability: tuple[int, int] = (0, 0)
    tf32: bool = False  # allow TF32 tactics for FP32 math in TensorRT

    @property
    def io_dtype(self) -> str:
        """Triton dtype of the float inputs and noise_pred (the public and the engine side)."""
        return TORCH_TO_TRITON[self.dtype]

    @property
    def min_capability_text(self) -> str:
        return ".".join(map(str, self.min_compute_capability))


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32),
    "fp16": Precision("fp16", torch.float16, min_compute_capability=(7, 0)),
    "bf16": Precision("bf16", torch.bfloat16, min_compute_capability=(8, 0)),
    "fp8": Precision("fp8", torch.bfloat16, quantization="fp8", min_compute_capability=(8, 9)),
}
