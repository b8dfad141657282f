"""The ONNX export: graph checks, engine IO from the contract, ONNX Runtime against diffusers at several batch
sizes and resolutions inside the profile (non-square included), and the FP8 graph's Q/DQ with calibrated scales."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from flux_triton.contract import DitSignature, validate
from flux_triton.contract.specs import AXIS_NAMES, ENGINE_OUTPUTS, engine_inputs
from flux_triton.engines.build import BuildJob
from flux_triton.engines.fp8_qdq import use_qdq
from flux_triton.engines.kinds import kind_named, sidecar_path
from flux_triton.engines.onnx_export import ExportConfig, data_path, export_for_engine, export_onnx
from flux_triton.engines.onnxruntime_engine import open_session
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.engines.sidecar import sha256_files
from flux_triton.engines.verify import measure
from flux_triton.model import store
from flux_triton.model.fp8 import quantize_blocks
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, calibrate, load_scales
from flux_triton.pipeline import call, inputs

# (batch, height, width, text tokens)
CASES = ((1, 256, 256, 8), (2, 512, 512, 8), (3, 512, 768, 16), (4, 768, 512, 64))
FP32_REL = 1e-5  # measured ~5e-7 (max |ort - diffusers| / max |diffusers|)
SMALL_CALIBRATION = Calibration(
    shapes=((64, 64, 1), (128, 64, 2)), timesteps=(1000.0, 300.0), seeds=(0,), text_tokens=8
)
_ONNX_TYPES = {"FP32": onnx.TensorProto.FLOAT, "FP16": onnx.TensorProto.FLOAT16, "BF16": onnx.TensorProto.BFLOAT16}


def _export(model_root, tmp_path, name, **config):
    model_dir = store.resolve_model_dir(name, model_root)
    signature = DitSignature.from_config(store.read_config(model_dir), torch.float32)
    transformer = store.load_transformer(model_dir, torch.float32, "cpu")
    path = export_onnx(
        transformer, signature, tmp_path / f"{name}.onnx", ExportConfig(**config), PROFILE_PRESETS["tiny"]
    )
    return path, signature


@pytest.fixture(scope="module")
def dev_onnx(model_root, tmp_path_factory):
    return _export(model_root, tmp_path_factory.mktemp("onnx"), "tiny-flux-dev")


@pytest.mark.parametrize("name", ["tiny-flux-dev", "tiny-flux-schnell"])
def test_graph_io_comes_from_the_contract(model_root, tmp_path, name):
    path, signature = _export(model_root, tmp_path, name)
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(str(path), full_check=True)
    specs = engine_inputs(signature.guidance_embeds)
    assert [i.name for i in graph.input] == [s.name for s in specs]
    assert ("guidance" in [i.name for i in graph.input]) == signature.guidance_embeds
    assert [o.name for o in graph.output] == [s.name for s in ENGINE_OUTPUTS]
    for value, spec in zip([*graph.input, *graph.output], [*specs, *ENGINE_OUTPUTS], strict=True):
        assert value.type.tensor_type.elem_type == _ONNX_TYPES[spec.wire_dtype(signature.dtype)], spec.name
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        expected = [AXIS_NAMES["B"], *(AXIS_NAMES.get(d) or signature.sizes.get(d, d) for d in spec.dims)]
        assert dims == expected, spec.name


def test_onnxruntime_matches_diffusers_inside_the_profile(dev_onnx, tiny_dev):
    path, signature = dev_onnx
    results = measure(open_session(path, torch.device("cpu")), tiny_dev, signature, CASES)
    for result in results:
        print(result)
        assert result.rel < FP32_REL, str(result)


def test_graph_has_no_double_tensors(dev_onnx):
    """RoPE runs in float32 in the graph (eager: float64), so TensorRT's parser casts nothing down."""
    path, _ = dev_onnx
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    types = [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]]
    types += [t.data_type for t in graph.initializer]
    types += [a.t.data_type for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    types += [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.DOUBLE not in types
    assert any(n.op_type == "Einsum" for n in graph.node), "expected the RoPE outer product in the graph"


def test_external_data_graph_loads_in_onnxruntime(model_root, tmp_path, tiny_dev):
    path, signature = _export(model_root, tmp_path, "tiny-flux-dev", external_data=True)
    assert data_path(path).stat().st_size > path.stat().st_size
    (result,) = measure(open_session(path, torch.device("cpu")), tiny_dev, signature, CASES[:1])
    assert result.rel < FP32_REL, str(result)


def _fp8_counts(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(QuantizeLinear nodes, DequantizeLinear nodes, FP8 initializers) of a graph."""
    ops = [node.op_type for node in model.graph.node]
    fp8 = sum(tensor.data_type == onnx.TensorProto.FLOAT8E4M3FN for tensor in model.graph.initializer)
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), fp8


def _input_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Each converted linear's activation scale as its QuantizeLinear node holds it, by the linear's name in the
    model (the node is named after the module path; the exporter turns equal initializers into Identity nodes)."""
    values = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return {
        node.name.removeprefix("/transformer/").removesuffix("/QuantizeLinear").replace("/", "."): float(
            values[node.input[1]].astype("float32")
        )
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
    }


def test_an_fp8_graph_runs_the_calibrated_scales_as_the_eager_recipe(model_root, tmp_path):
    """FP32 so that ONNX Runtime's CPU kernels run it: Q/DQ around every block linear with the file's scales and
    FP8 weights, answering as ``dit_transformer``'s FP8 linears (and far from the unquantized model)."""
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    plain = store.load_transformer(model_dir, torch.float32, "cpu")
    fp8 = store.load_transformer(model_dir, torch.float32, "cpu")
    signature = DitSignature.from_config(fp8.config, fp8.dtype)
    scales = {name: float(scale) for name, scale in calibrate(fp8, SMALL_CALIBRATION).items()}
    converted = quantize_blocks(fp8, scales)
    step = inputs.random_step(signature, 2, 128, 192, 8, timestep=700.0, seed=4)
    eager = call.transformer_call(fp8, step)
    assert use_qdq(fp8) == converted
    assert torch.equal(call.transformer_call(fp8, step), eager), "the exported module is not the eager recipe"
    path = export_onnx(fp8, signature, tmp_path / "fp8.onnx", profile=PROFILE_PRESETS["tiny"])
    model = onnx.load(str(path))
    assert _fp8_counts(model) == (converted, 2 * converted, converted)
    assert _input_scales(model) == scales
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # later levels fuse FP8 Q/DQ
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in validate(step.wire(), signature).engine_tensors(signature).items()}
    served = torch.from_numpy(session.run(None, feeds)[0])
    assert (served - eager).abs().max() < 1e-5  # measured 3e-7
    assert (eager - call.transformer_call(plain, step)).abs().max() > 1e-3  # FP8 moves it ~7e-3


def test_the_tensorrt_fp8_export_calibrates_records_and_carries_its_scales(model_root, tmp_path):
    """``make engine ENGINE=tensorrt PRECISION=fp8`` up to TensorRT's input: the BF16 graph with the scales the
    export calibrated into the model folder (rounded to BF16, the graph's float type), recorded by sha256,
    checked by onnx.checker and read by polygraphy."""
    shutil.copytree(store.resolve_model_dir("tiny-flux-dev", model_root), tmp_path / "tiny-flux-dev")
    kind = kind_named("tensorrt")
    precision = kind.precision("fp8")
    path = sidecar_path(tmp_path / "engines", "tiny-flux-dev", precision.name, kind.name)
    path.parent.mkdir()
    job = BuildJob(kind, "tiny-flux-dev", precision, PROFILE_PRESETS["tiny"], path, tmp_path)
    sidecar = export_for_engine(job)
    recorded = sidecar.build["fp8_scales"]
    scales_path = tmp_path / "tiny-flux-dev" / SCALES_FILE
    assert recorded["calibrated_s"] is not None and recorded["sha256"] == sha256_files(scales_path)
    onnx_path = path.parent / sidecar.engine_file
    model = onnx.load(str(onnx_path))
    plain = store.load_transformer(tmp_path / "tiny-flux-dev", torch.float32, "cpu")
    scales = load_scales(scales_path, plain)
    assert _fp8_counts(model) == (len(scales), 2 * len(scales), len(scales))
    assert _input_scales(model) == {name: float(torch.tensor(s).bfloat16()) for name, s in scales.items()}
    inspected = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "inspect", "model", str(onnx_path),
                                "--show", "layers"], capture_output=True, text=True, check=True)  # fmt: skip
    assert inspected.stdout.count("[Op: QuantizeLinear]") == len(scales)
    per_token = BuildJob(
        kind, "tiny-flux-dev", precision, PROFILE_PRESETS["tiny"], path, tmp_path, options={"fp8_scales": ""}
    )
    with pytest.raises(ValueError, match="TensorRT's FP8 Q/DQ need static activation scales"):
        export_for_engine(per_token)
