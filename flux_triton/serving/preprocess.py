"""``dit_preprocess``'s core: a public request validated and turned into the engine's inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from flux_triton.contract import DitSignature, Limits, validate


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
    """Public request -> engine inputs; bad input raises ``contract.InputError``."""
    return validate(tensors, signature, limits).engine_tensors(signature)
