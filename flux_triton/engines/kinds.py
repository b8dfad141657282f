"""The one table of engine kinds: how each is built and loaded, its precisions, its Triton platform.

Adding a kind means one entry here and one module in this package with ``build(job) -> sidecar path``
and, for kinds that ``dit_engine``'s Python runner serves, ``load(sidecar, sidecar_path, device,
model_root) -> run(engine tensors) -> noise_pred``. The modules are imported only when a kind is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from flux_triton.engines.precision import PRECISIONS, Precision
from flux_triton.engines.sidecar import EngineSidecar

EngineFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
DEVICE_DTYPE = "device"  # a precision entry meaning the build device's model dtype (bf16 on CUDA, fp32 on CPU)


@dataclass(frozen=True)
class EngineKind:
    name: str
    module: str  # flux_triton.engines.<module>: build() and load()
    precisions: tuple[str, ...]  # the first is the default
    platform: str  # dit_engine's Triton model: "python" (this package's runner) or "tensorrt_plan"
    summary: str
    cuda_graphs: bool = False  # the runner's step can be captured in a CUDA graph (dit_engine's cuda_graphs)
    step_caches: bool = False  # the runner is diffusers' model (compiled blocks), which diffusers' cache hooks wrap

    def implementation(self) -> ModuleType:
        return importlib.import_module(f"flux_triton.engines.{self.module}")

    def default_precision(self, device: torch.device | str | None = None) -> str:
        default = self.precisions[0]
        if default != DEVICE_DTYPE:
            return default
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return "bf16" if device.type == "cuda" else "fp32"

    def precision(self, name: str | None = None) -> Precision:
        """``name`` (default: the kind's), checked against what the kind can build."""
        name = name or self.default_precision()
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
        if name not in self.precisions:
            supported = ", ".join(n for n in self.precisions if n != DEVICE_DTYPE)
            raise ValueError(f"precision {name} is not supported by the {self.name} engine (only: {supported})")
        return PRECISIONS[name]


KINDS: dict[str, EngineKind] = {
    kind.name: kind
    for kind in (
        EngineKind("onnxruntime", "onnxruntime_engine", ("fp32",), "python", "the ONNX graph on ONNX Runtime; any machine"),
        EngineKind(
            "tensorrt", "tensorrt_engine", ("bf16", "fp16", "fp8", "fp32"), "tensorrt_plan", "a TensorRT plan; NVIDIA GPU"
        ),
        EngineKind("aoti", "aoti_engine", (DEVICE_DTYPE, "bf16", "fp32"), "python", "AOTInductor block packages for the build device", True, True),
        EngineKind("aoti-fp8", "aoti_engine", ("fp8",), "python", "AOTInductor packages with FP8 block linears; Hopper+", True, True),
    )
}
DEFAULT_KIND = "onnxruntime"


def kind_named(name: str) -> EngineKind:
    if name not in KINDS:
        raise ValueError(f"unknown engine kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]


def sidecar_path(engines_dir: Path, model: str, precision: str, kind: str) -> Path:
    """``engines/<model>-<precision>.<kind>.json``; the engine itself is named alike beside it."""
    return Path(engines_dir) / f"{Path(model).name}-{precision}.{kind}.json"


def check_step_cache(kind: str, cache: str) -> None:
    """Refuse the step ``cache`` (a cache setting) for an engine ``kind`` whose runner diffusers' hooks cannot wrap."""
    from flux_triton.pipeline.caching import parse_cache_setting

    if parse_cache_setting(cache) is not None and not KINDS[kind].step_caches:
        kinds = ", ".join(name for name, k in KINDS.items() if k.step_caches)
        raise ValueError(f"cache {cache}: the {kind} engine is one compiled graph, which diffusers' cache hooks "
                         f"cannot wrap (kinds that serve a step cache: {kinds}; or serve dit_transformer)")  # fmt: skip


def load_engine(
    path: Path, device: torch.device, model_root: Path, cuda_graphs: bool = False
) -> tuple[EngineSidecar, EngineFn]:
    """The engine a sidecar describes, loaded by its kind's runner onto ``device`` (engines that attach
    to the source model's weights load them from ``model_root``); with ``cuda_graphs``, each input shape's step
    captured in a CUDA graph and replayed (``model.graphs``)."""
    sidecar = EngineSidecar.read(path)
    kind = KINDS.get(sidecar.kind)
    if kind is None or kind.platform != "python":
        served = ", ".join(name for name, k in KINDS.items() if k.platform == "python")
        raise ValueError(f"{path}: engine kind {sidecar.kind!r} has no loader in this runner (known: {served})")
    if not (Path(path).parent / sidecar.engine_file).exists():
        raise FileNotFoundError(f"engine file {Path(path).parent / sidecar.engine_file} named by {path} does not exist")
    if cuda_graphs:
        from flux_triton.model.graphs import GraphedEngine, check_cuda

        if not kind.cuda_graphs:
            capturable = ", ".join(name for name, k in KINDS.items() if k.cuda_graphs)
            raise ValueError(f"cuda_graphs: the {sidecar.kind} runner cannot be captured (only: {capturable})")
        check_cuda(device)
    engine = kind.implementation().load(sidecar, Path(path), device, model_root)
    return sidecar, GraphedEngine(engine, device) if cuda_graphs else engine
