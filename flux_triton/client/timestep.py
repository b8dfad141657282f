"""The raw scheduler timestep behind the scaled one that ``FluxPipeline`` hands its transformer.

The pipeline calls the transformer with ``t.expand(B).to(latents.dtype) / 1000``; the server
wants the raw fp32 timestep and computes ``raw.to(model_dtype) / 1000`` itself. ``raw_timestep``
finds, per sample, an fp32 value whose server-side scaling gives back the pipeline's value
bit for bit, and fails loudly when there is none.
"""

from __future__ import annotations

import torch

from flux_triton.contract import TIMESTEP_RANGE

_MAX_ULPS = 8  # neighbours tried on each side of the first guess


class TimestepError(ValueError):
    """A scaled timestep that no raw fp32 timestep reproduces."""


def server_scaling(raw: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """What the server does with the raw fp32 timestep (``FluxPipeline``'s own arithmetic)."""
    return raw.to(model_dtype) / 1000


def _recover_one(target: torch.Tensor, model_dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """One 0-dim fp32 raw timestep for the 0-dim ``target`` (in ``model_dtype``)."""
    low, high = TIMESTEP_RANGE
    guess = (target.double() * 1000).clamp(low, high).to(model_dtype)
    up, down = torch.tensor(high, dtype=model_dtype), torch.tensor(low, dtype=model_dtype)
    candidates = [guess]
    above, below = guess, guess
    for _ in range(_MAX_ULPS):
        above, below = torch.nextafter(above, up), torch.nextafter(below, down)
        candidates += [above, below]
    best, best_error = None, None
    for candidate in candidates:
        raw = candidate.float()
        scaled = server_scaling(raw, model_dtype)
        if torch.equal(scaled, target):
            return raw
        error = (scaled.double() - target.double()).abs().item()
        if best_error is None or error < best_error:
            best, best_error = raw, error
    if exact:
        raise TimestepError(
            f"no raw fp32 timestep in [{low:g}, {high:g}] gives the scaled timestep {target.item()!r} "
            f"({model_dtype}) through raw.to({model_dtype}) / 1000; was it made by FluxPipeline (t / 1000)?"
        )
    return best


def raw_timestep(scaled: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """The raw timesteps ``[B, 1]`` (fp32, CPU) for the pipeline's scaled timesteps ``[B]``.

    When ``scaled`` already has the server's ``model_dtype`` the result reproduces it exactly
    (``server_scaling(raw, model_dtype) == scaled``) or this raises ``TimestepError``. When the
    pipeline runs in another dtype than the server (say fp32 against a BF16 server), exactness is
    not defined; the raw value whose scaling is nearest to ``scaled`` in the server's dtype is used.
    """
    scaled = scaled.detach().cpu().reshape(-1)
    exact = scaled.dtype == model_dtype
    if not torch.isfinite(scaled).all():
        raise TimestepError(f"timestep contains NaN or Inf: {scaled.tolist()}")
    target = scaled.to(model_dtype)
    found: dict[float, torch.Tensor] = {}
    rows = []
    for value in target:  # usually one distinct value for the whole batch
        key = value.item()
        if key not in found:
            found[key] = _recover_one(value, model_dtype, exact)
        rows.append(found[key])
    return torch.stack(rows).reshape(-1, 1)
