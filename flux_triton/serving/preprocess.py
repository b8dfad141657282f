"""``dit_preprocess``'s core: a public request validated and turned into the engine's inputs, with generation
sessions as ``dit_transformer`` keeps them (``serving.sessions``): a sequence's prompt comes with its first step
and is held here, so ``flux_dit``'s later steps carry only the latents, the timestep and the image ids.

An ensemble runs every step of it for every request, so a request that only ends a sequence (END with zero image
tokens) cannot be answered without a forward: ``flux_dit``'s clients do not send one. A sequence ends when its id
STARTs again (the next generation of the same client reuses it) or once idle (``session_idle_s``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from flux_triton.contract import DitSignature, InputError, Limits, validate
from flux_triton.serving.sessions import Sessions, SessionSettings, closes_only


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


class Preprocessor:
    """``dit_preprocess`` for one model instance: its settings and its live sequences."""

    def __init__(self, parameters: Mapping[str, str]):
        self.signature, self.limits = preprocess_settings(parameters)
        defaults = SessionSettings()
        self.sessions = Sessions(SessionSettings(
            int(parameters.get("max_sessions", defaults.max_sessions)),
            float(parameters.get("session_idle_s", defaults.idle_timeout_s)),
        ))  # fmt: skip

    def run(self, tensors: Mapping[str, torch.Tensor], sequence_id: int | str = 0, flags: int = 0) -> dict:
        """One request -> the engine's inputs; a step of a sequence (non-zero ``sequence_id``) gets its held
        prompt. Bad input raises ``contract.InputError`` (and frees the sequence)."""
        if not sequence_id:
            return preprocess(tensors, self.signature, self.limits)
        try:
            if closes_only(tensors, flags):
                raise InputError(f"sequence {sequence_id}: flux_dit runs its engine for every request, so it ends "
                                 f"a sequence with its last step or when the id starts again, not with an empty "
                                 f"END request")  # fmt: skip
            engine = preprocess(self.sessions.step_tensors(sequence_id, flags, tensors), self.signature, self.limits)
        except InputError:
            self.sessions.finish(sequence_id, flags, failed=True)
            raise
        self.sessions.finish(sequence_id, flags, failed=False)
        return engine
