"""Trace ``FluxTransformer2DModel`` to ONNX with the engine IO of the contract (``engine_inputs``).

Exporter: the TorchScript exporter (``dynamo=False``), as NVIDIA's demo does for BF16/FP8 FLUX and
ModelOpt does for every FLUX export; the dynamo exporter fails on this model (pytorch#138195). FP8: the block
linears in ``dit_transformer``'s recipe with the calibrated static scales, as standard Q/DQ (``engines.fp8_qdq``).
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

from flux_triton.contract import DitSignature, validate
from flux_triton.contract.specs import ENGINE_OUTPUTS, dynamic_axes, engine_inputs
from flux_triton.engines.fp8_qdq import use_qdq
from flux_triton.engines.profiles import ProfileConfig
from flux_triton.engines.rope import exportable_rope
from flux_triton.engines.sidecar import EngineSidecar, artifact
from flux_triton.engines.wrapper import EngineGraph
from flux_triton.model import store
from flux_triton.model.fp8 import quantize_blocks
from flux_triton.pipeline.inputs import random_step

PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 19
    trace_batch: int = 2  # not 1, so that no batch dim is specialised away
    trace_size: tuple[int, int] = (256, 320)  # non-square, N != S
    external_data: bool | None = None  # None: only when the graph exceeds 2 GB

    def describe(self) -> dict:
        return {"exporter": "torch.onnx.export(dynamo=False)", "opset": self.opset, "rope": "float32"}


def sample_inputs(signature: DitSignature, config: ExportConfig, profile: ProfileConfig) -> dict[str, torch.Tensor]:
    """Engine inputs for tracing, made by the same path as serving (request -> validation -> engine tensors)."""
    text = profile.text_tokens[1]
    height, width = config.trace_size
    step = random_step(signature, batch=config.trace_batch, height=height, width=width, text_tokens=text, seed=0)
    return validate(step.wire(), signature).engine_tensors(signature)


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
    onnx.checker.check_model(str(path), full_check=True)
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


def export_for_engine(job) -> EngineSidecar:
    """The ONNX kinds' first stage (``engines.build.BuildJob``): load the model on the build device,
    convert it to FP8 Q/DQ with its static scales, export ``<stem>.onnx``; returns the engine's sidecar, not yet
    written."""
    config = ExportConfig(**{key: value for key, value in job.options.items() if key == "opset"})
    model_dir = job.model_dir()
    source_config, signature = job.signature()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = store.load_transformer(model_dir, job.precision.dtype, device)
    scales = job.static_scales(transformer, job.profile.text_tokens[1])
    if job.precision.quantization == "fp8":
        if scales is None:
            raise ValueError("--fp8-scales per-token: TensorRT's FP8 Q/DQ need static activation scales")
        quantize_blocks(transformer, scales.pop("scales"))
        use_qdq(transformer)
    path = job.engine_path(".onnx")
    print(f"exporting {model_dir} ({job.precision.name}) to {path}")
    export_onnx(transformer, signature, path, config, job.profile)
    artifacts = {"onnx": artifact(path.parent, path)}
    if data_path(path).exists():
        artifacts["onnx_data"] = artifact(path.parent, data_path(path))
    return EngineSidecar.for_build(
        job.kind.name,
        job.precision.name,
        path.name,
        job.model,
        signature,
        job.profile,
        source_config,
        artifacts=artifacts,
        build={**config.describe(), "fp8_scales": scales},
    )
