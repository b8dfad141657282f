"""What the served-generation benchmarks share: a scratch folder, the model root (the random full-size model saved
there unless ``$FLUX_MODEL_ROOT`` has it, or the tiny models for a CPU smoke run), its static FP8 scales, and a
random prompt's embeddings sized to the model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.presets import RANDOM_MODEL, random_model_root


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
