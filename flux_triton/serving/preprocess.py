"""``dit_preprocess``'s core: a public request validated and turned into the engine's inputs, with generation
sessions as ``dit_transformer`` keeps them (``serving.sessions``): a sequence's prompt comes with its first step
and is held here, so ``flux_dit``'s later steps carry only the latents, the timestep and the image ids.

An ensemble runs every step of it for every request, so a request that only ends a sequence (END with zero image
tokens) frees the sequence here and goes on to the engine as zero-token inputs, which ``dit_engine`` answers empty
without a forward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch

from flux_triton.contract import DitSignature, InputError, Limits, Step, validate
from flux_triton.contract.protocol import STATELESS, SequenceStep, SessionSettings
from flux_triton.serving.sessions import Sessions, closes_only


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
            int(parameters.get("max_sessions_per_client", defaults.max_per_client)),
            float(parameters.get("session_idle_s", defaults.idle_timeout_s)),
        ))  # fmt: skip

    def run(self, tensors: Mapping[str, torch.Tensor], sequence: SequenceStep = STATELESS) -> dict:
        """One request -> the engine's inputs; a step of a sequence (non-zero id) gets its held prompt. Bad input
        raises ``contract.InputError`` (and frees the sequence, if the request is its owner's)."""
        if not sequence.sequence_id:
            return preprocess(tensors, self.signature, self.limits)
        try:
            if closes_only(tensors, sequence):
                self.sessions.close(sequence)
                return Step.closing(self.signature).engine_tensors(self.signature)
            engine = preprocess(self.sessions.step_tensors(sequence, tensors), self.signature, self.limits)
        except InputError:
            self.sessions.finish(sequence, failed=True)
            raise
        self.sessions.finish(sequence, failed=False)
        return engine
