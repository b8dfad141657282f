"""Context parallelism on a host with 2 or more GPUs (skipped with fewer): ``dit_transformer`` placed as one
instance across GPUs 0 and 1 (Ulysses-2, bf16, over NCCL) serves bitwise diffusers' own context-parallel forward
of the same weights, and the one-GPU step within bf16's rounding."""

from __future__ import annotations

import shutil

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, diffusers_context_parallel, launch, worker_gone, worker_pids

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER
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


@pytest.mark.server
def test_two_gpus_serve_diffusers_context_parallel_forward(tmp_path, model_root):
    repository = tmp_path / "model_repository"
    shutil.copytree(CHECKOUT / "model_repository" / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    place(repository / DIT_TRANSFORMER / "config.pbtxt", parallel=ParallelSettings("ulysses", 2))
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    signature = DitSignature.from_config(store.read_config(model_dir), torch.bfloat16)
    step = inputs.random_step(signature, batch=2, height=256, width=256, seed=21)
    with launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root)}) as server:
        [worker] = worker_pids()
        with httpclient.InferenceServerClient(server.url, network_timeout=300) as client:
            served = infer_step(client, DIT_TRANSFORMER, step.wire())
    assert worker_gone(worker)
    reference = diffusers_context_parallel(model_dir, step, tmp_path)
    difference = (served.float() - reference.float()).abs()
    assert torch.equal(served, reference), f"max |diff| {difference.max():.3e} at {difference.argmax()}"
    one_gpu = store.load_transformer(model_dir, torch.bfloat16, "cuda")
    expected = call.reference_call(one_gpu, step.replace(**{k: v.cuda() for k, v in step.tensors().items()})).cpu()
    assert inputs.rel_l2(served, expected) < ONE_GPU_TOLERANCE < inputs.rel_l2(served.flip(0), expected)
