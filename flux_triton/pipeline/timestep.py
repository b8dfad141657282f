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


def _recover(targets: torch.Tensor, model_dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """The fp32 raw timesteps for the 1-D ``targets`` (in ``model_dtype``), all at once: for each, the first of the
    first guess and its neighbours (one ulp up, one down, two up, ...) whose scaling gives the target back, else the
    nearest (or ``TimestepError`` when ``exact``)."""
    low, high = TIMESTEP_RANGE
    guess = (targets.double() * 1000).clamp(low, high).to(model_dtype)
    up, down = torch.full_like(guess, high), torch.full_like(guess, low)
    columns, above, below = [guess], guess, guess
    for _ in range(_MAX_ULPS):
        above, below = torch.nextafter(above, up), torch.nextafter(below, down)
        columns += [above, below]
    raw = torch.stack(columns, dim=1).float()  # [targets, candidates], in the order they are tried
    scaled = server_scaling(raw, model_dtype)
    matches = scaled == targets[:, None]
    found = matches.any(dim=1)
    if exact and not found.all():
        missing = targets[~found][0].item()
        raise TimestepError(
            f"no raw fp32 timestep in [{low:g}, {high:g}] gives the scaled timestep {missing!r} "
            f"({model_dtype}) through raw.to({model_dtype}) / 1000; was it made by FluxPipeline (t / 1000)?"
        )
    nearest = (scaled.double() - targets.double()[:, None]).abs().argmin(dim=1)
    choice = torch.where(found, matches.int().argmax(dim=1), nearest)
    return raw[torch.arange(len(targets), device=raw.device), choice]


def raw_timestep(scaled: torch.Tensor, model_dtype: torch.dtype, on_host: bool = True) -> torch.Tensor:
    """The raw timesteps ``[B, 1]`` (fp32) for the pipeline's scaled timesteps ``[B]``: on the host, or with
    ``on_host=False`` where ``scaled`` is.

    When ``scaled`` already has the server's ``model_dtype`` the result reproduces it exactly
    (``server_scaling(raw, model_dtype) == scaled``) or this raises ``TimestepError``. When the
    pipeline runs in another dtype than the server (say fp32 against a BF16 server), exactness is
    not defined; the raw value whose scaling is nearest to ``scaled`` in the server's dtype is used.
    ``on_host=False`` (a pipeline on the GPU that runs the transformer itself) reads nothing back, so the host never
    waits for the GPU: the same values, without the checks (a scaled timestep no raw one gives takes the nearest).
    """
    if not on_host:
        return _recover(scaled.detach().reshape(-1).to(model_dtype), model_dtype, exact=False).reshape(-1, 1)
    scaled = scaled.detach().cpu().reshape(-1)
    exact = scaled.dtype == model_dtype
    if not torch.isfinite(scaled).all():
        raise TimestepError(f"timestep contains NaN or Inf: {scaled.tolist()}")
    distinct, where = torch.unique(scaled.to(model_dtype), return_inverse=True)  # usually one for the batch
    return _recover(distinct, model_dtype, exact)[where].reshape(-1, 1)
