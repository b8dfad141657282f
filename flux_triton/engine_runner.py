"""The serving core of ``dit_preprocess`` and ``dit_engine`` on torch tensors; the Triton glue in
``model_repository/<name>/1/model.py`` only converts tensors."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.engine_io import engine_tensors
from flux_triton.runner import Merging, run_merged
from flux_triton.validation import Limits, validate


def preprocess_settings(parameters: Mapping[str, str]) -> tuple[DitSignature, Limits]:
    """``dit_preprocess``'s config parameters (generated from the engine's sidecar)."""
    signature = DitSignature(
        in_channels=int(parameters["in_channels"]),
        pooled_dim=int(parameters["pooled_dim"]),
        text_dim=int(parameters["text_dim"]),
        guidance_embeds=bool(int(parameters["guidance_embeds"])),
        dtype=parameters["dtype"],
    )
    limits = Limits(**{f.name: int(parameters[f.name]) for f in fields(Limits)})
    return signature, limits


def preprocess(tensors: Mapping[str, torch.Tensor], signature: DitSignature, limits: Limits) -> dict:
    """Public request -> engine inputs; bad input raises ``validation.InputError``."""
    return engine_tensors(validate(tensors, signature, limits), signature)


def _mergeable(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    same_shapes = all(a[name].shape[1:] == b[name].shape[1:] and a[name].dtype == b[name].dtype for name in a)
    return a.keys() == b.keys() and same_shapes and all(torch.equal(a[n][0], b[n][0]) for n in ("txt_ids", "img_ids"))


ENGINE_MERGING = Merging(
    mergeable=_mergeable,
    merge=lambda requests: {name: torch.cat([r[name] for r in requests]) for name in requests[0]},
    batch_size=lambda tensors: tensors["hidden_states"].shape[0],
)


def run_batched(
    engine: Callable[[dict[str, torch.Tensor]], torch.Tensor], requests: Sequence[Mapping[str, torch.Tensor]]
) -> list[torch.Tensor | Exception]:
    """Concatenate requests of equal shapes and ids along the batch dim (Triton's dynamic batcher
    only lists them, up to the engine's max_batch_size), run each group once, split back in order."""
    return run_merged(engine, requests, max_batch=sys.maxsize, merging=ENGINE_MERGING)


def engine_path(parameter: str, repository_dir: Path) -> Path:
    from flux_triton.repository_check import resolve_engine

    return resolve_engine(parameter, repository_dir)
