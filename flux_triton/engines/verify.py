"""Measure an exported engine against diffusers: the same pipeline step through both.

The engine's inputs are made by the serving path (request -> validation -> engine tensors), so this
also checks the preprocessing; the reference is diffusers' own call on the eager transformer (RoPE
in float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_triton.contract import DitSignature, validate
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import image_tokens, random_step

# (batch, height, width, text tokens): inside the profiles, non-square included.
DEFAULT_CASES: tuple[tuple[int, int, int, int], ...] = ((1, 256, 256, 8), (2, 512, 512, 8), (3, 512, 768, 16))


@dataclass(frozen=True)
class Measurement:
    batch: int
    height: int
    width: int
    text_tokens: int
    max_abs: float
    rel: float  # max |engine - diffusers| / max |diffusers|

    def __str__(self) -> str:
        return (
            f"B={self.batch} {self.height}x{self.width} S={self.text_tokens}: "
            f"max abs {self.max_abs:.3g}, rel {self.rel:.3g}"
        )


def cases_within(profile) -> list[tuple[int, int, int, int]]:
    """The default cases that an ``engines.profiles.ProfileConfig`` admits, each batch within its range (a profile
    of one fixed shape gets that shape)."""
    (b_min, _, b_max), (n_min, _, n_max), (s_min, _, s_max) = profile.batch, profile.image_tokens, profile.text_tokens
    found = [(min(max(batch, b_min), b_max), height, width, text) for batch, height, width, text in DEFAULT_CASES
             if n_min <= image_tokens(height, width) <= n_max and s_min <= text <= s_max]  # fmt: skip
    return found or [(b_min, *profile.min_size, s_min)]


def measure(engine, transformer, signature: DitSignature, cases=DEFAULT_CASES, seed: int = 0) -> list[Measurement]:
    results = []
    for batch, height, width, text in cases:
        step = random_step(signature, batch, height, width, text, timestep=731.5, seed=seed)
        expected = reference_call(transformer, step).float()
        served = engine(validate(step.wire(), signature).engine_tensors(signature)).float()
        if served.shape != expected.shape:
            raise AssertionError(f"engine output {list(served.shape)} != diffusers {list(expected.shape)}")
        max_abs = (served - expected).abs().max().item()
        results.append(Measurement(batch, height, width, text, max_abs, max_abs / expected.abs().max().item()))
    return results
