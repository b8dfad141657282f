"""The served step on GPUs (skipped with fewer than 2): ``dit_transformer`` placed on one GPU serves bitwise the
pipeline's call, and placed as one instance across GPUs (Ulysses-2, ring-2; ring-4 and USP-4 where 4 GPUs are; bf16,
over NCCL) bitwise diffusers' own context-parallel forward of the same weights, and the one-GPU step within bf16's
rounding. Ring and USP are served with cuDNN attention (ring attention needs its log-sum-exp), and diffusers' forward
with the same."""

from __future__ import annotations

import shutil

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, diffusers_context_parallel, launch, worker_gone, worker_pids

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, set_parameter
from flux_triton.deploy.placement import place
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.model import store
from flux_triton.model.parallel import ParallelSettings
from flux_triton.pipeline import call, inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
# bf16 rounding of a different split of the same sums; a swapped batch row is ~1
ONE_GPU_TOLERANCE = 2e-2


def _bitwise(served: torch.Tensor, reference: torch.Tensor) -> None:
    difference = (served.float() - reference.float()).abs()
    assert torch.equal(served, reference), (
        f"{int((difference > 0).sum())} of {difference.numel()} differ, max {difference.max():.3e}, "
        f"rel. L2 {inputs.rel_l2(served, reference):.3e}"
    )


def _serve(tmp_path, model_root, step, attention="native", **placement) -> tuple[torch.Tensor, list[int]]:
    """``step`` served once by dit_transformer with ``attention`` placed as ``placement`` says; and the worker
    ranks it had."""
    repository = tmp_path / "model_repository"
    shutil.copytree(CHECKOUT / "model_repository" / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    set_parameter(repository / DIT_TRANSFORMER / "config.pbtxt", "attention_backend", attention)
    place(repository / DIT_TRANSFORMER / "config.pbtxt", **placement)
    with launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root)}) as server:
        workers = worker_pids()
        with httpclient.InferenceServerClient(server.url, network_timeout=300) as client:
            return infer_step(client, DIT_TRANSFORMER, step.wire()), workers


def _one_gpu_call(model_dir, step) -> torch.Tensor:
    one_gpu = store.load_transformer(model_dir, torch.bfloat16, "cuda")
    return call.reference_call(one_gpu, step.replace(**{k: v.cuda() for k, v in step.tensors().items()})).cpu()


def _tiny_step(model_root):
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    signature = DitSignature.from_config(store.read_config(model_dir), torch.bfloat16)
    return model_dir, inputs.random_step(signature, batch=2, height=256, width=256, seed=21)


@pytest.mark.server
def test_one_gpu_through_triton_serves_the_pipeline_call(tmp_path, model_root):
    """The served step without parallelism, its inputs in Triton's buffers, is bitwise the pipeline call."""
    model_dir, step = _tiny_step(model_root)
    served, _ = _serve(tmp_path, model_root, step, gpus=(0,))
    _bitwise(served, _one_gpu_call(model_dir, step))


# each placement with the Ulysses and ring degrees diffusers is given for it; the tiny model has 2 heads: Ulysses
# splits heads (degree 2 at most), ring splits the sequence (any degree). cuDNN attention: ring needs its log-sum-exp
CP_ATTENTION = "_native_cudnn"
PLACEMENTS = {"ulysses2": (2, 1), "ring2": (1, 2), "ring4": (1, 4), "usp4": (2, 2)}


@pytest.mark.server
@pytest.mark.parametrize("name", PLACEMENTS)
def test_gpus_serve_diffusers_context_parallel_forward(tmp_path, model_root, name):
    parallel = ParallelSettings.named(name)
    if torch.cuda.device_count() < parallel.degree:
        pytest.skip(f"needs {parallel.degree} GPUs")
    model_dir, step = _tiny_step(model_root)
    served, workers = _serve(tmp_path, model_root, step, CP_ATTENTION, parallel=parallel)
    assert len(workers) == parallel.degree - 1 and all(worker_gone(worker) for worker in workers)
    expected = _one_gpu_call(model_dir, step)
    assert inputs.rel_l2(served, expected) < ONE_GPU_TOLERANCE < inputs.rel_l2(served.flip(0), expected)
    _bitwise(served, diffusers_context_parallel(model_dir, step, tmp_path, *PLACEMENTS[name], CP_ATTENTION))
