"""The serving core of ``dit_transformer``: settings, model loading and request execution on
torch tensors. The Triton model (``model_repository/dit_transformer/1/model.py``) only converts
tensors; the same object runs standalone."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from flux_triton.contract import DitSignature, Limits, Step, validate
from flux_triton.model import store
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline.call import transformer_call
from flux_triton.serving import faults
from flux_triton.serving.merging import finite_or_error, run_merged

MODEL_DIR_ENV = "FLUX_DIT_MODEL_DIR"

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ServeSettings:
    """``dit_transformer``'s settings: Triton config parameters of the same names."""

    model_dir: str = store.DEFAULT_MODEL
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_batch: int = 16
    max_image_tokens: int = 16384
    max_text_tokens: int = 512
    fault_forward_bytes: int = 0  # test-only fault injection (serving.faults); 0: off
    speedups: Speedups = field(default_factory=Speedups)  # parameters attention_backend, fuse_qkv, fp8, compile

    @classmethod
    def from_model_config(cls, model_config: Mapping) -> ServeSettings:
        """Settings from a Triton model config: its parameters and ``max_batch_size``;
        ``FLUX_DIT_MODEL_DIR`` overrides ``model_dir``, ``FLUX_DIT_FAULT_FORWARD_BYTES`` ``fault_forward_bytes``."""
        parameters = {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}
        if model_config.get("max_batch_size"):
            parameters["max_batch"] = str(model_config["max_batch_size"])
        values = {}
        for setting in fields(cls):
            raw = parameters.get(setting.name)
            if raw is not None and raw != "" and setting.name != "speedups":
                values[setting.name] = type(getattr(cls, setting.name))(raw)
        values["speedups"] = Speedups.parse(
            **{f.name: parameters[f.name] for f in fields(Speedups) if f.name in parameters}
        )
        if os.environ.get(MODEL_DIR_ENV):
            values["model_dir"] = os.environ[MODEL_DIR_ENV]
        if os.environ.get(faults.FAULT_FORWARD_BYTES_ENV):
            values["fault_forward_bytes"] = int(os.environ[faults.FAULT_FORWARD_BYTES_ENV])
        settings = cls(**values)
        if settings.dtype != "auto" and settings.dtype not in _DTYPES:
            raise ValueError(f"dtype parameter: expected auto or one of {sorted(_DTYPES)}, got {settings.dtype!r}")
        return settings

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        return store.default_dtype(device) if self.dtype == "auto" else _DTYPES[self.dtype]

    @property
    def limits(self) -> Limits:
        return Limits(self.max_batch, self.max_image_tokens, self.max_text_tokens)


def pick_device(device_id: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", device_id or 0)
    return torch.device("cpu")


def signature_for(settings: ServeSettings, model_root: Path, device: torch.device) -> tuple[Path, DitSignature]:
    """The model folder and its concrete contract, from config.json alone (no weights)."""
    model_dir = store.resolve_model_dir(settings.model_dir, model_root)
    config = store.read_config(model_dir)
    return model_dir, DitSignature.from_config(config, settings.torch_dtype(device))


class ForwardOutOfMemory(RuntimeError):
    """A forward ran out of memory; its memory has been released and the model keeps serving."""


class DitService:
    def __init__(self, settings: ServeSettings, model_root: Path, device: torch.device):
        self.settings = settings
        self.device = device
        self.model_dir, self.signature = signature_for(settings, model_root, device)
        transformer = store.load_transformer(self.model_dir, self.signature.torch_dtype, device)
        self.transformer = apply_speedups(transformer, settings.speedups)

    def prepare(self, tensors: Mapping[str, torch.Tensor]) -> Step:
        """Validate one request, moving its tensors to the model's device."""
        moved = {name: tensor.to(self.device, non_blocking=True) for name, tensor in tensors.items()}
        return validate(moved, self.signature, self.settings.limits)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        budget = faults.forward_budget(self.settings.fault_forward_bytes)
        before = faults.memory_in_use(self.device, budget)
        try:
            with budget:
                return transformer_call(self.transformer, step)
        except torch.OutOfMemoryError as exc:
            message = str(exc)
        # Out of the except block the error and its traceback, which holds the failed forward's
        # frames and so its activations, are gone: now the memory can really be released.
        faults.release_after_oom(self.device)
        held = max(0, faults.memory_in_use(self.device, budget) - before)
        raise ForwardOutOfMemory(
            f"{message}; the failed forward's memory was released ({held} bytes still held); "
            f"retry with fewer samples or image tokens"
        )

    def execute(self, steps: Sequence[Step]) -> list[torch.Tensor | Exception]:
        """One result per step: ``noise_pred``, or the error of its merged forward or of its answer."""
        results = run_merged(self.forward, steps, self.settings.max_batch)
        return [finite_or_error(result, step.tensors()) for result, step in zip(results, steps, strict=True)]
