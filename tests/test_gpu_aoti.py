"""GPU checks of the AOTI engines (skipped without CUDA): the full-size FLUX.1-dev blocks compiled
ahead of time, bf16 and FP8, against an fp32 reference of the same weights, next to eager bf16's
own error, and ``dit_engine``'s CUDA graphs: replays bitwise the ordinary call, per shape, interleaved. The engines
come from ``$FLUX_GPU_ENGINES`` (``make engine`` for the random model ``flux-dev-random``) or are compiled here
once per kind (about 1.5 min each). And ``flux_dit`` served over a tiny engine on the GPU, holding prompts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import HALVED_PROMPT, embeds, generate, start_engine_server

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.contract import DitSignature
from flux_triton.deploy.pbtxt import ENGINE, parse_pbtxt
from flux_triton.engines import aoti
from flux_triton.engines.aoti_engine import AotiEngine, prebuilt_or_build, speedups_for
from flux_triton.engines.build import build_engine
from flux_triton.model.graphs import WARMUP_CALLS, GraphedEngine
from flux_triton.model.presets import FLUX_DEV_CONFIG, FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL, full_size_step
from flux_triton.model.speedups import apply_speedups
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import rel_l2

pytestmark = pytest.mark.gpu
GRAPHED_SHAPES = ("1024x1024-b1", "512x512-b1", "512x512-b8")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aoti-engines")


def attach_engine(model, kind: str, build_dir: Path) -> None:
    apply_speedups(model, speedups_for(kind, model.device))
    engines = os.environ.get("FLUX_GPU_ENGINES")
    engine_dir, packages = prebuilt_or_build(kind, model, Path(engines) if engines else None, RANDOM_MODEL, build_dir)
    aoti.attach(model, engine_dir, packages)


def test_engine_steps_replay_bitwise_from_cuda_graphs(full_size, build_dir):
    """``dit_engine``'s ``cuda_graphs``: one graph per request shape (merged batches are shapes too), captured
    after the warm-up calls; replays interleaved across shapes, so one graph's output must not overwrite another's."""
    model = full_size.model
    attach_engine(model, "aoti", build_dir)
    engine = AotiEngine("aoti", model, model.device, FULL_SIZE_TEXT_TOKENS)
    graphed = GraphedEngine(engine, model.device)
    signature = DitSignature.from_config(FLUX_DEV_CONFIG, torch.bfloat16)
    requests = {shape: full_size_step(shape, seed=2).engine_tensors(signature) for shape in GRAPHED_SHAPES}
    expected = {shape: engine(tensors) for shape, tensors in requests.items()}
    for _ in range(WARMUP_CALLS + 2):
        for shape, tensors in requests.items():
            assert torch.equal(graphed(tensors), expected[shape]), shape
    assert len(graphed.graphs) == len(GRAPHED_SHAPES)


@pytest.mark.parametrize(("kind", "allowed"), [("aoti", 1.02), ("aoti-fp8", 1.25)])  # bf16 first: FP8 is in place
def test_aoti_engines_are_as_accurate_as_eager(full_size, build_dir, kind, allowed):
    model = full_size.model
    attach_engine(model, kind, build_dir)
    error = rel_l2(reference_call(model, full_size.step), full_size.expected)
    assert error <= allowed * full_size.eager_error, f"{kind}: {error:.3e} vs eager {full_size.eager_error:.3e}"


def test_served_flux_dit_holds_each_prompt_on_the_gpu(tmp_path, model_root):
    """flux_dit over tiny-flux-dev's AOTI engine (bf16) on GPU 0, one instance holding each generation's prompt as
    ``make repo`` writes it: a generation with sessions, and one whose prompt a callback changes in place, are
    bitwise the same generations sent whole, step by step, without sessions."""
    sidecar = build_engine("aoti", "tiny-flux-dev", engines_dir=tmp_path / "engines", model_root=model_root)
    server = start_engine_server(tmp_path, model_root, sidecar)
    try:
        engine = parse_pbtxt(tmp_path / "model_repository" / ENGINE / "config.pbtxt")
        assert list(engine.instance_group[0].gpus) == [0] and engine.parameters["hold_prompts"].string_value == "true"

        def run(sessions: bool, **kwargs) -> torch.Tensor:
            with RemoteFluxTransformer(url=server.url, model_name="flux_dit", sessions=sessions) as remote:
                return generate(remote, "dev", seed=3, size=256, num_inference_steps=4, guidance_scale=3.5,
                                **embeds(3), **kwargs)  # fmt: skip

        assert torch.equal(run(True), run(False))
        assert torch.equal(run(True, **HALVED_PROMPT), run(False, **HALVED_PROMPT))
    finally:
        server.stop()
