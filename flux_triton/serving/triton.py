"""The glue between Triton's Python backend (``triton_python_backend_utils``, importable only inside
the backend's stub process) and the serving core's torch tensors. Tensors cross through DLPack, so
they stay on the device Triton put them on."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable

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


def utf8_text() -> None:
    """UTF-8 as this stub's default text encoding. Triton's stub embeds Python without reading the environment's
    locale, so ``open()`` decodes ASCII, and torch's inductor reads its own UTF-8 kernel templates that way (a
    compile on the CPU failed with UnicodeDecodeError)."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        with contextlib.suppress(locale.Error):
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")


ALIGNMENT = 64  # bytes: torch's CPU allocations; Triton's input buffers may sit at any offset
CPU = torch.device("cpu")


def request_tensors(request, names: Iterable[str], device: torch.device = CPU) -> dict[str, torch.Tensor]:
    """The request's inputs among ``names`` (optional ones left out when absent), on the ``device`` its model
    computes on. A GPU model's inputs go to the device here, first, so that its checks, merging and held prompts
    run there, not on the host ahead of every step's GPU work. On the CPU, an input that Triton's buffer holds at an
    unaligned address is copied into torch's memory: a matrix product over misaligned input can round differently,
    and the answer would then differ from diffusers' by an ulp."""
    tensors = {}
    for name in names:
        tensor = _pb().get_input_tensor_by_name(request, name)
        if tensor is not None:
            found = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
            if device.type != "cpu":
                tensors[name] = found.to(device)
            else:
                tensors[name] = found.clone() if found.data_ptr() % ALIGNMENT != 0 else found
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
    with its sequence id, flags, session key and cache."""
    parameters = {SESSION_KEY_PARAMETER: sequence.key} | ({CACHE_PARAMETER: sequence.cache} if sequence.cache else {})
    flags = (START if sequence.start else 0) | (END if sequence.end else 0)
    options = dict(correlation_id=sequence.sequence_id, flags=flags, parameters=parameters)
    return bls_call(model_name, tensors, [OUTPUT_NAME], **options)[OUTPUT_NAME]


def bls_call(model_name: str, inputs: dict[str, torch.Tensor | list[bytes]], outputs: list[str],
             strings: Iterable[str] = (), **options) -> dict[str, torch.Tensor | list[bytes]]:  # fmt: skip
    """The ``outputs`` of the served ``model_name`` in process (Triton's BLS), those in ``strings`` as lists of
    bytes; its error as ``RuntimeError`` (tritonserver 2.51 hands a BLS caller every error as INTERNAL, so the
    caller checks what a request could get wrong first), or as ``InputError`` where the code says the request was
    wrong. ``options``: the request's correlation id, flags and parameters."""
    pb = _pb()
    # The answer in host memory: a GPU model's output handed to a BLS caller in GPU memory crashed tritonserver 2.51
    # (a segfault in the Python backend's response path, with a CPU-instance caller), and the callers want it there.
    host = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
    request = pb.InferenceRequest(model_name=model_name, inputs=[output(name, value) for name, value in inputs.items()],
                                  requested_output_names=outputs, preferred_memory=host, **options)  # fmt: skip
    response = request.exec()
    if response.has_error():
        error = response.error()
        message = f"{model_name}: {error.message()}"
        raise InputError(message) if error.code() == pb.TritonError.INVALID_ARG else RuntimeError(message)
    answers = {}
    for name in outputs:
        found = pb.get_output_tensor_by_name(response, name)
        if name in strings:
            answers[name] = list(found.as_numpy().reshape(-1))
        else:  # a copy: the response's buffer goes with it
            answers[name] = torch.utils.dlpack.from_dlpack(found.to_dlpack()).clone()
    return answers


def model_ready(model_name: str) -> bool:
    """Whether the server has ``model_name`` loaded and ready (asked in process)."""
    return bool(_pb().is_model_ready(model_name))


def output(name: str, value: torch.Tensor | list[bytes]):
    """An output tensor: a torch tensor (through DLPack, in host memory), or a list of bytes (a BYTES tensor).
    A GPU tensor is copied to the host here: every reader of these models' answers reads host memory (HTTP bodies,
    system shared memory, BLS callers asking for it), and a GPU output costs the Python backend one more exchange
    between its stub and the server for each response, on the path that crashed tritonserver 2.51 (``bls_call``)."""
    if isinstance(value, list):
        return _pb().Tensor(name, numpy.array(value, dtype=numpy.object_))
    return _pb().Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous().cpu()))


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


def answer_each(requests, handle: Callable[[object], dict[str, torch.Tensor | list[bytes]]], model: str) -> list:
    """One response per request: ``handle(request)``'s outputs, or its error as ``result_response`` answers it."""
    responses = []
    for request in requests:
        try:
            responses.append(response(handle(request)))
        except Exception as exc:
            responses.append(result_response(model, exc))
    return responses


def log_info(message: str) -> None:
    _pb().Logger.log_info(message)
