"""``make engine``: export the DiT to ONNX, then build the engine of the chosen kind, with a JSON
sidecar, into ``engines/``.

- ``onnxruntime`` (default, runs anywhere): the ONNX file itself is the engine, served by ONNX
  Runtime in ``dit_engine``'s Python runner; measured against diffusers before it is recorded.
- ``tensorrt``: a strongly typed plan from the same ONNX file (fp16, bf16 or fp8), for Triton's
  ``tensorrt_plan`` platform; needs TensorRT and a GPU (NVIDIA's containers).
- ``aoti`` / ``aoti-fp8``: no ONNX; the blocks compiled ahead of time by torch.export +
  AOTInductor for the build device (``export/aoti_engine.py``), served by ``dit_engine``'s runner.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from export.onnx_export import ExportConfig, export_onnx, onnx_files
from export.precision import AOTI_KINDS, KINDS, PRECISIONS, precision_for
from export.profiles import PROFILE_PRESETS, ProfileConfig, preset_for
from flux_triton import model_store
from flux_triton.contract import DitSignature
from flux_triton.sidecar import EngineSidecar, sha256_files

ENGINES_DIR = model_store.REPO_ROOT / "engines"


def engine_stem(model: str, precision: str) -> str:
    return f"{Path(model).name}-{precision}"


def sidecar_path(engines_dir: Path, model: str, precision: str, kind: str) -> Path:
    return engines_dir / f"{engine_stem(model, precision)}.{kind}.json"


def build_engine(
    kind: str,
    model: str,
    precision_name: str | None = None,
    profile: ProfileConfig | None = None,
    engines_dir: Path = ENGINES_DIR,
    model_root: Path | None = None,
    export_config: ExportConfig | None = None,
    verify: bool = True,
) -> Path:
    """Export, build and describe one engine; returns its sidecar path."""
    precision = precision_for(kind, precision_name)
    if kind == "tensorrt":
        from export.tensorrt_build import require_tensorrt

        require_tensorrt()  # fail before the (long) export
    profile = profile or PROFILE_PRESETS[preset_for(model)]
    if kind in AOTI_KINDS:
        from export.aoti_engine import build_aoti_engine

        path = sidecar_path(engines_dir, model, precision.name, kind)
        return build_aoti_engine(kind, model, precision, profile, path, model_root)
    export_config = export_config or ExportConfig()
    if precision.quantization:
        export_config = dataclasses.replace(export_config, full_check=False)
    model_dir = model_store.resolve_model_dir(model, model_root or model_store.model_root())
    config = model_store.read_config(model_dir)
    signature = DitSignature.from_config(config, precision.onnx_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = model_store.load_transformer(model_dir, precision.onnx_dtype, device)
    if precision.quantization == "fp8":
        from export.quantize_fp8 import quantize_fp8

        quantize_fp8(transformer, signature, profile)
    engines_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = engines_dir / f"{engine_stem(model, precision.name)}.onnx"
    print(f"exporting {model_dir} ({precision.name}) to {onnx_path}")
    export_onnx(transformer, signature, onnx_path, export_config, profile)
    sidecar = EngineSidecar.for_build(
        kind,
        precision.name,
        onnx_path.name,
        model,
        signature,
        profile,
        config,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_files(*onnx_files(onnx_path)),
        export=export_config.describe(),
    )
    if kind == "onnxruntime" and verify:
        sidecar.export["verification"] = _verify(onnx_path, model_dir, signature)
    if kind == "tensorrt":
        from export.tensorrt_build import build_plan

        plan_path = onnx_path.with_suffix(".plan")
        built = build_plan(onnx_path, plan_path, profile.shapes(signature), precision)
        sidecar.engine_file = plan_path.name
        sidecar.tensorrt_version = built["tensorrt_version"]
        sidecar.gpu, sidecar.compute_capability = built["gpu"], built["compute_capability"]
    path = sidecar.write(sidecar_path(engines_dir, model, precision.name, kind))
    print(f"wrote {engines_dir / sidecar.engine_file} and {path}")
    return path


def _verify(onnx_path: Path, model_dir: Path, signature: DitSignature) -> list[str]:
    """ONNX Runtime against diffusers (eager, float64 RoPE) at the default shapes."""
    from export.verify import measure
    from flux_triton.engines import load_onnxruntime

    engine = load_onnxruntime(onnx_path, torch.device("cpu"))
    transformer = model_store.load_transformer(model_dir, signature.torch_dtype, "cpu")
    lines = [str(m) for m in measure(engine, transformer, signature)]
    for line in lines:
        print(f"onnxruntime vs diffusers: {line}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, default="onnxruntime")
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default=None,
        help="default: fp32 / bf16 (tensorrt) / the device's model dtype (aoti) / fp8 (aoti-fp8)",
    )
    parser.add_argument("--model", default=model_store.DEFAULT_MODEL, help="model name under the model root")
    parser.add_argument("--profile", choices=sorted(PROFILE_PRESETS), default=None, help="default: by model")
    parser.add_argument("--max-batch", type=int, default=None, help="override the profile's max batch")
    parser.add_argument("--max-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="max pixels")
    parser.add_argument("--text-tokens", type=int, nargs=3, default=None, metavar=("MIN", "OPT", "MAX"))
    parser.add_argument("--engines-dir", type=Path, default=ENGINES_DIR)
    parser.add_argument("--opset", type=int, default=ExportConfig.opset)
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs diffusers check")
    args = parser.parse_args(argv)
    profile = PROFILE_PRESETS[args.profile or preset_for(args.model)]
    overrides = {}
    if args.max_batch:
        overrides["batch"] = (profile.batch[0], min(profile.batch[1], args.max_batch), args.max_batch)
    if args.max_size:
        overrides["max_size"] = tuple(args.max_size)
    if args.text_tokens:
        overrides["text_tokens"] = tuple(args.text_tokens)
    try:
        build_engine(
            args.kind,
            args.model,
            args.precision,
            ProfileConfig(**{**asdict(profile), **overrides}),
            args.engines_dir,
            export_config=ExportConfig(opset=args.opset),
            verify=not args.no_verify,
        )
    except (RuntimeError, ValueError) as exc:  # TensorRTMissing, ModelOptMissing, DeviceUnsupported, bad arguments
        sys.exit(f"make engine: {exc}")


if __name__ == "__main__":
    main()
