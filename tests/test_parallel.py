"""Context parallelism in ``dit_transformer`` (``parallel: ulysses``, 2 ranks), on CPU ranks over gloo: served
steps equal diffusers' own context-parallel forward bit for bit; the worker ranks start and end with the
instance; a rank that dies, hangs or runs out of memory fails its step with the cause, and the model keeps
serving on new ranks. Placement configs (one instance per GPU, or one across GPUs) and the settings' refusals.
On a host with 2 GPUs the lifecycle and fault tests run on GPU ranks over NCCL (the bf16 parity checks are in
tests/test_gpu_parallel.py)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time

import pytest
import torch
import tritonclient.http as httpclient
from helpers import (
    CHECKOUT,
    DEV,
    diffusers_context_parallel,
    embeds,
    generate,
    launch,
    load_tiny,
    stub_pids,
    worker_gone,
    worker_pids,
)
from tritonclient.utils import InferenceServerException

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, parse_pbtxt, set_parameter
from flux_triton.deploy.placement import place
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.model import store
from flux_triton.model.parallel import ParallelSettings, check_degree
from flux_triton.pipeline import call, inputs
from flux_triton.serving import faults
from flux_triton.serving.settings import TransformerSettings

ULYSSES_2 = ParallelSettings("ulysses", 2)
SERVED = DEV if not torch.cuda.is_available() else dataclasses.replace(DEV, dtype="BF16")  # the served dtype
FAULT_BUDGET = 1_000_000  # bytes: a 64x64 step fits on a rank (~25 kB), a 1024x1024 one (~4 MB) does not


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


cpu_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks; on a GPU host see test_gpu_parallel.py")
# the lifecycle and fault tests run on CPU ranks over gloo, and on GPU ranks over NCCL where 2 GPUs are present
any_ranks = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="a GPU host runs one rank per GPU: needs 2"
)


@pytest.fixture(scope="module")
def parallel_server(tmp_path_factory, model_root):
    """dit_transformer placed as one instance across 2 ranks, with a rank-1 memory budget (fault injection)
    and a short collective timeout; explicit model control."""
    folder = tmp_path_factory.mktemp("parallel")
    repository = folder / "model_repository"
    shutil.copytree(CHECKOUT / "model_repository" / DIT_TRANSFORMER, repository / DIT_TRANSFORMER,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    set_parameter(config, "parallel_timeout_s", "5")
    place(config, parallel=ULYSSES_2)
    env = {MODEL_ROOT_ENV: str(model_root), faults.FAULT_FORWARD_BYTES_ENV: str(FAULT_BUDGET),
           faults.FAULT_RANK_ENV: "1"}  # fmt: skip
    server = launch(repository, folder, env)
    server.model_control = True
    server.start()
    yield server
    server.stop()


def _served(server, step) -> torch.Tensor:
    with httpclient.InferenceServerClient(server.url, network_timeout=120) as client:
        return infer_step(client, DIT_TRANSFORMER, step.wire())


@cpu_ranks
@pytest.mark.server
def test_a_served_step_equals_diffusers_context_parallel_forward(parallel_server, model_root, tmp_path):
    step = inputs.random_step(DEV, batch=2, height=64, width=64, seed=11)
    served = _served(parallel_server, step)
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    assert torch.equal(served, diffusers_context_parallel(model_dir, step, tmp_path))
    single = call.reference_call(load_tiny(model_root, "tiny-flux-dev"), step)  # one process, no parallelism
    assert 0 < inputs.rel_l2(served, single) < 1e-5
    # a swapped batch row or a wrong timestep is far outside that tolerance
    assert inputs.rel_l2(served.flip(0), single) > 1e-2
    assert len(worker_pids()) == 1


@cpu_ranks
@pytest.mark.server
def test_a_generation_with_sessions_across_ranks_equals_stateless_and_local(parallel_server, model_root):
    """Sessions compose: rank 0 holds the prompt and broadcasts the whole step; a 4-step loop through the pipeline
    client gives bitwise the stateless steps' latents, and diffusers' within the ranks' rounding."""
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **embeds(8))
    with RemoteFluxTransformer(url=parallel_server.url) as remote:
        assert remote.sessions
        served = generate(remote, "dev", seed=8, **kwargs)
    with RemoteFluxTransformer(url=parallel_server.url, sessions=False) as stateless:
        assert torch.equal(served, generate(stateless, "dev", seed=8, **kwargs))
    local = generate(load_tiny(model_root, "tiny-flux-dev"), "dev", seed=8, **kwargs)
    assert inputs.rel_l2(served, local) < 1e-5


@any_ranks
@pytest.mark.server
def test_a_dead_rank_fails_its_step_and_the_model_serves_on_new_ranks(parallel_server, model_root):
    step = inputs.random_step(SERVED, height=64, width=64, seed=12)
    expected = _served(parallel_server, step)
    [worker] = worker_pids()
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(InferenceServerException, match=rf"rank 1 \(pid {worker}\) exited: status -9; the ranks were"):
        _served(parallel_server, step)
    assert torch.equal(_served(parallel_server, step), expected)
    assert worker not in worker_pids() and len(worker_pids()) == 1


