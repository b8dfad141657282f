"""What the served-generation benchmarks share: a scratch folder, the model root (the random full-size model saved
there unless ``$FLUX_MODEL_ROOT`` has it, or the tiny models for a CPU smoke run), its static FP8 scales, and a
random prompt's embeddings sized to the model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.presets import FLUX_DEV_CONFIG, RANDOM_MODEL, random_model_root

# The CPU benchmarks' model: FLUX.1-dev's inputs, outputs and block counts, each block 2 heads of 16, so that the
# wire and Triton's copies are full-size and the compute is small.
THIN_BLOCKS = {**FLUX_DEV_CONFIG, "attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 4, 8]}


def save_thin(root: Path, name: str, config: dict) -> None:
    """A random-weight ``FluxTransformer2DModel`` of ``config`` saved under ``root`` as ``name`` (seed 0)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**config).eval().save_pretrained(root / name, safe_serialization=True)


def prepare(args, prefix: str, seed: int) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """``(scratch folder, model root, prompt)`` for ``args.model``, ``args.fp8_scales`` and ``args.text_tokens``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    models = random_model_root(work)[0] if args.model == RANDOM_MODEL else Locations.here().model_root
    if args.fp8_scales:
        from served_step import ensure_scales

        ensure_scales(models, args.fp8_scales)
    config, generator = (
        store.read_config(store.resolve_model_dir(args.model, models)),
        torch.Generator().manual_seed(seed),
    )
    prompt = {"prompt_embeds": torch.randn(1, args.text_tokens, config["joint_attention_dim"], generator=generator),
              "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], generator=generator)}  # fmt: skip
    return work, models, prompt
