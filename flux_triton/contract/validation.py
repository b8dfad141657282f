"""Validation against the IO contract, of a public request, of an engine's inputs, and of the answer:
every error names the tensor and what was expected."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from flux_triton.contract.protocol import GUIDANCE_REQUIRED
from flux_triton.contract.specs import (
    ENGINE_INPUTS,
    GUIDANCE_RANGE,
    INPUT_BY_NAME,
    OUTPUT_NAME,
    TIMESTEP_RANGE,
    TensorSpec,
)
from flux_triton.contract.step import Step
from flux_triton.contract.tensors import TRITON_TO_TORCH, DitSignature

_ORIGIN = {
    "B": "the batch size of hidden_states",
    "N": "hidden_states",
    "S": "encoder_hidden_states",
    "C": "the model config's in_channels",
    "P": "the model config's pooled_projection_dim",
    "D": "the model config's joint_attention_dim",
}


class InputError(ValueError):
    """A request that does not fit the contract; the message names the input."""


class OutputError(RuntimeError):
    """The model's answer to a valid request is not finite; the message names the request's inputs."""


@dataclass(frozen=True)
class Side:
    """One side of the contract: the public request, or an engine's inputs (timestep already scaled)."""

    specs: Mapping[str, TensorSpec]
    timestep_range: tuple[float, float]
    timestep_meaning: str


