"""``make engine ENGINE=aoti|aoti-fp8``: compile the DiT's blocks ahead of time (``export/aoti.py``)
for the build device, into ``engines/<model>-<precision>.<kind>/`` with a JSON sidecar.

- ``aoti``: the model dtype (bf16 on CUDA, fp32 on CPU), attention through cuDNN on CUDA.
- ``aoti-fp8``: bf16 with FP8 block linears (``flux_triton/fp8.py``); needs an FP8 GPU (8.9+).

The packages hold code only; ``dit_engine`` loads the source model's weights and attaches them
(``flux_triton/aoti_runner.py``), on the same kind of device the packages were compiled for.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from export import aoti
from export.precision import Precision
from export.profiles import ProfileConfig
from flux_triton import model_store
from flux_triton.aoti_runner import device_record, speedups_for
from flux_triton.contract import DitSignature
from flux_triton.sidecar import EngineSidecar, sha256_files
from flux_triton.speedups import apply_speedups


class DeviceUnsupported(RuntimeError):
    pass


def build_device(kind: str, precision: Precision) -> torch.device:
    """CUDA if available, else CPU; fails at once where the precision needs a GPU that is not here."""
    if not torch.cuda.is_available():
        if precision.quantization == "fp8":
            raise DeviceUnsupported(
                f"ENGINE={kind} needs an NVIDIA GPU with FP8 matmuls (compute capability "
                f"{'.'.join(map(str, precision.min_compute_capability))}+, e.g. Hopper); no CUDA device here. "
                "On CPU use ENGINE=aoti (fp32) or ENGINE=onnxruntime"
            )
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < precision.min_compute_capability:
        raise DeviceUnsupported(
            f"ENGINE={kind} PRECISION={precision.name} needs compute capability "
            f"{'.'.join(map(str, precision.min_compute_capability))}+; {torch.cuda.get_device_name(device)} has "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )
    return device


def fixed_text(profile: ProfileConfig) -> ProfileConfig:
    """The profile as compiled: text tokens fixed at the profile's opt length."""
    text = profile.text_tokens[1]
    return replace(profile, text_tokens=(text, text, text))


def build_aoti_engine(
    kind: str, model: str, precision: Precision, profile: ProfileConfig, sidecar_path: Path, model_root: Path | None
) -> Path:
    """Load, speed up, compile and describe one AOTI engine into ``sidecar_path`` and the folder
    of the same name without ``.json``; returns the sidecar path."""
    device = build_device(kind, precision)  # before anything is loaded
    aoti.check_compiler_runtime()
    profile = fixed_text(profile)
    aoti_profile = aoti.AotiProfile.from_profile(profile)
    model_dir = model_store.resolve_model_dir(model, model_root or model_store.model_root())
    config = model_store.read_config(model_dir)
    signature = DitSignature.from_config(config, precision.onnx_dtype)
    started = time.perf_counter()
    transformer = model_store.load_transformer(model_dir, precision.onnx_dtype, device)
    speedups = speedups_for(kind, device)
    apply_speedups(transformer, speedups)
    load_s = time.perf_counter() - started
    engine_dir = sidecar_path.with_suffix("")
    print(f"compiling {model_dir} ({precision.name}, {kind}) for {device} into {engine_dir}")
    record = aoti.build(transformer, engine_dir, aoti_profile)
    sidecar = EngineSidecar.for_build(
        kind,
        precision.name,
        engine_dir.name,
        model,
        signature,
        profile,
        config,
        export={
            "exporter": "torch.export + AOTInductor (export/aoti.py)",
            "aoti_profile": asdict(aoti_profile),
            "speedups": asdict(speedups),
            "load_s": round(load_s, 3),
            "compile_s": {name: round(seconds, 3) for name, seconds in record["compile_s"].items()},
        },
        torch_version=torch.__version__,
        packages={
            name: {"file": file, "sha256": sha256_files(engine_dir / file)} for name, file in record["packages"].items()
        },
        **device_record(device),
    )
    path = sidecar.write(sidecar_path)
    print(f"wrote {engine_dir} and {path} (compile {sum(record['compile_s'].values()):.1f} s)")
    return path
