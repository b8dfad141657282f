"""GPU checks (skipped without CUDA): the served code path in bf16 on the GPU, each fast path of the full-size
FLUX.1-dev architecture (random weights) against an fp32 reference of the same weights, next to eager bf16's own
error, and flux_generate on the GPU, its steps over BLS and in process."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_model, embeds, launch

from flux_triton.client import RemoteSettings
from flux_triton.client import generate as served_generate
from flux_triton.deploy.pbtxt import set_parameter
from flux_triton.deploy.placement import transformer_in_process
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import random_step, rel_l2
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings

pytestmark = pytest.mark.gpu


def test_service_in_bf16_on_the_gpu_is_bitwise_the_pipeline_call(model_root):
    service = DitService(TransformerSettings(), model_root, torch.device("cuda"))
    assert service.signature.dtype == "BF16"
    step = random_step(service.signature, batch=2, seed=4, device="cuda")
    (served,) = service.execute([service.prepare(step.wire())])
    assert torch.equal(served, reference_call(service.transformer, step))


def test_cuda_graph_replays_are_bitwise_the_compiled_step_for_each_shape(model_root):
    """Each batch size gets its graph after two ordinary calls; a replay with new inputs equals the ordinary
    call on them (stale static buffers or a graph replayed for the wrong shape would not)."""
    plain = DitService(TransformerSettings(speedups=Speedups(compile="regional")), model_root, torch.device("cuda"))
    graphed_settings = TransformerSettings(speedups=Speedups(compile="regional", cuda_graphs=True))
    graphed = DitService(graphed_settings, model_root, torch.device("cuda"))
    for batch in (1, 3, 1):
        for seed in range(4):
            step = random_step(plain.signature, batch=batch, seed=seed, device="cuda")
            assert torch.equal(graphed.forward(step), plain.forward(step)), (batch, seed)
    assert len(graphed.transformer.graphs) == 2


@pytest.mark.parametrize(
    ("speedups", "allowed"),
    [
        (Speedups(attention_backend="_native_cudnn", fuse_qkv=True, compile="regional"), 1.02),
        (Speedups(attention_backend="_native_cudnn", fp8=True, compile="regional"), 1.25),
    ],
    ids=["bf16-regional-cudnn-fused", "fp8-regional"],
)
def test_fast_paths_are_as_accurate_as_eager(full_size, speedups, allowed):
    """bf16 speed-ups may not be less accurate than eager bf16; FP8 within 25% of it."""
    fast = apply_speedups(full_size.model, speedups)
    error = rel_l2(reference_call(fast, full_size.step), full_size.expected)
    assert error <= allowed * full_size.eager_error, f"{error:.3e} vs eager {full_size.eager_error:.3e}"


def test_flux_generate_on_the_gpu_answers_the_same_latents_over_bls_and_in_process(tmp_path, model_root):
    """flux_generate sending its steps to dit_transformer on GPU 0 (the BLS answer that once crashed tritonserver
    when handed over in GPU memory), and a copy placed --in-process on GPU 0 with the same settings: the same
    generation, bitwise, both ways."""
    repository = tmp_path / "model_repository"
    set_parameter(copy_model(repository, "dit_transformer"), "warmup_shapes", "256x256x1x8")
    copy_model(repository, "flux_generate")
    local = copy_model(repository, "flux_generate", "flux_generate_local")
    transformer_in_process(local, [0], model_root)
    set_parameter(local, "warmup_shapes", "256x256x1x8")
    server = launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root)}).start()
    try:
        answers = []
        for model in ("flux_generate", "flux_generate_local"):
            settings = RemoteSettings(url=server.url, model_name=model)
            answers.append(served_generate(**embeds(5), height=256, width=256, num_inference_steps=4, seed=5,
                                           settings=settings))  # fmt: skip
    finally:
        server.stop()
    assert answers[0].shape == (1, 256, 4) and bool(torch.isfinite(answers[0]).all())
    assert torch.equal(answers[0], answers[1])
