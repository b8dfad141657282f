"""dit_transformer's switchable speed-ups: settings from the Triton config, and the ones that run
on the CPU (fused QKV, the plumbing of a step cache's graphed blocks) checked against diffusers."""

from __future__ import annotations

import pytest
import torch
from helpers import embeds, generate

from flux_triton.contract import DitSignature
from flux_triton.model.fp8 import Float8Linear
from flux_triton.model.graphs import GraphedForward
from flux_triton.model.presets import build_tiny
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline import call, inputs
from flux_triton.pipeline.caching import build_cache
from flux_triton.pipeline.internals import hooked_forward
from flux_triton.serving.settings import TransformerSettings


def _config(**parameters) -> dict:
    return {"max_batch_size": 8, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}


def test_settings_read_the_speedups_from_the_config():
    settings = TransformerSettings.from_config(
        _config(attention_backend="_native_cudnn", fuse_qkv="true", fp8="false", compile="regional", cuda_graphs="1")
    )
    assert settings.speedups == Speedups("_native_cudnn", True, fp8=False, compile="regional", cuda_graphs=True)
    assert settings.max_batch == 8
    assert TransformerSettings.from_config(_config()).speedups == Speedups()


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile: expected none, regional or full"):
        TransformerSettings.from_config(_config(compile="everything"))


def test_cuda_graphs_are_refused_on_the_cpu_with_or_without_a_step_cache():
    for cache in (None, build_cache({"kind": "mag"})):
        with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need a CUDA device; this model runs on cpu"):
            apply_speedups(build_tiny("tiny-flux-dev"), Speedups(cuda_graphs=True), cache=cache)


class _Eager:
    """``ShapeGraphs``' interface, calling the forward on copies of its tensors (what a capture records)."""

    def __init__(self):
        self.keys = []

    def run(self, tensors, fn, key):
        self.keys.append((tuple((name, t.shape) for name, t in tensors.items()), key))
        return fn({name: tensor.clone() for name, tensor in tensors.items()})


@pytest.mark.parametrize("kind", ["mag", "taylorseer"])
def test_a_graphed_hooked_forward_gets_its_own_arguments_back(kind):
    """``GraphedForward`` takes a hooked forward's arguments apart into tensors (the graph's inputs) and the rest
    (its key) and calls the forward with them put back: the cached loop is unchanged, and every call of the hooked
    blocks goes through it."""
    transformer = build_tiny("tiny-flux-dev")
    transformer.enable_cache(build_cache({"kind": kind}))
    hooked = [hooked_forward(module) for module in transformer.modules() if hooked_forward(module) is not None]
    expected = generate(transformer, "dev", seed=4, num_inference_steps=8, **embeds(4))
    graphs = [_Eager() for _ in hooked]
    for reference, eager in zip(hooked, graphs, strict=True):
        reference.original_forward = GraphedForward(reference.original_forward, eager)
    assert torch.equal(generate(transformer, "dev", seed=4, num_inference_steps=8, **embeds(4)), expected)
    assert all(eager.keys for eager in graphs)
    tensors, key = graphs[0].keys[0]
    assert len(tensors) >= 3 and "None" in key  # hidden and text states, temb, rotary cos/sin; no attention kwargs


def test_fused_qkv_keeps_the_output_and_frees_the_unfused_weights():
    transformer = build_tiny("tiny-flux-dev")
    signature = DitSignature.from_config(transformer.config, torch.float32)
    step = inputs.random_step(signature, batch=2, seed=3)
    expected = call.reference_call(transformer, step)
    before = sum(p.numel() for p in transformer.parameters())
    assert apply_speedups(transformer, Speedups(fuse_qkv=True)) is transformer
    torch.testing.assert_close(call.reference_call(transformer, step), expected, rtol=1e-5, atol=1e-6)
    attention = transformer.transformer_blocks[0].attn
    assert hasattr(attention, "to_qkv") and not hasattr(attention, "to_q")
    assert sum(p.numel() for p in transformer.parameters()) == before  # one copy of the q/k/v weights


def test_fp8_fast_accumulation_reaches_every_fp8_linear_and_needs_fp8():
    settings = TransformerSettings.from_config(_config(fp8="true", fp8_fast_accum="true"))
    assert settings.speedups == Speedups(fp8=True, fp8_fast_accum=True)
    transformer = build_tiny("tiny-flux-dev")
    apply_speedups(transformer, settings.speedups)
    linears = [module for module in transformer.modules() if isinstance(module, Float8Linear)]
    assert len(linears) == 17 and all(linear.fast_accum for linear in linears)
    with pytest.raises(ValueError, match="fp8_fast_accum true: fast accumulation is for fp8 true"):
        TransformerSettings.from_config(_config(fp8_fast_accum="true"))
