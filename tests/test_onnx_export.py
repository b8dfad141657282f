"""The ONNX export: graph checks, engine IO from the contract, and ONNX Runtime against diffusers
at several batch sizes and resolutions inside the profile (non-square included)."""

from __future__ import annotations

import onnx
import pytest
import torch

from flux_triton.contract import DitSignature
from flux_triton.contract.specs import AXIS_NAMES, ENGINE_OUTPUTS, engine_inputs
from flux_triton.engines.onnx_export import ExportConfig, data_path, export_onnx
from flux_triton.engines.onnxruntime_engine import open_session
from flux_triton.engines.profiles import PROFILE_PRESETS
from flux_triton.engines.verify import measure
from flux_triton.model import store

# (batch, height, width, text tokens)
CASES = ((1, 256, 256, 8), (2, 512, 512, 8), (3, 512, 768, 16), (4, 768, 512, 64))
FP32_REL = 1e-5  # measured ~5e-7 (max |ort - diffusers| / max |diffusers|)
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
