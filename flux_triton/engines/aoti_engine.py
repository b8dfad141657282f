"""``aoti`` and ``aoti-fp8`` engines: the DiT's blocks compiled ahead of time (``engines.aoti``) for the
build device, into ``engines/<model>-<precision>.<kind>/`` with a JSON sidecar.

- ``aoti``: the model dtype (bf16 on CUDA, fp32 on CPU), attention through cuDNN on CUDA.
- ``aoti-fp8``: bf16 with FP8 block linears (``model.fp8``) in ``dit_transformer``'s fastest FP8 recipe: static
  activation scales (``model.fp8_scales``: the model folder's file, calibrated by the build when missing; the
  sidecar records its sha256) and fast accumulation; needs an FP8 GPU (8.9+).

The packages hold code only. Loading one means loading the source model's safetensors onto the
runner's device, applying the speed-ups the packages were compiled with, and routing every block's
forward through its kind's package with the loaded weights: no JIT, no second copy of the weights.
A package only runs on the device type (and GPU architecture) it was compiled for. On a GPU the build also compiles
the profile's opt shape alone (``engines.aoti``: a step of that shape then runs as fast as ``dit_transformer``'s
regional compile); the ``opt_packages`` option turns that on or off anywhere.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flux_triton.engines import aoti
from flux_triton.engines.build import default_device
from flux_triton.engines.kinds import kind_named, sidecar_path
from flux_triton.engines.profiles import ProfileConfig
from flux_triton.engines.sidecar import EngineSidecar, artifact, device_record, sha256_files
from flux_triton.model import store
from flux_triton.model.fp8_scales import SCALES_FILE, ScalesError
from flux_triton.model.speedups import Speedups, apply_speedups, load_with_speedups
from flux_triton.pipeline.call import engine_call

CUDNN_ATTENTION = "_native_cudnn"


def speedups_for(kind: str, device: torch.device, fp8_scales: str = SCALES_FILE) -> Speedups:
    """The speed-ups an AOTI engine of ``kind`` is compiled with (its sidecar records them; a load applies them),
    FP8 with the static scales of the model folder's file ``fp8_scales`` ("": per-token scales)."""
    attention = CUDNN_ATTENTION if device.type == "cuda" else "native"
    fp8 = kind == "aoti-fp8"
    return Speedups(attention_backend=attention, fp8=fp8, fp8_scales=fp8_scales if fp8 else "", fp8_fast_accum=fp8)


def check_scales(sidecar: EngineSidecar, model_dir: Path) -> None:
    """Refuse an FP8 engine whose scales file is not the one it was built with (a recalibration, another file)."""
    recorded = sidecar.build.get("fp8_scales")
    if not recorded:
        return
    path = store.inside(model_dir, recorded["file"])
    if not path.is_file():
        raise ScalesError(f"fp8_scales: {path}, which the engine was built with, is missing; rebuild the engine")
    found = sha256_files(path)
    if found != recorded["sha256"]:
        raise ScalesError(f"fp8_scales: {path} is not the file the engine was built with (sha256 {found}, the "
                          f"sidecar's {recorded['sha256']}); rebuild the engine or restore the file")  # fmt: skip


def fixed_text(profile: ProfileConfig) -> ProfileConfig:
    """The profile as compiled: text tokens fixed at the profile's opt length."""
    text = profile.text_tokens[1]
    return replace(profile, text_tokens=(text, text, text))


