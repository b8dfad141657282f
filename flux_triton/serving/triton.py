"""The glue between Triton's Python backend (``triton_python_backend_utils``, importable only inside
the backend's stub process) and the serving core's torch tensors. Tensors cross through DLPack, so
they stay on the device Triton put them on."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy
import torch

from flux_triton.contract import OUTPUT_NAME, InputError, OutputError
from flux_triton.contract.protocol import CACHE_PARAMETER, END, SESSION_KEY_PARAMETER, START, SequenceStep


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def decoupled(config: dict) -> bool:
    """Whether a model's config is decoupled (a request may get several responses)."""
    return _pb().using_decoupled_model_transaction_policy(config)


def send_last(sender, response) -> None:
    """A decoupled request's last response, through its response sender."""
    sender.send(response, flags=_pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def instance_device(args: dict) -> torch.device:
    """The GPU Triton assigned to this instance, else the CPU; with one intra-op thread on a GPU
    (the instance's CPU work is kernel launches, and the stubs' thread pools would compete)."""
    if args["model_instance_kind"] == "GPU" and torch.cuda.is_available():
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.set_num_threads(1)
        return device
    return torch.device("cpu")


ALIGNMENT = 64  # bytes: torch's CPU allocations; Triton's input buffers may sit at any offset


def request_tensors(request, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The request's inputs among ``names`` (optional ones left out when absent). A CPU input that Triton's buffer
    holds at an unaligned address is copied into torch's memory: on CPU a matrix product over misaligned input can
    round differently, and the answer would then differ from diffusers' by an ulp."""
    tensors = {}
    for name in names:
        tensor = _pb().get_input_tensor_by_name(request, name)
        if tensor is not None:
            found = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            aligned = found.device.type != "cpu" or found.data_ptr() % ALIGNMENT == 0
            tensors[name] = found if aligned else found.clone()
    return tensors


def request_strings(request, names: Iterable[str]) -> dict[str, list[bytes]]:
    """The request's BYTES inputs among ``names`` (absent ones left out), each flattened to a list of bytes."""
    found = {name: _pb().get_input_tensor_by_name(request, name) for name in names}
    return {name: list(tensor.as_numpy().reshape(-1)) for name, tensor in found.items() if tensor is not None}


def requested_outputs(request) -> set[str]:
    """The outputs a request names (empty: it names none, so it gets every output)."""
    return set(request.requested_output_names())


def sequence_step(request) -> SequenceStep:
    """The request's place in a generation session: its correlation id, flags, session key and step cache (a
    JSON object given as such is taken as its text)."""
    parameters = json.loads(request.parameters() or "{}")
    if not isinstance(parameters.get(CACHE_PARAMETER, ""), str):
        parameters[CACHE_PARAMETER] = json.dumps(parameters[CACHE_PARAMETER])
    return SequenceStep.from_flags(request.correlation_id(), request.flags(), parameters)


def bls_infer(model_name: str, tensors: dict[str, torch.Tensor], sequence: SequenceStep) -> torch.Tensor:
    """``noise_pred`` of one step sent to the served ``model_name`` in process (Triton's BLS), as a client's request
    with its sequence id, flags, session key and cache; its error as ``RuntimeError`` (tritonserver 2.51 hands a
    BLS caller every error as INTERNAL, so the caller checks what a request could get wrong first), or as
    ``InputError`` where the code says the request was wrong."""
    pb = _pb()
    parameters = {SESSION_KEY_PARAMETER: sequence.key} | ({CACHE_PARAMETER: sequence.cache} if sequence.cache else {})
    request = pb.InferenceRequest(
        model_name=model_name,
        inputs=[output(name, tensor) for name, tensor in tensors.items()],
        requested_output_names=[OUTPUT_NAME],
        correlation_id=sequence.sequence_id,
        flags=(START if sequence.start else 0) | (END if sequence.end else 0),
        parameters=parameters,
    )
    response = request.exec()
    if response.has_error():
        error = response.error()
        message = f"{model_name}: {error.message()}"
        raise InputError(message) if error.code() == pb.TritonError.INVALID_ARG else RuntimeError(message)
    found = pb.get_output_tensor_by_name(response, OUTPUT_NAME)
    return torch.utils.dlpack.from_dlpack(found.to_dlpack()).clone()  # the response's buffer goes with it


def output(name: str, value: torch.Tensor | list[bytes]):
    """An output tensor: a torch tensor (through DLPack), or a list of bytes (a BYTES tensor)."""
    if isinstance(value, list):
        return _pb().Tensor(name, numpy.array(value, dtype=numpy.object_))
    return _pb().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def response(outputs: dict[str, torch.Tensor | list[bytes]]):
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
