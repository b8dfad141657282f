"""GPU speed-ups for an eager FluxTransformer2DModel, each one switchable by name.

``dit_transformer`` takes them from its config parameters; the benchmark combines them into
paths. None changes the function computed except ``fp8`` (lossy, reported by the benchmark)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flux_triton.model import store
from flux_triton.pipeline.internals import hooked_forward, repeated_blocks


@dataclass(frozen=True)
class Speedups:
    attention_backend: str = "native"  # diffusers backend name (_native_cudnn, ...), or fp8_cudnn (model.fp8_attention)
    fuse_qkv: bool = False  # one QKV GEMM per attention; the unfused weights are freed
    fp8: bool = False  # e4m3 block linears (model.fp8), Hopper and newer
    fp8_scales: str = ""  # "": per-token activation scales; else a file of static ones (model.fp8_scales)
    fp8_fast_accum: bool = False  # FP8 GEMMs with Hopper's fast (reduced-precision) accumulation
    compile: str = "none"  # none | regional (each repeated block compiled once) | full
    cuda_graphs: bool = False  # each step shape captured and replayed (model.graphs; with a cache, each block)

    def __post_init__(self):
        if self.compile not in ("none", "regional", "full"):
            raise ValueError(f"compile: expected none, regional or full, got {self.compile!r}")
        if self.fp8_scales and not self.fp8:
            raise ValueError(f"fp8_scales {self.fp8_scales!r}: static activation scales are for fp8 true")
        if self.fp8_fast_accum and not self.fp8:
            raise ValueError("fp8_fast_accum true: fast accumulation is for fp8 true")

    def parameters(self) -> dict[str, str]:
        """The model config parameters that ``parse`` reads back as these speed-ups."""
        return {name: str(value).lower() if isinstance(value, bool) else value for name, value in asdict(self).items()}


def flag(value) -> bool:
    """A config parameter's truth: ``1``, ``true``, ``yes`` or ``on``, in any case."""
    return str(value).lower() in ("1", "true", "yes", "on")


def fuse_qkv_projections(transformer) -> None:
    """diffusers' fuse_qkv_projections, then drop the unfused q/k/v weights it keeps."""
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if hasattr(module, name):
                    delattr(module, name)
    torch.cuda.empty_cache()


def check_composition(speedups: Speedups, cached: bool, parallel=None) -> None:
    """Refuse speed-ups, a step cache (``cached``) and context ``parallel``-ism that cannot run together, naming
    both settings (the one place these rules live; ``dit_transformer``'s settings check them at load)."""
    if cached and speedups.compile == "full":
        raise ValueError("cache and compile full: a whole-model graph cannot hold a step cache's per-step "
                         "decisions; use compile regional with a cache")  # fmt: skip
    if parallel is not None and parallel.enabled:
        parallel.check_attention(speedups.attention_backend)


def apply_speedups(transformer, speedups: Speedups, cache=None, parallel=None, fp8_scales=None):
    """Apply ``speedups``, diffusers' step ``cache`` (a config, or ``None``) and context ``parallel``-ism (a
    ``model.parallel.ParallelSettings``, its process group joined) in place, FP8 with the static activation scales
    ``fp8_scales`` (``model.fp8_scales.load_scales``) if given (the transformer is already on its
    device); returns the callable to use, which is the transformer itself unless compiled whole or graphed."""
    check_composition(speedups, cache is not None, parallel)
    if speedups.attention_backend == "fp8_cudnn":  # not a diffusers backend: our processor around cuDNN's FP8 SDPA
        from flux_triton.model.fp8_attention_processor import use_fp8_attention

        use_fp8_attention(transformer, context_parallel=parallel is not None and parallel.enabled)
    elif speedups.attention_backend != "native":
        transformer.set_attention_backend(speedups.attention_backend)
    if speedups.fuse_qkv:
        fuse_qkv_projections(transformer)
    if speedups.fp8:
        from flux_triton.model.fp8 import quantize_blocks

        quantize_blocks(transformer, fp8_scales, speedups.fp8_fast_accum)
    if parallel is not None and parallel.enabled:
        from flux_triton.model.parallel import enable_context_parallel

        enable_context_parallel(transformer, parallel)
    if cache is not None:
        transformer.enable_cache(cache)
        if parallel is not None and parallel.enabled:
            from flux_triton.model.parallel import agree_cache_decisions

            agree_cache_decisions(transformer)
    call = transformer
    if speedups.compile == "regional":
        compile_regions(transformer)
    elif speedups.compile == "full":
        call = torch.compile(transformer, fullgraph=True)
    if speedups.cuda_graphs and cache is not None:
        from flux_triton.model.graphs import graph_cached_regions

        graph_cached_regions(transformer, transformer.device)
    elif speedups.cuda_graphs:
        from flux_triton.model.graphs import with_cuda_graphs

        call = with_cuda_graphs(call, transformer.device)
    if cache is not None and parallel is not None and parallel.enabled:
        from flux_triton.model.parallel import count_cache_decisions

        count_cache_decisions(transformer)  # last: around the compiled and graphed forwards
    return call


def load_with_speedups(
    model_dir, dtype: torch.dtype, device: torch.device, speedups: Speedups, cache=None, parallel=None
):
    """The served transformer: its weights read from ``model_dir`` onto ``device``, then ``apply_speedups``
    (every context-parallel rank builds its model this way), with the static FP8 scales in ``model_dir``'s file
    ``speedups.fp8_scales`` if named."""
    transformer = store.load_transformer(model_dir, dtype, device)
    scales = None
    if speedups.fp8_scales:
        from flux_triton.model.fp8_scales import load_scales

        scales = load_scales(store.inside(Path(model_dir), speedups.fp8_scales), transformer)
    return apply_speedups(transformer, speedups, cache, parallel, scales)


def compile_regions(transformer) -> None:
    """diffusers' regional compile (each repeated block compiled once, whole), also under step-cache hooks.

    A cache hook's decision runs under ``torch.compiler.disable``, which a full-graph compile refuses and a
    graph-breaking one turns into an eager call of everything the hook wraps. So the forward each hook wraps is
    compiled whole and the hook runs eagerly around it; a block containing a hooked module (TaylorSeer hooks
    the attention modules) is compiled with graph breaks at those modules."""
    options = {"fullgraph": True, "dynamic": True}
    hooked = set()
    for module in transformer.modules():
        reference = hooked_forward(module)
        if reference is not None:
            reference.original_forward = torch.compile(reference.original_forward, **options)
            hooked.add(module)
    for block in transformer.modules():
        if type(block).__name__ in repeated_blocks(transformer) and block not in hooked:
            block.compile(**{**options, "fullgraph": not any(inner in hooked for inner in block.modules())})
