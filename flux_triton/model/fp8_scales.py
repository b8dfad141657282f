"""Static FP8 activation scales: a calibration that runs a few steps through the bf16 model, takes the largest
absolute input of each block linear that ``model.fp8`` converts, and freezes ``amax * margin / 448`` as that linear's
per-tensor scale; a safetensors file beside the model holds them (``fp8_scales.safetensors`` by default).

The file is checked when it is loaded: its format and version, the model it was calibrated for (the sha256 of the
transformer's config, which fixes every linear's name and shape) and one positive, finite scale for every linear."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux_triton.contract import DitSignature
from flux_triton.model.fp8 import FP8_MAX, block_linears
from flux_triton.model.store import config_digest
from flux_triton.pipeline.call import transformer_call
from flux_triton.pipeline.inputs import random_step

SCALES_FILE = "fp8_scales.safetensors"
FORMAT = "flux-triton-fp8-activation-scales"
VERSION = "1"


class ScalesError(ValueError):
    """A scales file that cannot serve this model."""


@dataclass(frozen=True)
class Calibration:
    """What the calibration runs: every (shape, timestep, seed), random latents and prompt embeddings."""

    shapes: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1), (512, 512, 1))  # (height, width, batch)
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0, 50.0)  # the raw pipeline timesteps
    seeds: tuple[int, ...] = (0, 1)
    text_tokens: int = 512
    margin: float = 1.0  # headroom over the largest activation seen (values past it saturate at +-448)


@torch.inference_mode()
def calibrate(transformer, calibration: Calibration = Calibration()) -> dict[str, torch.Tensor]:
    """Each block linear's static scale (a float32 scalar) from ``calibration``'s steps through ``transformer``
    (bf16 or fp32, before ``quantize_blocks``)."""
    linears = block_linears(transformer)
    amax = {name: 0.0 for name in linears}

    def record(name):
        def hook(_module, args):
            amax[name] = max(amax[name], args[0].detach().abs().amax().float().item())

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in linears.items()]
    signature = DitSignature.from_config(transformer.config, transformer.dtype)
    try:
        for (height, width, batch), timestep, seed in itertools.product(
            calibration.shapes, calibration.timesteps, calibration.seeds
        ):
            step = random_step(signature, batch, height, width, calibration.text_tokens, timestep, seed=seed,
                               device=transformer.device)  # fmt: skip
            transformer_call(transformer, step)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: torch.tensor(max(value, 1e-12) * calibration.margin / FP8_MAX, dtype=torch.float32)
        for name, value in amax.items()
    }


def save_scales(path: Path, scales: Mapping[str, torch.Tensor], config: Mapping, calibration: Calibration) -> Path:
    metadata = {"format": FORMAT, "version": VERSION, "config_sha256": config_digest(config),
                "calibration": json.dumps(asdict(calibration))}  # fmt: skip
    save_file({name: scale.reshape(()).float().contiguous() for name, scale in scales.items()}, path, metadata)
    return path


def load_scales(path: Path, transformer) -> dict[str, float]:
    """The scales in ``path`` for ``transformer``'s block linears, refusing a file made for another model."""
    if not path.is_file():
        raise ScalesError(f"fp8_scales: no file {path}; write it with `python -m flux_triton calibrate`")
    try:
        with safe_open(path, framework="pt") as scales_file:
            metadata = scales_file.metadata() or {}
            values = {name: scales_file.get_tensor(name) for name in scales_file.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ScalesError(f"fp8_scales: {path} is not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
        raise ScalesError(f"fp8_scales: {path} is not an FP8 scales file of version {VERSION} "
                          f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})")  # fmt: skip
    expected = config_digest(transformer.config)
    if metadata.get("config_sha256") != expected:
        raise ScalesError(f"fp8_scales: {path} was calibrated for another model (config sha256 "
                          f"{metadata.get('config_sha256')}, this model's {expected}); calibrate this one")  # fmt: skip
    names = set(block_linears(transformer))
    missing, extra = sorted(names - values.keys()), sorted(values.keys() - names)
    if missing or extra:
        raise ScalesError(f"fp8_scales: {path} does not match the model's block linears: {len(missing)} missing "
                          f"{missing[:3]}, {len(extra)} unknown {extra[:3]}")  # fmt: skip
    scales = {name: float(value) for name, value in values.items()}
    bad = sorted(name for name, value in scales.items() if not (math.isfinite(value) and value > 0))
    if bad:
        raise ScalesError(f"fp8_scales: {path} has scales that are not positive and finite: {bad[:3]}")
    return scales
