"""Helpers shared by the tests: the tiny models' signatures, real tritonserver processes on loopback
over copies of the repository's models, and concurrent requests with the server's own counts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient
from safetensors.torch import load_file, save_file

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature
from flux_triton.contract.protocol import ADMIN_KEY_ENV
from flux_triton.deploy import pbtxt
from flux_triton.deploy.check import check_repository
from flux_triton.deploy.pbtxt import set_parameter
from flux_triton.deploy.placement import place
from flux_triton.deploy.repository import write_repository
from flux_triton.deploy.server import TritonServer, free_port
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.parallel import ParallelSettings

CHECKOUT = Path(__file__).resolve().parents[1]
REPOSITORY = CHECKOUT / "model_repository"
STUB_CACHE = CHECKOUT / ".triton"  # the Python-backend stub, copied once for every test server

DEV = DitSignature(in_channels=4, pooled_dim=32, text_dim=32, guidance_embeds=True, dtype="FP32")
SCHNELL = DitSignature(in_channels=4, pooled_dim=32, text_dim=32, guidance_embeds=False, dtype="FP32")
# 4096 image tokens: the engine's forward takes several times the preprocessing hop, so concurrent
# requests queue at the engine as they do behind a GPU step (the batcher waits only 0.1 ms).
BUSY_SIZE = {"height": 1024, "width": 1024}


def cpu_row_wise_fp8() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (the pinned one does; older ones, as on some
    GPU hosts, take only per-tensor scales there)."""
    rows = torch.zeros(2, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(rows, rows.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


fp8_on_cpu = pytest.mark.skipif(not cpu_row_wise_fp8(), reason="this torch's CPU _scaled_mm lacks row-wise scales")


def load_tiny(model_root: Path, name: str):
    """A tiny model loaded as the server loads it (fp32, CPU)."""
    from flux_triton.model import store

    return store.load_transformer(store.resolve_model_dir(name, model_root), torch.float32, "cpu")


def copy_model(repository: Path, model: str, name: str | None = None) -> Path:
    """The committed repository's ``model`` copied into ``repository`` (``pbtxt.copy_model``)."""
    return pbtxt.copy_model(REPOSITORY / model, repository, name)


def start_server(
    tmp_path: Path,
    model_root: Path,
    models: list[str],
    env: dict[str, str] | None = None,
    wait_for: str = "ready",
    parameters: dict[str, dict[str, str]] | None = None,
    model_control: bool = False,
) -> TritonServer:
    """A tritonserver over a copy of the listed repository models, bound to loopback.
    ``parameters`` sets config parameters per model; ``wait_for="live"`` returns before the
    models are loaded (to check why one does not load); ``model_control``: explicit, to reload models."""
    repository = tmp_path / "model_repository"
    for name in models:
        config = copy_model(repository, name)
        for key, value in (parameters or {}).get(name, {}).items():
            set_parameter(config, key, value)
    server = launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root), **(env or {})})
    server.model_control = model_control
    return server.start(wait_for=wait_for)


def start_variants(
    folder: Path, model_root: Path, variants: dict[str, dict[str, str]], parallel: ParallelSettings | None = None
) -> TritonServer:
    """One tritonserver serving several copies of dit_transformer, each under its own name with its own config
    parameters (``{name: parameters}``), each placed across ranks with ``parallel``: one server start for every
    special setting a module tests."""
    repository = folder / "model_repository"
    for name, parameters in variants.items():
        config = copy_model(repository, "dit_transformer", name)
        for key, value in parameters.items():
            set_parameter(config, key, value)
        if parallel is not None:
            place(config, parallel=parallel)
    return launch(repository, folder, {MODEL_ROOT_ENV: str(model_root)}).start()


def launch(repository: Path, folder: Path, env: dict[str, str]) -> TritonServer:
    """A server (not started) over ``repository``, logging into ``folder``."""
    return TritonServer(
        repository, env=env, log_path=folder / "tritonserver.log", cache=STUB_CACHE, args=["--exit-timeout-secs=5"]
    )


