"""The serving core of ``dit_preprocess`` and ``dit_engine`` on torch tensors; the Triton glue in
``model_repository/<name>/1/model.py`` only converts tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.engine_io import engine_tensors
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


def _group_key(tensors: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in sorted(tensors.items()))


def _same_ids(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name][0], b[name][0]) for name in ("txt_ids", "img_ids"))


def run_batched(
    engine: Callable[[dict[str, torch.Tensor]], torch.Tensor], requests: Sequence[Mapping[str, torch.Tensor]]
) -> list[torch.Tensor | Exception]:
    """Concatenate requests of equal shapes and ids along the batch dim (Triton's dynamic batcher
    only lists them), run each group once and split the result back, in order."""
    groups: list[list[int]] = []
    for index, tensors in enumerate(requests):
        for group in groups:
            first = requests[group[0]]
            if _group_key(first) == _group_key(tensors) and _same_ids(first, tensors):
                group.append(index)
                break
        else:
            groups.append([index])
    results: list[torch.Tensor | Exception] = [None] * len(requests)  # type: ignore[list-item]
    for group in groups:
        names = requests[group[0]].keys()
        merged = {name: torch.cat([requests[i][name] for i in group]) for name in names}
        try:
            output = engine(merged)
        except Exception as exc:
            for i in group:
                results[i] = exc
            continue
        sizes = [requests[i]["hidden_states"].shape[0] for i in group]
        for i, part in zip(group, output.split(sizes), strict=True):
            results[i] = part
    return results


def engine_path(parameter: str, repository_dir: Path) -> Path:
    from flux_triton.repository_check import resolve_engine

    return resolve_engine(parameter, repository_dir)