def build(job, device: torch.device | None = None) -> Path:
    """Load, speed up, compile and describe one AOTI engine (``engines.build.BuildJob``) for ``device`` (default:
    the precision's, ``build.default_device``)."""
    device = device or default_device(job.precision)  # before anything is loaded
    aoti.check_compiler_runtime()
    profile = fixed_text(job.profile)
    aoti_profile = aoti.AotiProfile.from_profile(profile)
    source_config, signature = job.signature()
    started = time.perf_counter()
    transformer = store.load_transformer(job.model_dir(), job.precision.dtype, device)
    scales = job.static_scales(transformer, aoti_profile.text_tokens)
    speedups = speedups_for(job.kind.name, device, scales["file"] if scales else "")
    apply_speedups(transformer, speedups, fp8_scales=scales and scales.pop("scales"))
    load_s = time.perf_counter() - started
    engine_dir = job.engine_path(f".{job.kind.name}")
    print(f"compiling {job.model} ({job.precision.name}, {job.kind.name}) for {device} into {engine_dir}")
    opt_shape = (profile.batch[1], profile.image_tokens[1])
    record = aoti.build(transformer, engine_dir, aoti_profile,
                        opt_shape if job.options.get("opt_packages", device.type == "cuda") else None)  # fmt: skip
    sidecar = EngineSidecar.for_build(
        job.kind.name,
        job.precision.name,
        engine_dir.name,
        job.model,
        signature,
        profile,
        source_config,
        artifacts={kind: artifact(engine_dir.parent, engine_dir / file) for kind, file in record["packages"].items()},
        device=device_record(device),
        build={
            "exporter": "torch.export + AOTInductor",
            "torch_version": torch.__version__,
            "aoti_profile": asdict(aoti_profile),
            "opt_shape": record.get("opt_shape"),  # [batch, image tokens] of the opt-shape packages, or None
            "speedups": asdict(speedups),
            "fp8_scales": scales,
            "load_s": round(load_s, 3),
            "compile_s": {name: round(seconds, 3) for name, seconds in record["compile_s"].items()},
        },
    )
    path = sidecar.write(job.sidecar_path)
    print(f"wrote {engine_dir} and {path} (compile {sum(record['compile_s'].values()):.1f} s)")
    return path


def packages(sidecar: EngineSidecar) -> dict[str, str]:
    """``{block kind: package file}`` inside the engine folder."""
    return {kind: Path(entry["file"]).name for kind, entry in sidecar.artifacts.items()}


def load(sidecar: EngineSidecar, sidecar_path: Path, device: torch.device, model_root: Path) -> AotiEngine:
    """The source model on ``device`` with every block routed through its kind's package."""
    sidecar.check_device(sidecar_path, device)
    sidecar.check_artifacts(sidecar_path)
    model_dir = store.resolve_model_dir(sidecar.source_model, model_root)
    check_scales(sidecar, model_dir)
    speedups = Speedups(**sidecar.build["speedups"])  # those the packages were compiled with
    transformer = load_with_speedups(model_dir, sidecar.dit_signature.torch_dtype, device, speedups)
    aoti.attach(transformer, sidecar_path.parent / sidecar.engine_file, packages(sidecar),
                sidecar.build.get("opt_shape"))  # fmt: skip
    return AotiEngine(sidecar.kind, transformer, device, sidecar.build["aoti_profile"]["text_tokens"])


def prebuilt_or_build(
    kind: str, transformer, engines_dir: Path | None, model: str, build_dir: Path | None = None
) -> tuple[Path, dict[str, str]]:
    """The folder and packages of ``model``'s engine of ``kind`` in ``engines_dir`` (packages hold code only,
    so any weights of the architecture attach), else of one compiled here for ``transformer``: into
    ``build_dir/kind`` if given, and taken from there when an earlier call built it."""
    if engines_dir is not None:
        path = sidecar_path(engines_dir, model, kind_named(kind).precision().name, kind)
        sidecar = EngineSidecar.read(path)
        return path.parent / sidecar.engine_file, packages(sidecar)
    from flux_triton.engines.profiles import PROFILE_PRESETS

    engine_dir = build_dir / kind if build_dir else Path(tempfile.mkdtemp(prefix=f"{kind}-"))
    record_path = engine_dir / "build.json"
    if record_path.is_file():
        return engine_dir, json.loads(record_path.read_text())["packages"]
    profile = replace(PROFILE_PRESETS["default"], batch=(1, 1, 8))
    record = aoti.build(transformer, engine_dir, aoti.AotiProfile.from_profile(fixed_text(profile)))
    record_path.write_text(json.dumps(record))
    return engine_dir, record["packages"]


class AotiEngine:
    """``run(engine tensors) -> noise_pred`` on the attached model."""

    def __init__(self, kind: str, transformer, device: torch.device, text_tokens: int):
        self.kind, self.transformer, self.device, self.text_tokens = kind, transformer, device, text_tokens

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = {name: tensor.to(self.device) for name, tensor in tensors.items()}
        text_tokens = tensors["encoder_hidden_states"].shape[1]
        if text_tokens != self.text_tokens:
            raise ValueError(f"this {self.kind} engine is compiled for {self.text_tokens} text tokens, got {text_tokens}")
        with torch.inference_mode():
            return engine_call(self.transformer, tensors)
