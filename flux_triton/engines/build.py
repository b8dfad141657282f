"""Build the engine of a kind (``engines.kinds``) for a model, with its JSON sidecar, into the engines
folder (``make engine``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flux_triton.contract import DitSignature
from flux_triton.engines.kinds import EngineKind, kind_named, sidecar_path
from flux_triton.engines.precision import Precision
from flux_triton.engines.profiles import PROFILE_PRESETS, ProfileConfig, preset_for
from flux_triton.engines.sidecar import sha256_files
from flux_triton.locations import Locations
from flux_triton.model import store
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, calibrate, load_scales, save_scales


@dataclass(frozen=True)
class BuildJob:
    """One engine to build: what every kind's ``build(job)`` gets."""

    kind: EngineKind
    model: str
    precision: Precision
    profile: ProfileConfig
    sidecar_path: Path
    model_root: Path
    verify: bool = True  # measure the engine against diffusers where it can run here
    options: dict = field(default_factory=dict)  # kind-specific: e.g. {"opset": 19} for the ONNX kinds

    def engine_path(self, suffix: str) -> Path:
        """``<engines>/<model>-<precision><suffix>``, beside the sidecar (model names may hold dots)."""
        stem = self.sidecar_path.name.removesuffix(f".{self.kind.name}.json")
        return self.sidecar_path.parent / f"{stem}{suffix}"

    def model_dir(self) -> Path:
        return store.resolve_model_dir(self.model, self.model_root)

    def static_scales(self, transformer, text_tokens: int) -> dict | None:
        """An FP8 engine's static activation scales (``options["fp8_scales"]``, a file in the model folder;
        default ``fp8_scales.safetensors``): read, or calibrated on ``transformer`` (before its FP8 conversion) at
        the engine's text length and written there first; ``None`` for another precision or for per-token scales
        (``""``). Returns what the sidecar records, ``{"file", "sha256", "calibrated_s"}``, with the ``scales``."""
        name = self.options.get("fp8_scales", SCALES_FILE)
        if self.precision.quantization != "fp8" or not name:
            return None
        path = store.inside(self.model_dir(), name)
        calibrated_s = None
        if not path.is_file():
            started, calibration = time.perf_counter(), Calibration(text_tokens=text_tokens)
            print(f"calibrating static FP8 activation scales into {path}")
            save_scales(path, calibrate(transformer, calibration), transformer.config, calibration)
            calibrated_s = round(time.perf_counter() - started, 3)
        scales = load_scales(path, transformer)
        return {"file": name, "sha256": sha256_files(path), "calibrated_s": calibrated_s, "scales": scales}

    def signature(self) -> tuple[dict, DitSignature]:
        """The source model's config and its concrete contract at this precision."""
        config = store.read_config(self.model_dir())
        return config, DitSignature.from_config(config, self.precision.dtype)


def build_engine(
    kind: str,
    model: str,
    precision: str | None = None,
    profile: ProfileConfig | None = None,
    engines_dir: Path | None = None,
    model_root: Path | None = None,
    verify: bool = True,
    **options,
) -> Path:
    """Build one engine; returns its sidecar path."""
    engine_kind = kind_named(kind)
    chosen = engine_kind.precision(precision)
    locations = Locations.here()
    job = BuildJob(
        kind=engine_kind,
        model=model,
        precision=chosen,
        profile=profile or PROFILE_PRESETS[preset_for(model)],
        sidecar_path=sidecar_path(engines_dir or locations.engines_dir, model, chosen.name, kind),
        model_root=model_root or locations.model_root,
        verify=verify,
        options=options,
    )
    job.sidecar_path.parent.mkdir(parents=True, exist_ok=True)
    return engine_kind.implementation().build(job)


def default_device(precision: Precision) -> torch.device:
    """CUDA if available, else CPU; fails at once where the precision needs a GPU that is not here."""
    if not torch.cuda.is_available():
        if precision.min_compute_capability > (8, 0):
            raise RuntimeError(
                f"PRECISION={precision.name} needs an NVIDIA GPU of compute capability "
                f"{precision.min_capability_text}+ (e.g. Hopper); no CUDA device here"
            )
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < precision.min_compute_capability:
        raise RuntimeError(
            f"PRECISION={precision.name} needs compute capability {precision.min_capability_text}+; "
            f"{torch.cuda.get_device_name(device)} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )
    return device
