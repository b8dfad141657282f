"""Ahead-of-time GPU engines: torch.export + AOTInductor packages with dynamic batch and
image-token ranges (like a TensorRT profile), loaded in seconds with no JIT compile at start."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class EngineModule(nn.Module):
    """The engine signature: every input batched (ids as [B, ., 3], one row used), the timestep
    already scaled by the preprocessor (model dtype, ``t / 1000``)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(
        self, hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids, guidance=None
    ):
        return self.transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids[0],
            img_ids=img_ids[0],
            return_dict=False,
        )[0]


@dataclass(frozen=True)
class AotiProfile:
    min_batch: int = 1
    max_batch: int = 8
    min_image_tokens: int = 256  # 256x256 px
    max_image_tokens: int = 7056  # 1344x1344 px
    text_tokens: int = 512


def example_inputs(transformer, profile: AotiProfile, batch: int = 2, image_tokens: int = 1024) -> dict:
    config, dtype, device = transformer.config, transformer.dtype, transformer.device
    inputs = dict(
        hidden_states=torch.randn(batch, image_tokens, config.in_channels, dtype=dtype, device=device),
        timestep=torch.full((batch,), 0.5, dtype=dtype, device=device),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, dtype=dtype, device=device),
        encoder_hidden_states=torch.randn(
            batch, profile.text_tokens, config.joint_attention_dim, dtype=dtype, device=device
        ),
        txt_ids=torch.zeros(batch, profile.text_tokens, 3, device=device),
        img_ids=torch.zeros(batch, image_tokens, 3, device=device),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device)
    return inputs


def dynamic_shapes(inputs: dict, profile: AotiProfile) -> dict:
    batch = torch.export.Dim("batch", min=profile.min_batch, max=profile.max_batch)
    tokens = torch.export.Dim("image_tokens", min=profile.min_image_tokens, max=profile.max_image_tokens)
    shapes = dict(
        hidden_states={0: batch, 1: tokens},
        timestep={0: batch},
        pooled_projections={0: batch},
        encoder_hidden_states={0: batch},
        txt_ids={0: batch},
        img_ids={0: batch, 1: tokens},
    )
    if "guidance" in inputs:
        shapes["guidance"] = {0: batch}
    return shapes


def build(transformer, package_path: Path, profile: AotiProfile = AotiProfile()) -> dict:
    """Export and AOT-compile ``transformer`` (already on its GPU, speed-ups applied) to a .pt2."""
    module = EngineModule(transformer).eval()
    inputs = example_inputs(transformer, profile)
    started = time.perf_counter()
    with torch.inference_mode():
        exported = torch.export.export(module, (), inputs, dynamic_shapes=dynamic_shapes(inputs, profile), strict=False)
    export_s = time.perf_counter() - started
    # The package holds code only: the weights stay in the model's safetensors and are handed
    # to the engine at load time, so neither disk nor GPU memory holds a second copy.
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(package_path), inductor_configs={"aot_inductor.package_constants_in_so": False}
    )
    return {"package": path, "export_s": export_s, "compile_s": time.perf_counter() - started - export_s}


def load(package_path: Path, transformer: nn.Module):
    """The compiled engine bound to ``transformer``'s weights (shared, not copied): call it with
    the engine inputs as keyword arguments."""
    engine = torch._inductor.aoti_load_package(str(package_path))
    module = EngineModule(transformer)
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    wanted = engine.get_constant_fqns()
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"engine {package_path} needs weights the model lacks: {missing[:5]}")
    engine.load_constants({name: tensors[name] for name in wanted}, check_full_update=True, user_managed=True)
    return engine