PUBLIC = Side(INPUT_BY_NAME, TIMESTEP_RANGE, "raw scheduler timesteps (sigma * 1000)")
ENGINE = Side({spec.name: spec for spec in ENGINE_INPUTS}, (0.0, 1.0), "scaled timesteps (t / 1000)")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the model (a compiled engine's profile, or memory)."""

    max_batch: int = 64
    max_image_tokens: int = 16384
    max_text_tokens: int = 512
    min_image_tokens: int = 1
    min_text_tokens: int = 1


def _check_shape(spec: TensorSpec, tensor: torch.Tensor, signature: DitSignature, sizes: dict[str, int]) -> None:
    if tensor.dtype != TRITON_TO_TORCH[spec.wire_dtype(signature.dtype)]:
        raise InputError(f"{spec.name}: expected dtype {spec.wire_dtype(signature.dtype)}, got {tensor.dtype}")
    wanted = ("B", *spec.dims)
    if tensor.ndim != len(wanted):
        raise InputError(
            f"{spec.name}: expected rank {len(wanted)} with shape [{', '.join(map(str, wanted))}], "
            f"got shape {list(tensor.shape)}"
        )
    for symbol, size in zip(wanted, tensor.shape, strict=True):
        if size == 0:
            raise InputError(f"{spec.name}: dimension {symbol} is zero in shape {list(tensor.shape)}")
        known = symbol if isinstance(symbol, int) else sizes.get(symbol)
        if known is None:
            sizes[symbol] = size
        elif known != size:
            raise InputError(
                f"{spec.name}: expected {symbol}={known} (from {_ORIGIN.get(symbol, 'the contract')}), "
                f"got shape {list(tensor.shape)}"
            )


def validate(
    tensors: Mapping[str, torch.Tensor],
    signature: DitSignature,
    limits: Limits = Limits(),
    checked: Collection[str] = (),
) -> Step:
    """Check one public request's tensors and return its step (``checked``: see ``check``)."""
    check(tensors, signature, limits, PUBLIC, checked)
    return Step.from_wire(tensors)


def check(
    tensors: Mapping[str, torch.Tensor],
    signature: DitSignature,
    limits: Limits,
    side: Side = PUBLIC,
    checked: Collection[str] = (),
) -> None:
    """Check one request's tensors against a side of the contract; raises ``InputError``. ``checked``: tensors whose
    values an earlier step checked (a session's held prompt); their shapes are checked again, their values not."""
    # Guidance first: clients learn whether a model takes guidance from this answer to a minimal
    # request (client.connection), whatever else that request lacks.
    if "guidance" in tensors and not signature.guidance_embeds:
        raise InputError("guidance: this model has no guidance embeddings (schnell-like); do not send guidance")
    if "guidance" not in tensors and signature.guidance_embeds:
        raise InputError(f"{GUIDANCE_REQUIRED}, this model has guidance embeddings (dev-like); send the guidance scale")
    unknown = sorted(set(tensors) - set(side.specs))
    if unknown:
        raise InputError(f"{unknown[0]}: not an input of this model (inputs: {', '.join(side.specs)})")
    sizes: dict[str, int] = dict(signature.sizes)
    # Checked in this order so that B, N and S are taken from the main tensors first.
    order = (
        "hidden_states",
        "encoder_hidden_states",
        "timestep",
        "guidance",
        "pooled_projections",
        "img_ids",
        "txt_ids",
    )
    for name in order:
        spec = side.specs[name]
        if name not in tensors:
            if spec.optional:
                continue
            dims = ", ".join(map(str, ("B", *spec.dims)))
            raise InputError(f"{name}: missing required input, expected shape [{dims}]")
        _check_shape(spec, tensors[name], signature, sizes)
    _check_limits(sizes, limits)
    _check_values({name: tensor for name, tensor in tensors.items() if name not in checked}, side)


def _check_limits(sizes: dict[str, int], limits: Limits) -> None:
    for symbol, name, low, high in (
        ("B", "hidden_states", 1, limits.max_batch),
        ("N", "hidden_states", limits.min_image_tokens, limits.max_image_tokens),
        ("S", "encoder_hidden_states", limits.min_text_tokens, limits.max_text_tokens),
    ):
        if sizes[symbol] > high:
            raise InputError(f"{name}: {symbol}={sizes[symbol]} exceeds this server's limit of {high}")
        if sizes[symbol] < low:
            raise InputError(f"{name}: {symbol}={sizes[symbol]} is below this engine's minimum of {low}")


def _check_values(tensors: Mapping[str, torch.Tensor], side: Side) -> None:
    """Value checks, gathered into one device-to-host transfer."""
    if not tensors:
        return
    names, flags = [], []
    for name, tensor in tensors.items():
        names.append(f"{name}: expected finite values, got NaN or Inf")
        flags.append(~_all_finite(tensor))
    ranges = {"timestep": (side.timestep_range, side.timestep_meaning), "guidance": (GUIDANCE_RANGE, "guidance scales")}
    outside = {}
    for name, ((low, high), meaning) in ranges.items():
        if name in tensors:
            outside[name] = (tensors[name] < low) | (tensors[name] > high)
            names.append(f"{name}: expected {meaning} in [{low:g}, {high:g}]")
            flags.append(outside[name].any())
    for name in ("txt_ids", "img_ids"):
        if name not in tensors:
            continue
        ids = tensors[name]
        names.append(f"{name}: rows differ within the request; expected the same ids for every sample")
        flags.append((ids != ids[:1]).any())
    failed = [message for message, bad in zip(names, torch.stack(flags).tolist(), strict=True) if bad]
    if failed:
        # Only on the error path: the offending values, one more transfer.
        failed = [_with_values(message, tensors, outside) for message in failed]
        raise InputError("; ".join(failed))


def check_output(noise_pred: torch.Tensor, tensors: Mapping[str, torch.Tensor], side: Side = PUBLIC) -> torch.Tensor:
    """``noise_pred`` if finite; else ``OutputError`` naming the request's timesteps, guidance and largest inputs."""
    if bool(_all_finite(noise_pred)):
        return noise_pred
    described = []
    for name, tensor in tensors.items():
        if name in ("timestep", "guidance"):
            scaled = "scaled " if name == "timestep" and side is ENGINE else ""
            described.append(f"{scaled}{name} {_values(tensor)}")
        elif name not in ("txt_ids", "img_ids"):
            described.append(f"max |{name}| {tensor.abs().max().item():.3g}")
    raise OutputError(
        f"{OUTPUT_NAME}: NaN or Inf for the request with {', '.join(described)}; inputs this large overflow the "
        f"model's {str(noise_pred.dtype).removeprefix('torch.')} arithmetic"
    )


def _all_finite(tensor: torch.Tensor) -> torch.Tensor:
    """Finite iff the min and max are (NaN propagates through both): one reduction, not a mask."""
    if tensor.numel() == 0:
        return torch.tensor(True, device=tensor.device)
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def _values(tensor: torch.Tensor, most: int = 4) -> str:
    values = tensor.flatten().tolist()
    return ", ".join(f"{value:.9g}" for value in values[:most]) + (", ..." if len(values) > most else "")


def _with_values(message: str, tensors: Mapping[str, torch.Tensor], outside: Mapping[str, torch.Tensor]) -> str:
    """A range message with the offending values."""
    name = message.split(":", 1)[0]
    if name not in outside or "finite" in message:
        return message
    return f"{message}, got {_values(tensors[name][outside[name]])}"
