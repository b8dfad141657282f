"""Trace ``FluxTransformer2DModel`` to ONNX with the engine IO of ``flux_triton.engine_io``.

Exporter: the TorchScript exporter (``dynamo=False``), as NVIDIA's demo does for BF16/FP8 FLUX and
ModelOpt does for every FLUX export; the dynamo exporter fails on this model (pytorch#138195).
Dynamic axes: batch on every tensor, image tokens ``N`` and text tokens ``S``. Graphs over 2 GB
are saved with their weights in one external data file beside them (``<name>.onnx.data``).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from export.profiles import ProfileConfig
from export.rope import exportable_rope
from export.wrapper import EngineGraph
from flux_triton.contract import DitSignature
from flux_triton.engine_io import ENGINE_OUTPUTS, dynamic_axes, engine_inputs, engine_tensors
from flux_triton.reference import random_step
from flux_triton.validation import validate

PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 19
    trace_batch: int = 2  # not 1, so that no batch dim is specialised away
    trace_size: tuple[int, int] = (256, 320)  # non-square, N != S
    external_data: bool | None = None  # None: only when the graph exceeds 2 GB
    full_check: bool = True  # onnx.checker with shape inference (off for ModelOpt's custom FP8 Q/DQ ops)

    def describe(self) -> dict:
        return {"exporter": "torch.onnx.export(dynamo=False)", "opset": self.opset, "rope": "float32"}


def sample_inputs(signature: DitSignature, config: ExportConfig, profile: ProfileConfig) -> dict[str, torch.Tensor]:
    """Engine inputs for tracing, made by the same path as serving (pipeline step -> validation ->
    ``engine_tensors``)."""
    text = profile.text_tokens[1]
    height, width = config.trace_size
    step = random_step(signature, batch=config.trace_batch, height=height, width=width, text_tokens=text, seed=0)
    return engine_tensors(validate(step.wire(), signature), signature)


def export_onnx(
    transformer,
    signature: DitSignature,
    path: Path,
    config: ExportConfig | None = None,
    profile: ProfileConfig | None = None,
) -> Path:
    """Write ``path`` (plus ``path.data`` when external) and check it with ``onnx.checker``."""
    config, profile = config or ExportConfig(), profile or ProfileConfig()
    graph = EngineGraph(transformer).eval()
    inputs = sample_inputs(signature, config, profile)
    specs = engine_inputs(signature.guidance_embeds)
    axes = {spec.name: dynamic_axes(spec) for spec in (*specs, *ENGINE_OUTPUTS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=path.parent) as scratch,
        torch.no_grad(),
        exportable_rope(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        raw = Path(scratch) / "raw.onnx"
        torch.onnx.export(
            graph,
            tuple(inputs[spec.name] for spec in specs),
            str(raw),
            input_names=[spec.name for spec in specs],
            output_names=[spec.name for spec in ENGINE_OUTPUTS],
            dynamic_axes=axes,
            opset_version=config.opset,
            do_constant_folding=True,
            dynamo=False,
        )
        model = onnx.load(str(raw))
        save(model, path, config.external_data)
    onnx.checker.check_model(str(path), full_check=config.full_check)
    return path


def save(model: onnx.ModelProto, path: Path, external: bool | None) -> None:
    for stale in (path, data_path(path)):
        stale.unlink(missing_ok=True)
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT - (64 << 20)
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_path(path).name, size_threshold=1024, convert_attribute=False,
        )  # fmt: skip
    else:
        onnx.save_model(model, str(path))


def data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """The graph and, if it has one, its external data file."""
    return [path, *([data_path(path)] if data_path(path).exists() else [])]
