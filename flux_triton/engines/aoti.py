"""Ahead-of-time compiled GPU engines: each repeated FLUX block compiled once with torch.export +
AOTInductor, with dynamic batch and image-token ranges (like a TensorRT profile).

The engine holds code only: one package per block kind (19 double-stream blocks share one, 38
single-stream blocks the other), compiled with the block's weights as inputs. At load each kind's
package is loaded once and every block calls it with its own weights (the loaded model's tensors,
not copies), so the server is ready in seconds with no JIT compile, and GPU memory holds the
weights once. The embedders and the final norm (a few small ops) stay eager.

Kernels compiled over dynamic ranges run a few percent slower on a GPU than kernels compiled for one shape, so a
build may add a second package per kind for the profile's opt shape alone (its batch and image tokens; like
TensorRT's opt-shape tactics): a step of that shape runs it, any other the dynamic one."""

from __future__ import annotations

import functools
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from flux_triton.pipeline.internals import cpp_compiler

BLOCK_KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


@dataclass(frozen=True)
class AotiProfile:
    """The compiled ranges: dynamic batch and image tokens, text tokens fixed per build."""

    min_batch: int
    max_batch: int
    min_image_tokens: int
    max_image_tokens: int
    text_tokens: int  # fixed per build, as FluxPipeline pads T5 to max_sequence_length

    @classmethod
    def from_profile(cls, profile) -> AotiProfile:
        """From an ``engines.profiles.ProfileConfig`` (the one source of profile numbers): its batch
        and image-token min/max, its opt text length."""
        batch, tokens, text = profile.batch, profile.image_tokens, profile.text_tokens
        return cls(batch[0], batch[2], tokens[0], tokens[2], text[1])

    @classmethod
    def preset(cls, name: str = "default") -> AotiProfile:
        from flux_triton.engines.profiles import PROFILE_PRESETS

        return cls.from_profile(PROFILE_PRESETS[name])


