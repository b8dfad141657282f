"""``dit_preprocess``'s core: a public request validated and turned into the engine's inputs, with generation
sessions as ``dit_transformer`` keeps them (``serving.sessions``): a sequence's prompt comes with its first step
and is held here, so ``flux_dit``'s later steps carry only the latents, the timestep and the image ids. Where
``dit_engine`` holds each sequence's prompt too (``engine_holds_prompts``: it runs in one instance), the prompt's
text tensors go on to it only with the steps that carried them; the others pass them on with zero text tokens
(``HELD_BY_ENGINE``), and the 4 MiB of a full-size prompt no longer cross from one model to the other every step.

An ensemble runs every step of it for every request, so a request that only ends a sequence (END with zero image
tokens) frees the sequence here and goes on to the engine as zero-token inputs, which ``dit_engine`` answers empty
without a forward."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from flux_triton.contract import DitSignature, InputError, Limits, Step, validate
from flux_triton.contract.protocol import HELD_BY_ENGINE, STATELESS, SequenceStep
from flux_triton.pipeline.caching import parse_cache_setting
from flux_triton.serving import caching
from flux_triton.serving.sessions import Sessions, closes_only, held_only
from flux_triton.serving.settings import PreprocessSettings


def preprocess(
    tensors: Mapping[str, torch.Tensor], signature: DitSignature, limits: Limits, checked: Collection[str] = ()
) -> dict:
    """Public request -> engine inputs; bad input raises ``contract.InputError`` (``checked``: ``contract.check``'s)."""
    return validate(tensors, signature, limits, checked).engine_tensors(signature)


class Preprocessor:
    """``dit_preprocess`` for one model instance: its settings and its live sequences."""

    def __init__(self, settings: PreprocessSettings):
        self.signature, self.limits = settings.signature, settings.limits
        self.sessions = Sessions(settings.session_settings)
        self.cache = parse_cache_setting(settings.cache)  # the engine's; a START may choose it
        self.engine_holds_prompts = settings.engine_holds_prompts

    def run(self, tensors: Mapping[str, torch.Tensor], sequence: SequenceStep = STATELESS) -> dict:
        """One request -> the engine's inputs; a step of a sequence (non-zero id) gets its held prompt. Bad input
        raises ``contract.InputError`` (and frees the sequence, if the request is its owner's)."""
        if not sequence.sequence_id:
            return preprocess(tensors, self.signature, self.limits)
        try:
            if closes_only(tensors, sequence):
                self.sessions.close(sequence)
                return Step.closing(self.signature).engine_tensors(self.signature)
            cached = sequence.start and caching.chosen(sequence.cache, self.cache)
            held = self.sessions.step_tensors(sequence, tensors, cached)
            engine = preprocess(held, self.signature, self.limits, checked=held_only(tensors))
        except InputError:
            self.sessions.finish(sequence, failed=True)
            raise
        self.sessions.finish(sequence, failed=False)
        if self.engine_holds_prompts and not any(name in tensors for name in HELD_BY_ENGINE):
            engine |= {name: engine[name][:, :0] for name in HELD_BY_ENGINE}  # dit_engine fills in its own
        return engine
