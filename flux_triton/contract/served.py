"""The contract as a served model's Triton config states it: its signature and whether it keeps generation sessions,
read alike by a client of the model and by the server's own probes. Whether a model has guidance embeddings no
config can say (``guidance`` is optional for every model): a client asks the model (``protocol.GUIDANCE_REQUIRED``)."""

from __future__ import annotations

from collections.abc import Mapping

from flux_triton.contract.specs import INPUT_BY_NAME, OUTPUT_NAME
from flux_triton.contract.tensors import TRITON_TO_TORCH, DitSignature


class ServedConfigError(ValueError):
    """A served model's config is not a FLUX DiT's of this contract; the message names the model."""


def _dims(config: Mapping, name: str) -> list[int]:
    for entry in config.get("input", []) + config.get("output", []):
        if entry["name"] == name:
            return [int(d) for d in entry["dims"]]
    raise ServedConfigError(f"model '{config.get('name')}' has no tensor '{name}'; is it a FLUX DiT?")


def _size(config: Mapping, tensor: str, symbol: str) -> int:
    """The size of ``symbol`` in the served tensor, located through the contract's dims."""
    position = INPUT_BY_NAME[tensor].dims.index(symbol)
    size = _dims(config, tensor)[position]
    if size <= 0:
        raise ServedConfigError(f"model '{config.get('name')}': {tensor} has a dynamic {symbol}; expected it fixed")
    return size


def signature_from_config(config: Mapping, guidance_embeds: bool) -> DitSignature:
    """The served model's contract from its Triton config (per-sample dims, as the contract has them)."""
    datatype = next(e["data_type"] for e in config["input"] if e["name"] == "hidden_states").removeprefix("TYPE_")
    if datatype not in TRITON_TO_TORCH:
        raise ServedConfigError(f"model '{config.get('name')}': unsupported hidden_states dtype {datatype}")
    if not config.get("max_batch_size"):
        raise ServedConfigError(f"model '{config.get('name')}' has max_batch_size 0; the contract wants a batch dim")
    _dims(config, OUTPUT_NAME)
    return DitSignature(
        in_channels=_size(config, "hidden_states", "C"),
        pooled_dim=_size(config, "pooled_projections", "P"),
        text_dim=_size(config, "encoder_hidden_states", "D"),
        guidance_embeds=guidance_embeds,
        dtype=datatype,
    )


def keeps_sessions(config: Mapping) -> bool:
    """Whether the served model keeps generation sessions: its ``max_sessions`` parameter (``dit_transformer``,
    ``flux_dit``)."""
    value = config.get("parameters", {}).get("max_sessions", {}).get("string_value", "0")
    return value.isdigit() and int(value) > 0


def runs_step_caches(config: Mapping) -> bool:
    """Whether the served model can run a step cache: ``dit_transformer`` can (it refuses one other than its
    ``cache`` setting's), ``flux_dit`` when its engine serves one (its ``cache`` parameter)."""
    if config.get("platform") != "ensemble":
        return True
    return config.get("parameters", {}).get("cache", {}).get("string_value", "none") != "none"
