"""CUDA graphs served (skipped without CUDA): ``dit_transformer`` with ``cuda_graphs`` as two instances on one GPU.
Requests sent one at a time (batch 1 and 2, each shape past its two ordinary calls, so both instances replay
graphs) answer bitwise what the same server answers without graphs; requests sent at once, which the dynamic batcher
merges into batches of other sizes (other graphs), each get their own answer within bf16's batch-size rounding.
With a step cache, the blocks the hooks run and the modules around them replay their graphs, and the cached loop is
unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, embeds, generate, infer_concurrently, launch, start_server

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, set_parameter
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.model import store
from flux_triton.model.graphs import GraphedForward
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline import inputs
from flux_triton.pipeline.caching import build_cache
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.internals import hooked_forward, unhooked_step_edges

pytestmark = [pytest.mark.gpu, pytest.mark.server, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]
TWO_INSTANCES_ON_GPU_0 = "instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]\n"
MERGED_TOLERANCE = 2e-2  # rel. L2: the same rows in a batch of another size; another request's answer is ~1


def _serve(folder, model_root, steps, graphs: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each step 4 times one at a time (the last answers), then all at once."""
    repository = folder / "model_repository"
    shutil.copytree(CHECKOUT / "model_repository" / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    set_parameter(config, "cuda_graphs", str(graphs).lower())
    config.write_text(config.read_text() + TWO_INSTANCES_ON_GPU_0)
    with launch(repository, folder, {MODEL_ROOT_ENV: str(model_root)}) as server:
        with httpclient.InferenceServerClient(server.url, network_timeout=300) as client:
            for _ in range(4):
                alone = [infer_step(client, DIT_TRANSFORMER, step.wire()) for step in steps]
        merged, inferences, _ = infer_concurrently(server, DIT_TRANSFORMER, [step.wire() for step in steps])
        assert inferences == sum(step.hidden_states.shape[0] for step in steps)  # Triton counts samples
    return alone, merged


def test_graphed_instances_answer_as_without_graphs_alone_and_merged(tmp_path, model_root):
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    signature = DitSignature.from_config(store.read_config(model_dir), torch.bfloat16)
    steps = [inputs.random_step(signature, batch=1 + i % 2, seed=30 + i) for i in range(6)]
    plain, _ = _serve(tmp_path / "plain", model_root, steps, graphs=False)
    graphed, merged = _serve(tmp_path / "graphs", model_root, steps, graphs=True)
    for index, (with_graphs, without) in enumerate(zip(graphed, plain, strict=True)):
        assert torch.equal(with_graphs, without), index
    for index, answer in enumerate(merged):
        assert inputs.rel_l2(answer, plain[index]) < MERGED_TOLERANCE, index
        other = plain[(index + 2) % len(plain)]  # the same batch size, another request
        assert inputs.rel_l2(answer, other) > MERGED_TOLERANCE, index


@pytest.mark.parametrize(("kind", "compile"), [("mag", "none"), ("mag", "regional"), ("first_block", "none"),
                                               ("taylorseer", "none")])  # fmt: skip
def test_a_cached_loop_with_graphs_equals_it_without(model_root, kind, compile):
    """A step cache with ``cuda_graphs``: each forward the cache hooks run is a graph replay (captured per shape after
    its ordinary calls), the hooks decide on the host between replays; the 28-step cached loop equals the same loop
    without graphs bitwise (which, uncompiled, is diffusers' own cached loop)."""
    cache = build_cache({"kind": kind, **({"threshold": 0.5} if kind == "first_block" else {})})
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    device = torch.device("cuda")
    latents = {}
    for graphs in (False, True):
        transformer = store.load_transformer(model_dir, torch.bfloat16, device)
        apply_speedups(transformer, Speedups(compile=compile, cuda_graphs=graphs), cache)
        prompt = {name: tensor.to(device, torch.bfloat16) for name, tensor in embeds(5).items()}
        latents[graphs] = generate(transformer, "dev", seed=5, num_inference_steps=28, guidance_scale=3.5, **prompt)
        hooked = [hooked_forward(m).original_forward for m in transformer.modules() if hooked_forward(m) is not None]
        if graphs:
            assert all(isinstance(f, GraphedForward) for f in hooked) and len(hooked[0].graphs) == 1, kind
            edges = [module.forward for module in unhooked_step_edges(transformer)]  # embedders, output layers
            assert len(edges) == 6 and all(isinstance(f, GraphedForward) and len(f.graphs) == 1 for f in edges), kind
    assert torch.equal(latents[True], latents[False]), kind


def test_every_text_length_and_batch_served_in_bf16_on_the_gpu_is_bitwise_the_call(tmp_path, model_root, http_client):
    """Triton hands the model its inputs at any byte offset (on the CPU that changed an ulp, so CPU inputs are copied
    to aligned memory): on the GPU, in bf16, every text length 1-16 and batch 1-5 answers bitwise what the same
    call in process answers."""
    server = start_server(tmp_path, model_root, [DIT_TRANSFORMER])
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    transformer = store.load_transformer(model_dir, torch.bfloat16, torch.device("cuda"))
    signature = DitSignature.from_config(transformer.config, torch.bfloat16)
    steps = [inputs.random_step(signature, text_tokens=n, seed=30 + n, device="cuda") for n in range(1, 17)]
    steps += [inputs.random_step(signature, batch=batch, seed=50 + batch, device="cuda") for batch in range(1, 6)]
    try:
        client = http_client(server)
        served = [infer_step(client, DIT_TRANSFORMER, step.wire()) for step in steps]
    finally:
        server.stop()
    differing = [(step.batch_size, step.encoder_hidden_states.shape[1])
                 for step, answer in zip(steps, served, strict=True)
                 if not torch.equal(answer.cuda(), reference_call(transformer, step))]  # fmt: skip
    assert differing == [], f"(batch, text tokens) not bitwise: {differing}"
