"""Step caches across a denoising loop, as diffusers ships them (``diffusers.hooks``): their configs, and the
plain form (a small JSON object) in which a client names one to the server and the server's settings name one.

One table (``CACHE_KINDS``) lists the kinds this project serves, with its defaults: the configs diffusers
documents for FLUX.1 (MagCache with FLUX's calibrated ratios).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheKind:
    config: Callable[[], type]  # the diffusers config class (imported when used)
    defaults: Mapping[str, object]
    # Whether steps of generations in lockstep may share one forward: the kind's decisions depend on its step count
    # alone (not on the batch's data) and its state holds only per-row tensors besides that count.
    merges: bool = False


def _first_block():
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig


def _mag():
    from diffusers.hooks import MagCacheConfig

    return MagCacheConfig


def _taylorseer():
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig


CACHE_KINDS: dict[str, CacheKind] = {
    "first_block": CacheKind(_first_block, {"threshold": 0.12}),
    "mag": CacheKind(_mag, {"threshold": 0.06, "num_inference_steps": 28, "mag_ratios": "flux"}, merges=True),
    "taylorseer": CacheKind(_taylorseer, {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1}),
}
NO_CACHE = "none"


def _flux_mag_ratios() -> torch.Tensor:
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return FLUX_MAG_RATIOS


def _plain(name: str, value):
    """A config field as JSON: tensors only as FLUX's calibrated MagCache ratios, dtypes by name."""
    if isinstance(value, torch.Tensor):
        if name == "mag_ratios" and torch.equal(value, _flux_mag_ratios()):
            return "flux"
        raise ValueError(f"cache {name}: only FLUX's calibrated ratios (diffusers' FLUX_MAG_RATIOS) can be served")
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"cache {name}: {type(value).__name__} values cannot be sent to a server")


def describe_cache(config) -> dict:
    """A diffusers cache config as ``{"kind": ..., field: value, ...}``."""
    for kind, entry in CACHE_KINDS.items():
        if type(config) is entry.config():
            fields = {f.name: _plain(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)}
            return {"kind": kind, **fields}
    raise ValueError(f"cache: {type(config).__name__} is not served; kinds: {', '.join(CACHE_KINDS)}")


def cache_merges(config) -> bool:
    """Whether steps cached with ``config`` (``None``: none) in lockstep may share a forward (``CacheKind.merges``)."""
    return config is not None and CACHE_KINDS[describe_cache(config)["kind"]].merges


def build_cache(spec: Mapping):
    """The diffusers config a plain ``spec`` names (the kind's defaults filled in); ``None`` for no cache.
    Raises ``ValueError`` naming an unknown kind or field."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind in (None, NO_CACHE):
        return None
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind {kind!r} is not served; expected one of {', '.join([NO_CACHE, *CACHE_KINDS])}")
    entry = CACHE_KINDS[kind]
    config_class = entry.config()
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"cache {kind}: unknown parameter {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
    values = {**entry.defaults, **spec}
    if values.get("mag_ratios") == "flux":
        values["mag_ratios"] = _flux_mag_ratios()
    if isinstance(values.get("taylor_factors_dtype"), str):
        values["taylor_factors_dtype"] = getattr(torch, values["taylor_factors_dtype"])
    return config_class(**values)


def parse_cache_setting(text: str):
    """A model setting: ``none``, a kind (its defaults), or a JSON object ``{"kind": ..., ...}``."""
    text = text.strip()
    return build_cache(json.loads(text) if text.startswith("{") else {"kind": text})
