"""Memory under requests that are refused, stall or come compressed, through ``python -m flux_triton serve``: the
guard holds request bodies within a per-request limit (the model's largest request) and a budget across requests,
refuses compressed bodies and bodies that stall, and refuses before the server what the model would refuse for its
shapes; a request the model itself refuses leaves nothing in its stub or in tritonserver. Ten rounds of every case
leave the guard, the server and the stub within 100 MiB of where they were."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
import zlib

import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, REPOSITORY, Supervised, rss_mib, stub_pids
from tritonclient.utils import InferenceServerException

from flux_triton.client.wire import infer_step
from flux_triton.deploy.pbtxt import set_parameter
from flux_triton.pipeline import inputs

pytestmark = pytest.mark.server
MODEL = "dit_transformer"
TOKENS = 1_000_000  # the served limit of image tokens
LARGE = 400_000  # image tokens of the large refused request: a batch of 4 is 45 MB in FP32
MIB = 1 << 20


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, model_root):
    """serve over dit_transformer with room for large requests: 1,000,000 image tokens, 300 MiB of bodies at once
    in the guard, a body that pauses 2 s refused."""
    folder = tmp_path_factory.mktemp("roomy")
    repository = folder / "model_repository"
    shutil.copytree(REPOSITORY / MODEL, repository / MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    set_parameter(repository / MODEL / "config.pbtxt", "max_image_tokens", str(TOKENS))
    served = Supervised.start(folder, repository, model_root, "--heal-interval", "0", "--max-buffered-mib", "300",
                              "--body-idle-s", "2")  # fmt: skip
    yield served
    served.stop()


def large(tokens: int, batch: int = 4, timestep: float = float("nan")) -> dict[str, torch.Tensor]:
    """A request of ``batch`` samples of ``tokens`` image tokens (zeros), with ``timestep``."""
    wire = inputs.random_step(DEV, height=64, width=64, seed=1).wire()
    rows = {name: tensor.expand(batch, *tensor.shape[1:]).contiguous() for name, tensor in wire.items()}
    return {**rows, "hidden_states": torch.zeros(batch, tokens, 4), "img_ids": torch.zeros(batch, tokens, 3),
            "timestep": torch.full((batch, 1), timestep)}  # fmt: skip


def announce(url: str, length: int, sent: int, headers: dict[str, str] | None = None) -> socket.socket:
    """A connection that announces a ``length``-byte inference body and sends ``sent`` bytes of it."""
    host, port = url.split(":")
    connection = socket.create_connection((host, int(port)))
    lines = [f"POST /v2/models/{MODEL}/infer HTTP/1.1", f"Host: {url}", f"Content-Length: {length}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + bytes(sent))
    return connection


def answer(connection: socket.socket, timeout_s: float = 10.0) -> tuple[int, str]:
    """The status and body of the response on ``connection`` (0 and "" if none came)."""
    connection.settimeout(timeout_s)
    try:
        data = connection.recv(1 << 16)
    except TimeoutError:
        return 0, ""
    if not data:
        return 0, ""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(wbits=31)  # gzip
    return b"".join(packer.compress(bytes(MIB)) for _ in range(size // MIB)) + packer.flush()


def resident(served: Supervised) -> dict[str, float]:
    processes = {**served.children(), "stub": stub_pids(served.repository, MODEL)[0]}
    return {name: rss_mib(pid) for name, pid in processes.items()}


def one_round(served: Supervised, client: httpclient.InferenceServerClient, bomb: bytes) -> None:
    """Every case once, each checked for its answer."""
    with pytest.raises(InferenceServerException, match="timestep: expected finite values"):  # reaches the model
        infer_step(client, MODEL, large(LARGE))
    with pytest.raises(InferenceServerException, match=f"hidden_states: N={TOKENS + 1} exceeds this server's limit"):
        infer_step(client, MODEL, large(TOKENS + 1, batch=1))  # refused by the guard
    stalled = [announce(served.url, 200 * MIB, MIB) for _ in range(8)]
    statuses = [answer(connection, timeout_s=1)[0] for connection in stalled]
    assert statuses.count(503) == 7 and statuses.count(0) == 1, statuses  # one fits the 300 MiB budget
    for connection in stalled:
        connection.close()  # the held one is dropped mid-body
    for _ in range(8):
        connection = http.client.HTTPConnection(served.url, timeout=30)
        connection.request("POST", f"/v2/models/{MODEL}/infer", bomb, {"Content-Encoding": "gzip"})
        response = connection.getresponse()
        assert response.status == 415 and "Content-Encoding is not accepted" in json.loads(response.read())["error"]
        connection.close()


def test_refused_stalled_and_compressed_requests_leave_no_memory(roomy):
    bomb = gzip_of_zeros(256 * MIB)  # ~250 KiB, 256 MiB inflated
    with httpclient.InferenceServerClient(roomy.url, network_timeout=300) as client:
        for _ in range(2):  # the first large requests grow the server's and the stub's shared-memory pool
            one_round(roomy, client, bomb)
        time.sleep(1)
        baseline = resident(roomy)
        rounds = []
        for _ in range(10):
            one_round(roomy, client, bomb)
            rounds.append(resident(roomy))
    print(f"resident MiB: baseline {baseline}, after each round {rounds}")
    for after in rounds:
        assert all(after[name] - baseline[name] < 100 for name in baseline), (baseline, after)


def test_a_body_over_the_limit_or_one_that_stalls_is_refused(roomy):
    status, text = answer(announce(roomy.url, 1 << 30, 1 << 16))
    assert status == 413 and f"{1 << 30} bytes, over this server's limit" in text, text
    started = time.monotonic()
    status, text = answer(announce(roomy.url, 10 * MIB, MIB), timeout_s=30)
    waited = time.monotonic() - started
    assert status == 408 and "then it stalled" in text and 1.5 < waited < 10, (status, text, waited)
