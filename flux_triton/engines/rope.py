"""Export-safe rotary embedding for FLUX (``use_real=True``, interleaved pairs, ``sequence_dim=1``).

diffusers' ``apply_rotary_emb`` reshapes with ``x.reshape(*x.shape[:-1], -1, 2)``; after the
attention's ``unflatten`` the TorchScript tracer records those sizes as constants, so the exported
graph only runs at the traced batch and token counts. Strided slices give the same pairs without
a reshape; the arithmetic is diffusers' own (fp32 math, cast back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def apply_rotary_emb(x: torch.Tensor, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1,
                     sequence_dim: int = 2) -> torch.Tensor:  # fmt: skip
    if not use_real or use_real_unbind_dim != -1 or sequence_dim != 1:
        raise NotImplementedError("only FLUX's rotary embedding (use_real, unbind -1, sequence_dim 1) is exportable")
    cos, sin = freqs_cis
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x[..., 0::2], x[..., 1::2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def exportable_rope() -> Iterator[None]:
    """Swap FLUX's ``apply_rotary_emb`` for the export-safe one while tracing, then restore it."""
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = apply_rotary_emb
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