@any_ranks
@pytest.mark.server
def test_a_hung_rank_times_out_and_is_replaced(parallel_server):
    step = inputs.random_step(SERVED, height=64, width=64, seed=13)
    expected = _served(parallel_server, step)
    [worker] = worker_pids()
    os.kill(worker, signal.SIGSTOP)  # over NCCL, rank 0's wait times out; over gloo, the collective
    started = time.monotonic()
    hung = r"(Timed out|did not finish within 5 s).*; the ranks were started again"
    with pytest.raises(InferenceServerException, match=hung):
        _served(parallel_server, step)
    assert time.monotonic() - started < 60  # the 5 s collective timeout, then the restart
    assert torch.equal(_served(parallel_server, step), expected)
    assert worker not in worker_pids()


@any_ranks
@pytest.mark.server
def test_an_out_of_memory_rank_fails_the_step_on_every_rank_and_the_model_keeps_serving(parallel_server):
    """Over NCCL rank 0's host may block in its forward behind the collective rank 1 never joins (loading a kernel
    for the new shape waits for the GPU): NCCL's watchdog then aborts the group, 2 * 5 + 60 s after the step."""
    big = inputs.random_step(SERVED, height=1024, width=1024, seed=14)
    with pytest.raises(InferenceServerException, match=r"rank 1 .*OutOfMemoryError: out of memory .* budget"):
        _served(parallel_server, big)
    small = inputs.random_step(SERVED, height=64, width=64, seed=14)
    assert _served(parallel_server, small).shape == small.hidden_states.shape


@any_ranks
@pytest.mark.server
def test_workers_end_with_their_instance(parallel_server):
    """Unloading ends the workers; so does the instance's process dying (their pipe to it closes)."""
    with httpclient.InferenceServerClient(parallel_server.url, network_timeout=120) as client:
        [worker] = worker_pids()
        client.unload_model(DIT_TRANSFORMER)
        assert worker_gone(worker)
        client.load_model(DIT_TRANSFORMER)
        [worker] = worker_pids()
        [stub] = stub_pids(parallel_server.model_repository, DIT_TRANSFORMER)
        assert parent_pid(worker) == stub
        os.kill(stub, signal.SIGKILL)
        assert worker_gone(worker)
    parallel_server.stop()
    assert worker_pids() == []


def test_placement_writes_one_instance_per_gpu_or_one_across_gpus(tmp_path):
    repository = tmp_path / "repository"
    for name, text in {DIT_TRANSFORMER: (CHECKOUT / "model_repository" / DIT_TRANSFORMER / "config.pbtxt").read_text(),
                       ENGINE: f'name: "{ENGINE}"\nbackend: "python"\nmax_batch_size: 8\n'}.items():  # fmt: skip
        (repository / name).mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(text)
    config = repository / ENGINE / "config.pbtxt"
    place(config, gpus=[0, 1])
    groups = parse_pbtxt(config).instance_group
    assert [(g.kind, list(g.gpus), g.count) for g in groups] == [(1, [0], 1), (1, [1], 1)]  # KIND_GPU
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    with pytest.raises(ValueError, match=r"parallel ring: ring attention needs .* attention_backend native"):
        place(config, parallel=ParallelSettings("ring", 2))  # through the settings schema: the combination
    set_parameter(config, "attention_backend", "_native_cudnn")
    place(config, parallel=ParallelSettings("ring", 2))
    parsed = parse_pbtxt(config)
    assert [(g.kind, g.count) for g in parsed.instance_group] == [(3, 1)]  # KIND_MODEL
    assert parsed.parameters["parallel"].string_value == "ring"
    assert parsed.parameters["parallel_degree"].string_value == "2"
    assert parsed.parameters["model_dir"].string_value == "tiny-flux-dev"  # the rest kept
    assert config.read_text().startswith("# FLUX DiT")
    with pytest.raises(ValueError, match="only dit_transformer runs a step across GPUs"):
        place(repository / ENGINE / "config.pbtxt", parallel=ULYSSES_2)
    with pytest.raises(ValueError, match="--gpus and --parallel"):
        place(config, gpus=[0, 1], parallel=ULYSSES_2)


def test_parallel_settings_refuse_what_cannot_run(model_root):
    with pytest.raises(ValueError, match="parallel: expected none or one of ulysses, ring, usp, got 'tensor'"):
        TransformerSettings.from_config({"parameters": {"parallel": {"string_value": "tensor"}}})
    with pytest.raises(ValueError, match="ulysses needs at least 2 ranks"):
        ParallelSettings("ulysses", 1)
    assert ParallelSettings.named("ring4") == ParallelSettings("ring", 4) and not ParallelSettings.named("none").enabled
    with pytest.raises(ValueError, match="ulysses needs at least 2 ranks"):
        ParallelSettings.named("ulysses")
    assert ParallelSettings.named("usp6").degrees() == {"ulysses_degree": 2, "ring_degree": 3}
    for odd in ("usp2", "usp5"):
        with pytest.raises(ValueError, match="usp needs an even number of ranks, 4 or more"):
            ParallelSettings.named(odd)
    with pytest.raises(ValueError, match="parallel_degree 4: this host has 2 GPUs visible"):
        check_degree(4, gpus_present=2)
    check_degree(2, gpus_present=2)
    assert TransformerSettings(cache="mag", parallel="ulysses", parallel_degree=2).parallel_settings.enabled  # composes
    with pytest.raises(ValueError, match=r"parallel ring: ring attention needs .* attention_backend native does not"):
        TransformerSettings(model_dir="tiny-flux-dev", parallel="ring", parallel_degree=2)
    assert worker_pids() == []
