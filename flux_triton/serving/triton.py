"""The glue between Triton's Python backend (``triton_python_backend_utils``, importable only inside
the backend's stub process) and the serving core's torch tensors. Tensors cross through DLPack, so
they stay on the device Triton put them on."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from flux_triton.contract import OUTPUT_NAME, InputError, OutputError


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def instance_device(args: dict) -> torch.device:
    """The GPU Triton assigned to this instance, else the CPU; with one intra-op thread on a GPU
    (the instance's CPU work is kernel launches, and the stubs' thread pools would compete)."""
    if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.set_num_threads(1)
        return device
    return torch.device("cpu")


def request_tensors(request, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The request's inputs among ``names`` (optional ones left out when absent)."""
    tensors = {}
    for name in names:
        tensor = _pb().get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors[name] = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    return tensors


def cache_parameter(request) -> str:
    """The request's ``cache`` parameter (a step cache chosen at a sequence's START, as JSON), or ``""``."""
    value = json.loads(request.parameters() or "{}").get("cache", "")
    return value if isinstance(value, str) else json.dumps(value)


def output(name: str, tensor: torch.Tensor):
    return _pb().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor.contiguous()))


def response(outputs: dict[str, torch.Tensor]):
    return _pb().InferenceResponse(output_tensors=[output(name, tensor) for name, tensor in outputs.items()])


def error_response(message: str, invalid_arg: bool = False):
    """A 400 (``invalid_arg``: the request was wrong) or a 500 (the model failed)."""
    pb = _pb()
    code = pb.TritonError.INVALID_ARG if invalid_arg else pb.TritonError.INTERNAL
    return pb.InferenceResponse(error=pb.TritonError(message, code))


def result_response(model: str, result: torch.Tensor | Exception):
    """A request's response: ``noise_pred``, a 400 for a request the contract refuses, else a 500."""
    if isinstance(result, InputError):
        return error_response(str(result), invalid_arg=True)
    if isinstance(result, OutputError):
        return error_response(f"{model}: {result}")
    if isinstance(result, Exception):
        return error_response(f"{model} failed: {type(result).__name__}: {result}")
    return response({OUTPUT_NAME: result})


def log_info(message: str) -> None:
    _pb().Logger.log_info(message)