def start_engine_server(folder: Path, model_root: Path, sidecar: Path, cache: str = "none") -> TritonServer:
    """flux_dit over the engine of ``sidecar`` (built with ``make engine``'s code) serving the step ``cache``, in a
    repository generated and checked like ``make repo``."""
    repository = folder / "model_repository"
    write_repository(sidecar, repository, Locations(CHECKOUT), cache)
    check_repository(repository)
    return launch(repository, folder, {MODEL_ROOT_ENV: str(model_root)}).start()


def settled_counts(client: httpclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """``(inference_count, execution_count)`` of ``model`` once they stop moving: the server
    updates its statistics just after it answers, so a read right after a response can lag."""
    previous = None
    for _ in range(40):
        stats = client.get_inference_statistics(model)["model_stats"][0]
        counts = stats["inference_count"], stats["execution_count"]
        if counts == previous:
            return counts
        previous = counts
        time.sleep(0.05)
    return previous


def infer_concurrently(
    server: TritonServer, model: str, wires: list[dict[str, torch.Tensor]], batching_model: str | None = None
) -> tuple[list[torch.Tensor], int, int]:
    """Send ``wires`` at once, each on its own connection, so that the dynamic batcher can merge
    them; returns the results in order, and how many inferences and executions ``batching_model``
    (default ``model``) ran for them."""

    def infer(wire):
        with httpclient.InferenceServerClient(server.url) as client:
            return infer_step(client, model, wire)

    counted = batching_model or model
    with httpclient.InferenceServerClient(server.url) as client:
        before = settled_counts(client, counted)
        with concurrent.futures.ThreadPoolExecutor(len(wires)) as pool:
            results = list(pool.map(infer, wires))
        after = settled_counts(client, counted)
    return results, after[0] - before[0], after[1] - before[1]


def stub_pids(repository: Path, model: str) -> list[int]:
    """The Python-backend stub processes serving ``model`` (their first argument is its model.py)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        stub = len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub")
        if stub and Path(argv[1].decode()) == repository / model / "1" / "model.py":
            found.append(int(entry.name))
    return found


def rss_mib(pid: int) -> float:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def answers_correctly(url: str, model: str, tiny_dev) -> bool:
    """Whether ``model`` at ``url`` answers a 256x256 tiny-flux-dev step as diffusers does (within 1e-4)."""
    from flux_triton.pipeline import call, inputs

    step = inputs.random_step(DEV, height=256, width=256, seed=3)
    try:
        with httpclient.InferenceServerClient(url, network_timeout=30) as client:
            served = infer_step(client, model, step.wire())
    except Exception:
        return False
    expected = call.reference_call(tiny_dev, step)
    return served.shape == expected.shape and bool((served - expected).abs().max() < 1e-4)


TEXT_TOKENS = 8  # the prompts of the pipeline-level client tests


def embeds(seed: int, text_tokens: int = TEXT_TOKENS) -> dict[str, torch.Tensor]:
    """A random prompt's embeddings for a tiny model, as ``FluxPipeline`` takes them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, text_tokens, 32, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=generator),
    }


def halve_prompt(pipe, index, timestep, tensors) -> dict:
    """A step-end callback that scales ``prompt_embeds`` in place after the first step: the same tensor object with
    new values (``generate(..., **HALVED_PROMPT)``)."""
    if index == 0:
        tensors["prompt_embeds"].mul_(0.5)
    return {}


HALVED_PROMPT = {"callback_on_step_end": halve_prompt, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}


def generate(transformer, preset: str, seed: int, size: int = 64, **kwargs) -> torch.Tensor:
    """``FluxPipeline(output_type="latent")`` with ``transformer`` (local or remote) and the preset's scheduler."""
    from diffusers import FluxPipeline

    from flux_triton.pipeline import loop

    pipe = FluxPipeline(loop.make_scheduler(preset), None, None, None, None, None, transformer)
    generator = torch.Generator().manual_seed(seed)
    return pipe(height=size, width=size, generator=generator, output_type="latent", **kwargs).images


