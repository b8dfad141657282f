"""Engine loaders by kind: ``{kind: loader(engine_path, device, sidecar_path) -> run(tensors) -> noise_pred}``.

``dit_engine``'s Python runner picks the loader from the engine's JSON sidecar (``kind``), so new
kinds only register a loader here: ``onnxruntime``, and ``aoti``/``aoti-fp8`` (torch.export +
AOTInductor, ``flux_triton/aoti_runner.py``).
TensorRT plans are served by Triton's own ``tensorrt_plan`` platform, not through this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from flux_triton.contract import OUTPUT_NAME
from flux_triton.sidecar import EngineSidecar

EngineFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Loader = Callable[[Path, torch.device, Path], EngineFn]

LOADERS: dict[str, Loader] = {}


def register(kind: str) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        LOADERS[kind] = loader
        return loader

    return add


def load_engine(sidecar_path: Path, device: torch.device) -> tuple[EngineSidecar, EngineFn]:
    sidecar = EngineSidecar.read(sidecar_path)
    loader = LOADERS.get(sidecar.kind)
    if loader is None:
        raise ValueError(
            f"{sidecar_path}: engine kind {sidecar.kind!r} has no loader in this runner "
            f"(known: {', '.join(sorted(LOADERS))})"
        )
    engine_path = Path(sidecar_path).parent / sidecar.engine_file
    if not engine_path.exists():
        raise FileNotFoundError(f"engine file {engine_path} named by {sidecar_path} does not exist (run `make engine`)")
    return sidecar, loader(engine_path, device, Path(sidecar_path))


@register("aoti")
@register("aoti-fp8")
def load_aoti(engine_dir: Path, device: torch.device, sidecar_path: Path) -> EngineFn:
    """The source model's weights on ``device`` with every block routed through its AOTI package."""
    from flux_triton.aoti_runner import load_aoti

    return load_aoti(engine_dir, device, sidecar_path)


@register("onnxruntime")
def load_onnxruntime(engine_path: Path, device: torch.device, sidecar_path: Path | None = None) -> EngineFn:
    """The ONNX graph that TensorRT would consume, run by ONNX Runtime (CPU, or CUDA if present)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = ort.InferenceSession(str(engine_path), options, providers=providers)
    names = [node.name for node in session.get_inputs()]

    def run(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = set(names) - set(tensors)
        if missing:
            raise ValueError(f"engine inputs missing: {sorted(missing)}")
        feeds = {name: tensors[name].detach().cpu().contiguous().numpy() for name in names}
        (output,) = session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(output).to(device)

    return run
