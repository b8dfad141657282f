"""The runner side of the ``aoti`` and ``aoti-fp8`` engines (``export/aoti.py``, built by ``make engine``).

An AOTI engine is code only: one package per block kind, compiled with the block's weights as
inputs. Loading it means loading the source model's safetensors onto the runner's device,
applying the kind's speed-ups (the ones the packages were compiled with), and routing every
block's forward through its kind's package with the loaded weights: no JIT, no second copy of
the weights. A package only runs on the device type (and GPU architecture) it was compiled for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flux_triton import model_store
from flux_triton.sidecar import EngineSidecar, sha256_files
from flux_triton.speedups import Speedups, apply_speedups

CUDNN_ATTENTION = "_native_cudnn"


def speedups_for(kind: str, device: torch.device) -> Speedups:
    """The speed-ups an AOTI engine of ``kind`` is compiled with and must run with."""
    attention = CUDNN_ATTENTION if device.type == "cuda" else "native"
    return Speedups(attention_backend=attention, fp8=kind == "aoti-fp8")


def device_record(device: torch.device) -> dict[str, str | None]:
    """What an AOTI package is tied to: the device type and, on CUDA, the GPU and its arch."""
    if device.type != "cuda":
        return {"device_type": device.type, "gpu": None, "compute_capability": None}
    major, minor = torch.cuda.get_device_capability(device)
    return {"device_type": "cuda", "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def check_device(sidecar: EngineSidecar, sidecar_path: Path, device: torch.device) -> None:
    here = device_record(device)
    compiled = {"device_type": sidecar.device_type, "compute_capability": sidecar.compute_capability}
    if compiled["device_type"] != here["device_type"] or (
        here["device_type"] == "cuda" and compiled["compute_capability"] != here["compute_capability"]
    ):
        built_for = (
            sidecar.device_type
            if sidecar.device_type != "cuda"
            else f"{sidecar.gpu} (sm {compiled['compute_capability']})"
        )
        runs_on = device.type if device.type != "cuda" else f"{here['gpu']} (sm {here['compute_capability']})"
        raise ValueError(
            f"{sidecar_path}: the {sidecar.kind} packages were compiled for {built_for}, but this runner is on "
            f"{runs_on}; an AOTI package only runs on the device it was compiled for: rebuild it there with "
            f"`make engine ENGINE={sidecar.kind} MODEL={sidecar.source_model}`"
        )


def check_packages(sidecar: EngineSidecar, sidecar_path: Path, engine_dir: Path) -> None:
    for kind, package in sidecar.packages.items():
        path = engine_dir / package["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{sidecar_path}: package {path} of the {kind} blocks does not exist")
        if sha256_files(path) != package["sha256"]:
            raise ValueError(f"{sidecar_path}: package {path} does not match its recorded sha256 (rebuild the engine)")


def load_aoti(engine_dir: Path, device: torch.device, sidecar_path: Path) -> AotiEngine:
    """The source model on ``device`` with every block routed through its kind's package."""
    from export import aoti

    sidecar = EngineSidecar.read(sidecar_path)
    check_device(sidecar, sidecar_path, device)
    check_packages(sidecar, sidecar_path, engine_dir)
    signature = sidecar.dit_signature
    model_dir = model_store.resolve_model_dir(sidecar.source_model, model_store.model_root())
    transformer = model_store.load_transformer(model_dir, signature.torch_dtype, device)
    apply_speedups(transformer, speedups_for(sidecar.kind, device))
    aoti.attach(transformer, engine_dir, {kind: package["file"] for kind, package in sidecar.packages.items()})
    return AotiEngine(sidecar, transformer, device)


class AotiEngine:
    """``run(engine_tensors) -> noise_pred``: the engine IO of ``engine_io`` on the attached model."""

    def __init__(self, sidecar: EngineSidecar, transformer, device: torch.device):
        self.kind, self.transformer, self.device = sidecar.kind, transformer, device
        self.text_tokens = sidecar.export["aoti_profile"]["text_tokens"]

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        tensors = {name: tensor.to(self.device) for name, tensor in tensors.items()}
        hidden, text = tensors["hidden_states"], tensors["encoder_hidden_states"]
        if text.shape[1] != self.text_tokens:
            raise ValueError(
                f"this {self.kind} engine is compiled for {self.text_tokens} text tokens, got {text.shape[1]}"
            )
        guidance = tensors.get("guidance")
        with torch.inference_mode():
            return self.transformer(
                hidden_states=hidden,
                timestep=tensors["timestep"].reshape(-1),
                guidance=None if guidance is None else guidance.reshape(-1),
                pooled_projections=tensors["pooled_projections"],
                encoder_hidden_states=text,
                txt_ids=tensors["txt_ids"][0],
                img_ids=tensors["img_ids"][0],
                return_dict=False,
            )[0]
