"""The guard reads an inference request exactly as the server will: fuzzed requests (duplicate and random keys,
odd number forms, mixed binary and JSON inputs, ``Inference-Header-Content-Length`` variants, seeded random edits)
go to ``python -m flux_triton serve`` and, the same bytes, to a bare tritonserver under a crash watchdog. Some of
them kill the bare server's stub; every one of those is refused by the guard, and no request that passes the
guard kills a stub behind it."""

from __future__ import annotations

import http.client
import json
import random

import pytest
import tritonclient.http as httpclient
from helpers import DEV, answers_correctly, start_server, stub_pids

from flux_triton.client.wire import infer_inputs
from flux_triton.deploy.guard.checks import INFER_HEADER
from flux_triton.pipeline import inputs

pytestmark = pytest.mark.server
MODEL = "dit_transformer"
WRAP = 2**60 + 16  # x 4 channels x 4 bytes = 2^64 + 256: wraps to 256 bytes in the server


def _text(value) -> str:
    """JSON text of ``value``; a list of pairs is an object (which may repeat a key), a ``Raw`` is used as it is."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(key)}: {_text(item)}" for key, item in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return _text(Pairs(value.items()))
    return json.dumps(value)


class Raw:
    def __init__(self, text: str):
        self.text = text


class Pairs(list):
    """An object as a list of (key, value) pairs."""


def base_request() -> tuple[dict, bytes]:
    """A valid 64x64 tiny-flux-dev step with binary inputs: its JSON header and its binary data."""
    step = inputs.random_step(DEV, height=64, width=64, seed=3)
    body, header_size = httpclient.InferenceServerClient.generate_request_body(infer_inputs(step.wire()))
    return json.loads(body[:header_size]), body[header_size:]


def frame(header, binary: bytes, length: str | None = "auto") -> tuple[bytes, list[tuple[str, str]]]:
    text = _text(header).encode()
    headers = [] if length is None else [(INFER_HEADER, str(len(text)) if length == "auto" else length)]
    return text + binary, headers


def _input(header: dict, name: str) -> dict:
    return next(entry for entry in header["inputs"] if entry["name"] == name)


def fuzz_cases() -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    header, binary = base_request()
    cases = [("valid", *frame(header, binary))]
    latents = _input(header, "hidden_states")
    wrapped = {**latents, "shape": [1, WRAP, 4]}

    def with_latents(entry) -> dict:
        return {**header, "inputs": [entry if item["name"] == "hidden_states" else item for item in header["inputs"]]}

    # Duplicate keys: the guard's parser and the server's may each read another value.
    others = [item for item in header["inputs"] if item["name"] != "hidden_states"]
    for first, second, which in ((latents, wrapped, "second"), (wrapped, latents, "first")):
        pairs = Pairs((key, value) for key, value in latents.items() if key != "shape")
        pairs += [("shape", first["shape"]), ("shape", second["shape"])]
        cases.append((f"duplicate shape, wrapping {which}", *frame(with_latents(pairs), binary)))
        top = Pairs([("inputs", [first, *others]), ("inputs", [second, *others])])
        cases.append((f"duplicate inputs, wrapping {which}", *frame(top, binary)))
    size = latents["parameters"]["binary_data_size"]
    twice = Pairs([("binary_data_size", size), ("binary_data_size", 0)])
    cases.append(("duplicate binary_data_size", *frame(with_latents({**latents, "parameters": twice}), binary)))
    cases.append(("duplicate datatype", *frame(with_latents(Pairs([*latents.items(), ("datatype", "BF16")])), binary)))
    # Number forms of the latents' token count.
    for token in ("1e3", "-0", "16.0", "1E1", str(2**64), str(WRAP), "-16", "0x10", "\u0661\u0666", "1_6", "Infinity",
                  "NaN", "16 ", "0016"):  # fmt: skip
        cases.append((f"shape token {token!r}", *frame(with_latents({**latents, "shape": Raw(f"[1, {token}, 4]")}),
                                                        binary)))  # fmt: skip
    cases.append(("wrapping shape", *frame(with_latents(wrapped), binary)))
    # Mixed binary and JSON inputs: a consistent mix passes; sizes that do not add up do not.
    timestep = _input(header, "timestep")
    as_json = {key: value for key, value in timestep.items() if key != "parameters"} | {"data": [[500.0]]}
    mixed = {**header, "inputs": [as_json if item["name"] == "timestep" else item for item in header["inputs"]]}
    offset = sum(
        item["parameters"]["binary_data_size"] for item in header["inputs"][: header["inputs"].index(timestep)]
    )
    without_timestep = binary[:offset] + binary[offset + 4 :]
    cases.append(("mixed binary and json", *frame(mixed, without_timestep)))
    cases.append(("mixed, timestep bytes still sent", *frame(mixed, binary)))
    cases.append(("mixed, data and binary both", *frame({**header, "inputs": [{**timestep, "data": [[1.0]]}, *[
        item for item in header["inputs"] if item["name"] != "timestep"]]}, binary)))  # fmt: skip
    cases.append(("binary short by one", *frame(header, binary[:-1])))
    # Inference-Header-Content-Length variants.
    length = len(_text(header).encode())
    for value in (f"+{length}", f"0{length}", f" {length}", f"{length}.0", "\u0661\u0662", f"{length + 1}", "-1",
                  hex(length), f"{length}abc", str(len(binary) + length + 1)):  # fmt: skip
        cases.append((f"header length {value!r}", *frame(header, binary, value)))
    cases.append(("no header length", *frame(header, binary, None)))
    body, headers = frame(header, binary)
    cases.append(("header length twice", body, [*headers, (INFER_HEADER, "7")]))
    # Unknown keys at each level.
    cases.append(("unknown top-level key", *frame({**header, "extra": {"shape": [1, WRAP, 4]}}, binary)))
    cases.append(("unknown input key", *frame(with_latents({**latents, "dims": [1, WRAP, 4]}), binary)))
    parameters = {**latents["parameters"], "shared_memory_byte_size": 0}
    cases.append(("byte size without region", *frame(with_latents({**latents, "parameters": parameters}), binary)))
    # Seeded random edits of one field of the header.
    generator = random.Random(0)
    values = [WRAP, 2**63, -1, 0, 1.5, "16", None, True, [], {}, [1, WRAP, 4], "FP32", "BF16", 2**64 + 16]
    for index in range(40):
        edited = json.loads(json.dumps(header))
        entry = generator.choice(edited["inputs"])
        key = generator.choice(["shape", "datatype", "name", "parameters", "data", "junk", "binary_data_size"])
        target = entry["parameters"] if key == "binary_data_size" else entry
        target[key] = generator.choice(values)
        cases.append((f"random edit {index}: {entry['name']}.{key}", *frame(edited, binary)))
    return cases


def post(url: str, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, str]:
    connection = http.client.HTTPConnection(url, timeout=60)
    try:
        connection.putrequest("POST", f"/v2/models/{MODEL}/infer")
        for key, value in [*headers, ("Content-Length", str(len(body)))]:
            connection.putheader(key, value.encode())  # UTF-8: some variants are not Latin-1
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


@pytest.fixture(scope="module")
def bare(tmp_path_factory, model_root):
    """tritonserver alone (no guard) serving dit_transformer, with model control to reload a crashed stub."""
    server = start_server(tmp_path_factory.mktemp("bare"), model_root, [MODEL], model_control=True)
    yield server
    server.stop()


def test_no_request_that_passes_the_guard_kills_a_stub(supervised, bare, tiny_dev):
    guarded_stubs, processes = stub_pids(supervised.repository, MODEL), supervised.children()
    crashed, outcomes = [], {}
    for label, body, headers in fuzz_cases():
        stubs = stub_pids(bare.model_repository, MODEL)
        bare_status, _ = post(bare.url, body, headers)
        if stub_pids(bare.model_repository, MODEL) != stubs or not answers_correctly(bare.url, MODEL, tiny_dev):
            crashed.append(label)
            bare.reload(MODEL)
        outcomes[label] = (post(supervised.url, body, headers), bare_status)
        assert stub_pids(supervised.repository, MODEL) == guarded_stubs, (label, outcomes[label])
    print(f"{len(outcomes)} requests; the bare server's stub died at: {crashed}")
    print("\n".join(f"{label:<45} guard {status} (bare {bare_status}) {text[:110]}"
                    for label, ((status, text), bare_status) in outcomes.items()))  # fmt: skip
    # tritonserver reads the first of two equal keys (Python's parser the last): the old guard's hole
    assert {"duplicate shape, wrapping first", "duplicate inputs, wrapping first", "wrapping shape"} <= set(crashed)
    assert all(outcomes[label][0][0] in (400, 413) for label in crashed), crashed
    assert outcomes["valid"][0][0] == 200 and outcomes["mixed binary and json"][0][0] == 200
    assert supervised.children() == processes
    assert answers_correctly(supervised.url, MODEL, tiny_dev)
