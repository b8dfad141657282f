"""What the guard reads in an inference request before tritonserver does, read so that both read the same thing.

The JSON parser is stricter than the server's: a body is refused if it is not UTF-8, holds a duplicate key at any
level (the server reads one value, Python's parser another), a number the server may read otherwise (``-0``, an
integer outside 64 bits, ``NaN``/``Infinity``, a float that overflows), or a lone surrogate escape. An inference
request may hold only the fields the guard knows; each input declares exactly one source of its data (JSON
``data``, binary data or a shared-memory region) with integer sizes, and the binary sizes add up to the bytes
after the JSON header. Every input's element count times its element size is computed with Python's unbounded
integers and checked against the request-size limit and the bytes sent, so a shape whose byte size wraps past
2^64 in the server never reaches it. gRPC requests are protobuf, which both ends parse the same way.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

# Bytes per element of Triton's datatypes; BYTES elements carry at least a 4-byte length.
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                 "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}  # fmt: skip
INFER_HEADER = "Inference-Header-Content-Length"

# The fields of Triton's HTTP/REST inference request (KServe v2 and Triton's extensions) that the guard reads.
REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
INPUT_PARAMETERS = {"binary_data_size", "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"}
OUTPUT_FIELDS = {"name", "parameters"}
OUTPUT_PARAMETERS = {"binary_data", "classification", "shared_memory_region", "shared_memory_byte_size",
                     "shared_memory_offset"}  # fmt: skip
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_INT_RANGE = (-(2**63), 2**64 - 1)  # int64 and uint64 (sequence ids)
_DIGITS = re.compile(r"[0-9]{1,12}")


class Refused(ValueError):
    """A request the guard does not forward; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class InferSummary:
    """What an inference request asks for, whatever its protocol: each input's name, datatype and shape, and
    whether it names a shared-memory region (input or output)."""

    inputs: list[tuple[str, str, list[int]]] = field(default_factory=list)
    shared_memory: bool = False


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise Refused(f"JSON: key {key!r:.60} appears twice in one object; the server would read only one")
        seen.add(key)
    return dict(pairs)


def _integer(text: str) -> int:
    value = int(text)
    if text.startswith("-0") or not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise Refused(f"JSON: integer {text[:40]} is not a 64-bit integer the server reads the same way")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refused(f"JSON: number {text[:40]} overflows a double")
    return value


def _constant(name: str):
    raise Refused(f"JSON: {name} is not a JSON number")


def parse_json(body: bytes, what: str):
    """``body`` parsed as strictly as described above; Python's parser stops at its recursion limit
    (~1,000 levels), far below the nesting that crashes the server."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"{what}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if _SURROGATE_ESCAPE.search(text):
        raise Refused(f"{what}: a \\uD800-\\uDFFF escape, which the server may read otherwise")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_integer, parse_float=_finite,
                          parse_constant=_constant)  # fmt: skip
    except Refused as exc:
        raise Refused(f"{what}: {exc}") from None
    except RecursionError:
        raise Refused(f"{what}: JSON nested deeper than {sys.getrecursionlimit()} levels") from None
    except ValueError as exc:
        raise Refused(f"{what}: not valid JSON ({exc})") from None


def _count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Refused(f"{what}: expected a non-negative integer, got {value!r:.80}")
    return value


def check_input(name: str, datatype: str, shape, limit: int, sent_bytes: int | None) -> None:
    """Refuse an input whose datatype is unknown, whose shape is not a list of counts, whose bytes exceed ``limit``,
    or whose ``sent_bytes`` (binary, raw or shared-memory bytes; ``None``: JSON data) differ from its shape's."""
    if datatype not in ELEMENT_BYTES:
        raise Refused(f"input '{name}': datatype {datatype!r:.40} is not one of {', '.join(ELEMENT_BYTES)}")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Refused(f"input '{name}': shape must be a list of non-negative integers, got {shape!r:.120}")
    size = math.prod(shape) * ELEMENT_BYTES[datatype]
    if size > limit:
        raise Refused(f"input '{name}': shape {list(shape)} of {datatype} is {size} bytes, over this server's "
                      f"request limit of {limit} bytes", 413)  # fmt: skip
    if sent_bytes is not None and datatype != "BYTES" and sent_bytes != size:
        raise Refused(f"input '{name}': shape {list(shape)} of {datatype} is {size} bytes, but {sent_bytes} were sent")


