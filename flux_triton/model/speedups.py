"""GPU speed-ups for an eager FluxTransformer2DModel, each one switchable by name.

``dit_transformer`` takes them from its config parameters; the benchmark combines them into
paths. None changes the function computed except ``fp8`` (lossy, reported by the benchmark)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Speedups:
    attention_backend: str = "native"  # diffusers backend name, e.g. _native_cudnn, _native_flash
    fuse_qkv: bool = False  # one QKV GEMM per attention; the unfused weights are freed
    fp8: bool = False  # e4m3 block linears (model.fp8), Hopper and newer
    compile: str = "none"  # none | regional (each repeated block compiled once) | full

    @classmethod
    def parse(cls, attention_backend="native", fuse_qkv="false", fp8="false", compile="none") -> Speedups:
        def flag(value) -> bool:
            return str(value).lower() in ("1", "true", "yes", "on")

        if compile not in ("none", "regional", "full"):
            raise ValueError(f"compile: expected none, regional or full, got {compile!r}")
        return cls(attention_backend, flag(fuse_qkv), flag(fp8), compile)


def fuse_qkv_projections(transformer) -> None:
    """diffusers' fuse_qkv_projections, then drop the unfused q/k/v weights it keeps."""
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if hasattr(module, name):
                    delattr(module, name)
    torch.cuda.empty_cache()


def apply_speedups(transformer, speedups: Speedups):
    """Apply ``speedups`` in place (the transformer is already on its device); returns the
    callable to use, which is the transformer itself unless compiled whole."""
    if speedups.attention_backend != "native":
        transformer.set_attention_backend(speedups.attention_backend)
    if speedups.fuse_qkv:
        fuse_qkv_projections(transformer)
    if speedups.fp8:
        from flux_triton.model.fp8 import quantize_blocks

        quantize_blocks(transformer)
    if speedups.compile == "regional":
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    elif speedups.compile == "full":
        return torch.compile(transformer, fullgraph=True)
    return transformer
