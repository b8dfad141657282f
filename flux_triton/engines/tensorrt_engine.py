"""``tensorrt`` engines: a TensorRT plan built from the exported ONNX graph (TensorRT Python API, 10.x
and 11.x), served by Triton's own ``tensorrt_plan`` platform.

Strongly typed network (the only mode of TensorRT 11, opt-in on 10.x): the precision comes from
the graph (FP16/BF16 weights and IO, FP8 Q/DQ with calibrated scales). One optimization profile with
min/opt/max for batch, image tokens and text tokens, from ``export.profiles``. The ONNX parser
reads external weight data beside the graph (``parse_from_file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flux_triton.engines.onnx_export import export_for_engine
from flux_triton.engines.precision import Precision
from flux_triton.engines.sidecar import artifact, device_record

CONTAINERS = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or nvcr.io/nvidia/pytorch:<yy.mm>-py3"


class TensorRTMissing(RuntimeError):
    pass


def require_tensorrt():
    """The ``tensorrt`` module and a CUDA GPU, or a clear error naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing(
            "ENGINE=tensorrt needs TensorRT's Python package (`import tensorrt` failed) and an NVIDIA GPU. "
            f"TensorRT cannot be installed on this machine; NVIDIA's containers ({CONTAINERS}) ship it. "
            "Run `make engine ENGINE=tensorrt` inside one, on the GPU that will serve the plan. "
            "On this machine `make engine` (ENGINE=onnxruntime) builds a servable engine."
        ) from exc
    if not torch.cuda.is_available():
        raise TensorRTMissing(f"ENGINE=tensorrt: TensorRT {trt.__version__} is installed but no CUDA GPU is visible")
    return trt


@dataclass(frozen=True)
class BuildConfig:
    optimization_level: int = 3  # NVIDIA's demo uses 3 for FLUX, to bound builder memory
    workspace_gib: float | None = None  # None: TensorRT's default (device memory)
    timing_cache: Path | None = None


def network_flags(trt) -> int:
    """``STRONGLY_TYPED`` where the enum still has it (required on 10.x, ignored on 11.x)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def builder_flag_names(precision: Precision) -> tuple[str, ...]:
    """Builder flags for a strongly typed build: no FP16/BF16/FP8 flags (removed in TensorRT 11;
    rejected for strongly typed networks); TF32 only where the precision allows it."""
    return ("TF32",) if precision.tf32 else ()


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    shapes: dict[str, dict[str, tuple[int, ...]]],
    precision: Precision,
    config: BuildConfig | None = None,
) -> dict:
    """Parse, build and write the plan; return what the sidecar records about the build."""
    config = config or BuildConfig()
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    _check_network_inputs(network, shapes)
    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = config.optimization_level
    if config.workspace_gib:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    for name in builder_flag_names(precision):
        builder_config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, levels in shapes.items():
        profile.set_shape(name, levels["min"], levels["opt"], levels["max"])
    builder_config.add_optimization_profile(profile)
    cache = _load_timing_cache(builder_config, config.timing_cache)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path.name}; see the log above")
    plan_path.write_bytes(bytes(serialized))
    if config.timing_cache:
        config.timing_cache.write_bytes(bytes(cache.serialize()))
    return {"tensorrt_version": trt.__version__}


def _check_network_inputs(network, shapes: dict) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(shapes):
        raise RuntimeError(f"ONNX inputs {sorted(names)} differ from the engine contract {sorted(shapes)}")


def _load_timing_cache(builder_config, path: Path | None):
    data = path.read_bytes() if path and path.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build(job) -> Path:
    """Export, then build the plan; fails before the (long) export where TensorRT is missing."""
    require_tensorrt()
    sidecar = export_for_engine(job)
    plan_path = job.engine_path(".plan")
    onnx_path = job.sidecar_path.parent / sidecar.engine_file
    built = build_plan(onnx_path, plan_path, job.profile.shapes(sidecar.dit_signature), job.precision)
    sidecar.engine_file = plan_path.name
    sidecar.artifacts["plan"] = artifact(plan_path.parent, plan_path)
    sidecar.build.update(built)
    sidecar.device = device_record(torch.device("cuda", torch.cuda.current_device()))
    path = sidecar.write(job.sidecar_path)
    print(f"wrote {plan_path} and {path}")
    return path