def _fields(entry, allowed: set[str], what: str) -> dict:
    if not isinstance(entry, dict):
        raise Refused(f"{what}: expected a JSON object, got {entry!r:.80}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise Refused(f"{what}: unknown field {unknown[0]!r:.60} (expected {', '.join(sorted(allowed))})")
    return entry


def _names(entries: list[dict], what: str) -> None:
    names = [entry.get("name") for entry in entries]
    if not all(isinstance(name, str) for name in names):
        raise Refused(f"inference request: each {what} needs a string 'name'")
    if len(set(names)) != len(names):
        raise Refused(f"inference request: {what} {next(n for n in names if names.count(n) > 1)!r:.60} twice")


def _http_input(entry: dict, limit: int) -> tuple[int, bool]:
    """Check one JSON input; returns its binary bytes and whether it names a shared-memory region."""
    name, datatype = entry["name"], entry.get("datatype")
    parameters = _fields(entry.get("parameters", {}), INPUT_PARAMETERS, f"input '{name}': parameters")
    sources = [source for source in ("data", "binary_data_size", "shared_memory_region")
               if source in entry or source in parameters]  # fmt: skip
    if len(sources) != 1:
        raise Refused(f"input '{name}': expected exactly one of data, binary_data_size, shared_memory_region, got "
                      f"{sources or 'none'}")  # fmt: skip
    shared = "shared_memory_region" in parameters
    if shared and not isinstance(parameters["shared_memory_region"], str):
        raise Refused(f"input '{name}': shared_memory_region must be a string")
    for key in ("binary_data_size", "shared_memory_byte_size", "shared_memory_offset"):
        if key in parameters:
            _count(parameters[key], f"input '{name}': {key}")
    if shared != ("shared_memory_byte_size" in parameters) or ("shared_memory_offset" in parameters and not shared):
        raise Refused(f"input '{name}': shared_memory_region goes with a shared_memory_byte_size (and an optional "
                      f"shared_memory_offset), neither without it")  # fmt: skip
    if not isinstance(datatype, str):
        raise Refused(f"input '{name}': expected a string 'datatype', got {datatype!r:.40}")
    sent = parameters.get("binary_data_size", parameters.get("shared_memory_byte_size"))
    check_input(name, datatype, entry.get("shape"), limit, sent)
    return parameters.get("binary_data_size", 0), shared


def _http_output(entry: dict) -> bool:
    """Check one requested output; returns whether it names a shared-memory region."""
    parameters = _fields(entry.get("parameters", {}), OUTPUT_PARAMETERS, f"output '{entry['name']}': parameters")
    if "binary_data" in parameters and not isinstance(parameters["binary_data"], bool):
        raise Refused(f"output '{entry['name']}': binary_data must be true or false")
    for key in ("classification", "shared_memory_byte_size", "shared_memory_offset"):
        if key in parameters:
            _count(parameters[key], f"output '{entry['name']}': {key}")
    return "shared_memory_region" in parameters


def header_length(value: str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header: ASCII digits, at most the body's length."""
    if value is None:
        return None
    if not _DIGITS.fullmatch(value) or int(value) > body_length:
        raise Refused(f"{INFER_HEADER}: expected a byte count of at most {body_length}, got {value!r:.40}")
    return int(value)


def check_http_infer(body: bytes, header_bytes: int | None, limit: int) -> InferSummary:
    """Check an HTTP/REST inference request: its JSON header (``header_bytes`` long, or the whole body) and every
    input's size; ``InferSummary`` of what it asks."""
    header = body if header_bytes is None else body[:header_bytes]
    request = _fields(parse_json(header, "inference request"), REQUEST_FIELDS, "inference request")
    inputs, outputs = request.get("inputs"), request.get("outputs", [])
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise Refused("inference request: expected a JSON object with a list of 'inputs' (and of 'outputs')")
    entries = [_fields(entry, INPUT_FIELDS, "inference request: input") for entry in inputs]
    requested = [_fields(entry, OUTPUT_FIELDS, "inference request: output") for entry in outputs]
    _names(entries, "input")
    _names(requested, "output")
    parameters = request.get("parameters", {})
    if not isinstance(parameters, dict) or not all(isinstance(v, str | int | float) for v in parameters.values()):
        raise Refused("inference request: parameters must be an object of strings, numbers and booleans")
    summary, binary = InferSummary(), 0
    for entry in entries:
        size, shared = _http_input(entry, limit)
        binary += size
        summary.shared_memory |= shared
        summary.inputs.append((entry["name"], entry["datatype"], list(entry["shape"])))
    for entry in requested:
        summary.shared_memory |= _http_output(entry)
    after_header = len(body) - (len(body) if header_bytes is None else header_bytes)
    if binary != after_header:
        raise Refused(f"inference request: its inputs declare {binary} bytes of binary data, but {after_header} "
                      f"follow the JSON header")  # fmt: skip
    return summary


def check_grpc_infer(message: bytes, limit: int) -> tuple[service_pb2.ModelInferRequest, InferSummary]:
    """Check a serialized ``ModelInferRequest``: every input's size against the limit and the bytes sent."""
    try:
        request = service_pb2.ModelInferRequest.FromString(message)
    except DecodeError as exc:
        raise Refused(f"inference request: not a ModelInferRequest ({exc})") from None
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise Refused(f"inference request: {len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    summary = InferSummary()
    for index, tensor in enumerate(request.inputs):
        sent = None
        if "shared_memory_region" in tensor.parameters:
            summary.shared_memory = True
            sent = tensor.parameters["shared_memory_byte_size"].int64_param
        elif raw:
            sent = len(raw[index])
        check_input(tensor.name, tensor.datatype, list(tensor.shape), limit, sent)
        summary.inputs.append((tensor.name, tensor.datatype, list(tensor.shape)))
    summary.shared_memory |= any("shared_memory_region" in output.parameters for output in request.outputs)
    return request, summary
