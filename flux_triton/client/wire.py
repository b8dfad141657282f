"""Torch tensors to and from Triton's HTTP wire (binary data; BF16 through ml_dtypes)."""

from __future__ import annotations

import http.client
from collections.abc import Mapping

import torch
import tritonclient.http as httpclient

from flux_triton.contract import OUTPUT_NAME, TORCH_TO_TRITON, from_numpy, to_numpy
from flux_triton.contract.protocol import CACHE_PARAMETER, SEQUENCE_HEADER, SESSION_KEY_PARAMETER, SequenceStep


def infer_inputs(tensors: Mapping[str, torch.Tensor]) -> list[httpclient.InferInput]:
    inputs = []
    for name, tensor in tensors.items():
        array = to_numpy(tensor)
        item = httpclient.InferInput(name, list(array.shape), TORCH_TO_TRITON[tensor.dtype])
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    return inputs


class ServerUnavailable(ConnectionError):
    """The server could not be reached, or the connection was lost before the response came."""


def sequence_arguments(sequence: SequenceStep | None, headers: dict[str, str] | None = None) -> dict:
    """``client.infer``'s arguments for a step of a generation session (none: a stateless step), with ``headers``
    (the admin key, where a request needs it): the sequence and its flags, its id in a header for routing, and the
    session key (and at START the step cache) as request parameters."""
    arguments = {"headers": dict(headers)} if headers else {}
    if sequence is None:
        return arguments
    arguments |= {"sequence_id": sequence.sequence_id, "sequence_start": sequence.start, "sequence_end": sequence.end}
    arguments["headers"] = {**arguments.get("headers", {}), SEQUENCE_HEADER: str(sequence.sequence_id)}
    arguments["parameters"] = {SESSION_KEY_PARAMETER: sequence.key}
    if sequence.cache:
        arguments["parameters"][CACHE_PARAMETER] = sequence.cache
    return arguments


def infer_step(
    client: httpclient.InferenceServerClient,
    model_name: str,
    tensors: Mapping[str, torch.Tensor],
    model_version: str = "",
    sequence: SequenceStep | None = None,
) -> torch.Tensor:
    """Send one step's tensors and return ``noise_pred``. Server errors raise
    ``tritonclient.utils.InferenceServerException`` with the server's message; a server that is
    down, or dies mid-request, raises ``ServerUnavailable`` (set the client's ``network_timeout``
    to bound the wait for a server that hangs)."""
    inputs = infer_inputs(tensors)
    try:
        result = client.infer(
            model_name,
            inputs,
            model_version=model_version,
            outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)],
            **sequence_arguments(sequence),
        )
    except (OSError, http.client.HTTPException) as exc:  # geventhttpclient's errors derive from these
        url = getattr(client, "_parsed_url", "the server")
        raise ServerUnavailable(
            f"{model_name} at {url}: connection lost or refused before a response "
            f"({type(exc).__name__}: {exc}); is tritonserver running?"
        ) from exc
    return from_numpy(result.as_numpy(OUTPUT_NAME))