def step_call(text: torch.Tensor, seed: int = 0) -> dict:
    """The keyword arguments of one tiny-flux-dev transformer call (16 image tokens, ``text`` as the prompt)."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 4, generator=generator),
        encoder_hidden_states=text,
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(text.shape[1], 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )


def worker_pids() -> list[int]:
    """Every context-parallel worker process on this host."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                if b"flux_triton.serving.worker" in cmdline.read().split(b"\0"):  # the argument, not a shell's text
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def diffusers_context_parallel(model_dir, step, tmp_path, ulysses: int = 2, ring: int = 1, backend: str = "native"):
    """diffusers' own context-parallel forward of ``step`` with these degrees and attention ``backend``, in
    ``ulysses * ring`` processes (tests/cp_reference.py)."""
    tensors = {name: t.contiguous() for name, t in step.tensors().items()}
    return _cp_reference(model_dir, tensors, tmp_path, [str(ulysses), str(ring), backend], [])["noise_pred"]


def diffusers_context_parallel_loop(model_dir, prompt: dict, cache: dict, steps: int, seed: int, size: int, tmp_path):
    """diffusers' own Ulysses-2 context-parallel ``FluxPipeline`` loop (dev-like) with the step ``cache``
    (``enable_cache``), in 2 processes (tests/cp_reference.py): the final latents."""
    arguments = [json.dumps(cache), str(steps), str(seed), str(size)]
    return _cp_reference(model_dir, prompt, tmp_path, ["2", "1", "native"], arguments)["latents"]


def _cp_reference(model_dir, tensors: dict, tmp_path, degrees: list[str], loop: list[str]) -> dict:
    step_file, out = tmp_path / "reference-in.safetensors", tmp_path / "reference-out.safetensors"
    save_file(tensors, step_file)
    port, world = str(free_port()), int(degrees[0]) * int(degrees[1])
    script = [sys.executable, str(CHECKOUT / "tests" / "cp_reference.py")]
    arguments = [str(world), port, *degrees, str(model_dir), str(step_file), str(out), *loop]
    ranks = [subprocess.Popen([*script, str(rank), *arguments]) for rank in range(world)]
    assert [rank.wait(timeout=300) for rank in ranks] == [0] * world
    return load_file(out)


def worker_gone(pid: int, timeout_s: float = 30.0) -> bool:
    """Whether the worker process ``pid`` has ended (waiting up to ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid not in worker_pids():
            return True
        time.sleep(0.1)
    return False


@dataclass
class Supervised:
    """``python -m flux_triton serve`` as shipped (the guard in front, the supervisor probing), with the admin key
    ``test-key``."""

    url: str
    grpc_url: str
    metrics_url: str
    repository: Path
    log: Path
    process: subprocess.Popen

    @classmethod
    def start(cls, folder: Path, repository: Path, model_root: Path, *arguments: str) -> Supervised:
        """``serve`` over ``repository`` on free loopback ports, once it probes its models."""
        ports = [free_port() for _ in range(3)]
        command = [sys.executable, "-m", "flux_triton", "serve", "--model-repository", str(repository)]
        command += [*arguments, "--exit-timeout-secs=5"]
        command += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
        env = {**os.environ, MODEL_ROOT_ENV: str(model_root), ADMIN_KEY_ENV: "test-key"}
        log = folder / "serve.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(command, cwd=CHECKOUT, env=env, stdout=output, stderr=output)
        deadline = time.monotonic() + 180
        while f"serving {repository} at" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        return cls(*(f"127.0.0.1:{port}" for port in ports), repository, log, process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)

    def children(self) -> dict[str, int]:
        """The serve command's child processes: ``{"tritonserver": pid, "guard": pid}``."""
        pids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        found = {}
        for pid in map(int, pids):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            found["guard" if b"guard" in argv else "tritonserver"] = pid
        return found
