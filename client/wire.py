"""Torch tensors to and from Triton's HTTP wire (binary data; BF16 through ml_dtypes)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import torch
import tritonclient.http as httpclient

from flux_triton.contract import OUTPUT_NAME, TORCH_TO_TRITON


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def infer_inputs(tensors: Mapping[str, torch.Tensor]) -> list[httpclient.InferInput]:
    inputs = []
    for name, tensor in tensors.items():
        array = to_numpy(tensor)
        item = httpclient.InferInput(name, list(array.shape), TORCH_TO_TRITON[tensor.dtype])
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    return inputs


def infer_step(
    client: httpclient.InferenceServerClient,
    model_name: str,
    tensors: Mapping[str, torch.Tensor],
    model_version: str = "",
) -> torch.Tensor:
    """Send one step's tensors and return ``noise_pred``; server errors raise
    ``tritonclient.utils.InferenceServerException`` with the server's message."""
    result = client.infer(
        model_name,
        infer_inputs(tensors),
        model_version=model_version,
        outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)],
    )
    return from_numpy(result.as_numpy(OUTPUT_NAME))
