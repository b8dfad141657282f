"""dit_transformer's switchable speed-ups: settings from the Triton config, and the ones that run
on the CPU (fused QKV) checked against diffusers."""

from __future__ import annotations

import pytest
import torch

from flux_triton.contract import DitSignature
from flux_triton.model.fp8 import Float8Linear
from flux_triton.model.presets import build_tiny
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline import call, inputs
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


def test_cuda_graphs_are_refused_on_the_cpu_and_with_a_step_cache():
    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need a CUDA device; this model runs on cpu"):
        apply_speedups(build_tiny("tiny-flux-dev"), Speedups(cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs: a captured step cannot hold a step cache"):
        apply_speedups(build_tiny("tiny-flux-dev"), Speedups(cuda_graphs=True), cache=object())


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