@functools.cache
def links_libstdcxx_dynamically(compiler: str) -> bool:
    """Whether ``compiler`` links a shared library against the shared libstdc++ (a tiny one is built
    and its NEEDED entries read, as inductor builds the packages' wrappers); once per compiler."""
    with tempfile.TemporaryDirectory() as folder:
        source, library = Path(folder) / "probe.cpp", Path(folder) / "probe.so"
        source.write_text("#include <string>\nstd::string probe() { return std::to_string(1); }\n")
        try:
            build = [compiler, "-shared", "-fPIC", str(source), "-o", str(library)]
            subprocess.run(build, check=True, capture_output=True, text=True)
            dynamic = subprocess.run(["readelf", "-d", str(library)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or error
            raise RuntimeError(f"AOTInductor needs a C++ compiler and binutils: {compiler}: {detail}") from error
    return "libstdc++.so" in dynamic.stdout


def check_compiler_runtime() -> None:
    """Fail before compiling where the packages could not be loaded: a wrapper with its own static copy
    of libstdc++ indexes the process's std::locale facets with its own ids and crashes at load."""
    compiler = cpp_compiler()
    if not links_libstdcxx_dynamically(compiler):
        raise RuntimeError(
            f"{compiler} links libstdc++ statically into shared libraries, so the AOTInductor packages it "
            "builds would crash when loaded next to the process's own libstdc++. Point CXX at a compiler "
            "that links it dynamically (e.g. CXX=/usr/bin/g++) and build again"
        )


def block_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(block.named_parameters()), **dict(block.named_buffers())}


class FunctionalBlock(nn.Module):
    """A block as a pure function of its weights and tensor inputs (RoPE as two tensors)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: its weights are inputs, not constants
        self.names = tuple(block_weights(block))

    def forward(self, weights, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin):
        inputs = dict(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=(rope_cos, rope_sin),
        )
        return torch.func.functional_call(self.block, dict(zip(self.names, weights, strict=True)), (), inputs)


def _example(transformer, profile: AotiProfile, batch: int = 2, image_tokens: int = 1024) -> tuple:
    """Example inputs inside the profile (a dynamic dimension's example above 1: export specializes 0 and 1)."""
    batch = min(max(batch, profile.min_batch), profile.max_batch)
    image_tokens = min(max(image_tokens, profile.min_image_tokens), profile.max_image_tokens)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    head_dim = transformer.config.attention_head_dim
    dtype, device = transformer.dtype, transformer.device
    tokens = image_tokens + profile.text_tokens
    return (
        torch.randn(batch, image_tokens, dim, dtype=dtype, device=device),
        torch.randn(batch, profile.text_tokens, dim, dtype=dtype, device=device),
        torch.randn(batch, dim, dtype=dtype, device=device),
        torch.randn(tokens, head_dim, device=device),
        torch.randn(tokens, head_dim, device=device),
    )


def _dim(name: str, low: int, high: int):
    """A dynamic dimension over ``[low, high]``, or ``None`` (static) where the profile fixes it (``Dim`` refuses
    an empty range)."""
    return None if low == high else torch.export.Dim(name, min=low, max=high)


def _dynamic_shapes(profile: AotiProfile, weight_count: int) -> tuple:
    batch = _dim("batch", profile.min_batch, profile.max_batch)
    image = _dim("image_tokens", profile.min_image_tokens, profile.max_image_tokens)
    rope = {0: None if image is None else image + profile.text_tokens}
    return ((None,) * weight_count, {0: batch, 1: image}, {0: batch}, {0: batch}, rope, rope)


def export_block(transformer, kind: str, profile: AotiProfile):
    """The first block of ``kind`` exported over the profile's ranges (what ``build`` compiles)."""
    block = getattr(transformer, BLOCK_KINDS[kind])[0]
    weights = tuple(block_weights(block).values())
    with torch.inference_mode():
        return torch.export.export(
            FunctionalBlock(block),
            (weights, *_example(transformer, profile)),
            dynamic_shapes=_dynamic_shapes(profile, len(weights)),
            strict=False,
        )


def build(transformer, engine_dir: Path, profile: AotiProfile | None = None,
          opt_shape: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """Compile one package per block kind of ``transformer`` (on its device, speed-ups such as FP8
    already applied) into ``engine_dir``, and with ``opt_shape`` (batch, image tokens inside the profile) one more
    per kind for that shape alone; returns the build record."""
    profile = profile or AotiProfile.preset()
    check_compiler_runtime()
    detach(transformer)  # compile the blocks' own forward, not an attached package
    engine_dir.mkdir(parents=True, exist_ok=True)
    record = {"profile": asdict(profile), "packages": {}, "compile_s": {}}
    compiled = [(kind, kind, profile) for kind in BLOCK_KINDS]
    if opt_shape is not None:
        batch, tokens = opt_shape
        fixed = AotiProfile(batch, batch, tokens, tokens, profile.text_tokens)
        if fixed != profile:  # a profile of one shape is its own opt shape
            compiled += [(opt_package(kind), kind, fixed) for kind in BLOCK_KINDS]
            record["opt_shape"] = [batch, tokens]
    for name, kind, shapes in compiled:
        started = time.perf_counter()
        exported = export_block(transformer, kind, shapes)
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(engine_dir / f"{name}.pt2"))
        record["packages"][name] = Path(path).name
        record["compile_s"][name] = time.perf_counter() - started
    return record


class CompiledBlock:
    """Stands in for a block's forward: its kind's compiled function with this block's weights (the opt shape's
    package for a step of that batch and image tokens, where there is one)."""

    def __init__(self, runner, weights: tuple[torch.Tensor, ...], opt_runner=None, opt_shape: tuple = ()):
        self.runner, self.weights, self.opt_runner, self.opt_shape = runner, weights, opt_runner, tuple(opt_shape)

    def __call__(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        if joint_attention_kwargs:
            raise ValueError("the AOTI engine does not take joint_attention_kwargs")
        cos, sin = image_rotary_emb
        opt = self.opt_runner is not None and tuple(hidden_states.shape[:2]) == self.opt_shape
        runner = self.opt_runner if opt else self.runner
        return tuple(runner(self.weights, hidden_states, encoder_hidden_states, temb, cos, sin))


def opt_package(kind: str) -> str:
    """The packages' key of a block kind's opt-shape package."""
    return f"{kind}-opt"


def attach(transformer, engine_dir: Path, packages: dict[str, str], opt_shape: tuple[int, int] | None = None) -> None:
    """Route every block's forward through its kind's compiled package (loaded once per kind), and a step of
    ``opt_shape`` (batch, image tokens) through the kind's opt-shape package where ``packages`` has one."""
    device_index = transformer.device.index if transformer.device.type == "cuda" else -1

    def load(file: str):
        # single-threaded: without the runner's own stream synchronization, which a CUDA graph capture refuses
        # (an instance runs one forward at a time)
        return torch._inductor.aoti_load_package(str(engine_dir / file), run_single_threaded=True,
                                                 device_index=device_index or 0)  # fmt: skip

    for kind, attribute in BLOCK_KINDS.items():
        runner = load(packages[kind])
        opt_runner = load(packages[opt_package(kind)]) if opt_shape and opt_package(kind) in packages else None
        for block in getattr(transformer, attribute):
            block.forward = CompiledBlock(runner, tuple(block_weights(block).values()), opt_runner, opt_shape or ())


def detach(transformer) -> None:
    """Give every block its own forward back (undo ``attach``)."""
    for attribute in BLOCK_KINDS.values():
        for block in getattr(transformer, attribute):
            block.__dict__.pop("forward", None)
