"""``onnxruntime`` engines: the exported ONNX graph itself, run by ONNX Runtime in ``dit_engine``'s
Python runner (CPU, or CUDA where ONNX Runtime has it). The default kind: it serves on any machine,
and is measured against diffusers before its sidecar is written."""

from __future__ import annotations

from pathlib import Path

import torch

from flux_triton.contract import OUTPUT_NAME
from flux_triton.engines.onnx_export import export_for_engine
from flux_triton.engines.sidecar import EngineSidecar
from flux_triton.model import store


def build(job) -> Path:
    sidecar = export_for_engine(job)
    onnx_path = job.sidecar_path.parent / sidecar.engine_file
    if job.verify:
        sidecar.build["verification"] = verify(onnx_path, job)
    path = sidecar.write(job.sidecar_path)
    print(f"wrote {onnx_path} and {path}")
    return path


def verify(onnx_path: Path, job) -> list[str]:
    """ONNX Runtime against diffusers (eager, float64 RoPE) at the default shapes the profile admits."""
    from flux_triton.engines.verify import cases_within, measure

    _, signature = job.signature()
    transformer = store.load_transformer(job.model_dir(), signature.torch_dtype, "cpu")
    session = open_session(onnx_path, torch.device("cpu"))
    lines = [str(m) for m in measure(session, transformer, signature, cases_within(job.profile))]
    for line in lines:
        print(f"onnxruntime vs diffusers: {line}")
    return lines


def load(sidecar: EngineSidecar, sidecar_path: Path, device: torch.device, model_root: Path):
    """The graph the sidecar names, if its files still have their recorded sha256."""
    sidecar.check_artifacts(sidecar_path)
    return open_session(sidecar_path.parent / sidecar.engine_file, device)


def open_session(onnx_path: Path, device: torch.device):
    """``run(engine tensors) -> noise_pred`` on an ONNX Runtime session of ``onnx_path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # the arena would keep the largest request's memory for good
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    names = [node.name for node in session.get_inputs()]

    def run(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = set(names) - set(tensors)
        if missing:
            raise ValueError(f"engine inputs missing: {sorted(missing)}")
        feeds = {name: tensors[name].detach().cpu().contiguous().numpy() for name in names}
        (output,) = session.run([OUTPUT_NAME], feeds)
        return torch.from_numpy(output).to(device)

    return run
