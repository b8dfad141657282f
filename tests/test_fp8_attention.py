"""FP8 cuDNN attention (model.fp8_attention, model.fp8_attention_processor): the custom op as torch.compile sees
it, the scales around it against cuDNN's documented contract, the processor against diffusers' own with the kernel
swapped for SDPA, the refusals on the CPU and with context parallelism; on a Hopper GPU, the kernel against fp32
attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import load_tiny
from torch._subclasses.fake_tensor import FakeTensorMode

from flux_triton.contract import DitSignature
from flux_triton.model.fp8_attention import FP8, fp8_sdpa
from flux_triton.model.fp8_attention_processor import FluxFp8AttnProcessor, set_attention
from flux_triton.model.parallel import ParallelSettings
from flux_triton.model.speedups import Speedups, apply_speedups, fuse_qkv_projections
from flux_triton.pipeline import call, inputs

DEVICE_ERROR = r"fp8_cudnn attention needs a CUDA GPU of compute capability 9\.0\+ \(Hopper\)"
# rel. L2 of fp8_sdpa against fp32 attention on N(0, 1) q/k/v (b=2, s=1536, 24 heads, d=128): an e4m3 emulation of
# the kernel (q, k, v, P and O rounded) gives 0.059; the rounding of q and k alone gives most of it.
FP8_ATTENTION_REL_L2 = 8e-2


def _bhsd(batch: int, seq: int, heads: int, head_dim: int, **kwargs) -> torch.Tensor:
    """A (batch, heads, seq, head_dim) view of a diffusers-layout (batch, seq, heads, head_dim) tensor."""
    return torch.randn(batch, seq, heads, head_dim, **kwargs).transpose(1, 2)


def test_the_cudnn_op_fakes_an_fp8_output_laid_out_like_diffusers():
    with FakeTensorMode():
        q, k, v = (_bhsd(2, 40, 3, 16).to(FP8) for _ in range(3))
        scale = torch.ones(1, 1, 1, 1)
        out = torch.ops.flux_triton.cudnn_sdpa_fp8(q, k, v, scale, scale, scale, scale)
        attended = fp8_sdpa(*(_bhsd(2, 40, 3, 16, dtype=torch.bfloat16) for _ in range(3)))
    assert (out.shape, out.dtype) == ((2, 3, 40, 16), FP8)
    assert (attended.shape, attended.dtype) == ((2, 3, 40, 16), torch.bfloat16)
    assert out.transpose(1, 2).is_contiguous() and attended.transpose(1, 2).is_contiguous()


def cudnn_contract(q8, k8, v8, descale_q, descale_k, descale_v, scale_o):
    """What cuDNN's sdpa_fp8 computes (its docs and its tests' reference), in fp32: softmax(Q K^T / sqrt(d)) V of
    the descaled inputs, O stored as e4m3 ``O * scale_o`` (laid out as the op lays it out)."""
    out = F.scaled_dot_product_attention(q8.float() * descale_q, k8.float() * descale_k, v8.float() * descale_v)
    return (out * scale_o).transpose(1, 2).contiguous().transpose(1, 2).to(FP8)


def test_fp8_sdpa_scales_agree_with_cudnns_contract():
    """The quantization bookkeeping around the kernel (scales, descales, O's scale and dequantization) on the CPU,
    with the kernel replaced by its documented contract: close to fp32 attention, off only by the e4m3 rounding."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (_bhsd(1, 512, 2, 64, generator=generator).bfloat16() for _ in range(3))
    out = fp8_sdpa(q, k, v, kernel=cudnn_contract)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16)
    assert 1e-3 < inputs.rel_l2(out, expected) < FP8_ATTENTION_REL_L2
    # the magnitudes quantization divides out come back: O is linear in v, and a larger q sharpens the softmax
    assert inputs.rel_l2(fp8_sdpa(q, k, 10 * v, kernel=cudnn_contract), 10 * expected) < FP8_ATTENTION_REL_L2
    assert inputs.rel_l2(fp8_sdpa(2 * q, k, v, kernel=cudnn_contract), expected) > 0.5


def test_torch_compile_sees_the_cudnn_call_as_one_op_and_the_cpu_is_refused_when_it_runs():
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(fp8_sdpa, backend=backend, fullgraph=True)
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=DEVICE_ERROR):
        compiled(q, q, q)
    torch._dynamo.reset()
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert sum("flux_triton.cudnn_sdpa_fp8" in target for target in targets) == 1, targets


def test_fp8_cudnn_is_refused_on_the_cpu(model_root):
    transformer = load_tiny(model_root, "tiny-flux-dev")
    assert Speedups(attention_backend="fp8_cudnn").attention_backend == "fp8_cudnn"
    with pytest.raises(ValueError, match=DEVICE_ERROR + r"; got cpu"):
        apply_speedups(transformer, Speedups(attention_backend="fp8_cudnn"))


def test_fp8_cudnn_is_refused_with_context_parallelism(model_root):
    transformer, ulysses = load_tiny(model_root, "tiny-flux-dev"), ParallelSettings.named("ulysses2")
    with pytest.raises(ValueError, match="fp8_cudnn: context parallelism splits attention inside diffusers'"):
        apply_speedups(transformer, Speedups(attention_backend="fp8_cudnn"), parallel=ulysses)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-qkv"])
def test_the_processor_with_sdpa_is_bitwise_diffusers_processor(model_root, fused):
    """The only difference from diffusers' FluxAttnProcessor is the attention kernel: with plain SDPA in its place
    (diffusers' native backend calls the same), a step is bitwise the same, for joint and single blocks alike."""
    transformer = load_tiny(model_root, "tiny-flux-dev")
    transformer.set_attention_backend("native")  # diffusers keeps the last backend set process-wide
    if fused:
        fuse_qkv_projections(transformer)
    step = inputs.random_step(DitSignature.from_config(transformer.config, torch.float32), batch=2, seed=5)
    expected = call.reference_call(transformer, step)
    assert set_attention(transformer, F.scaled_dot_product_attention) == 2
    assert isinstance(transformer.single_transformer_blocks[0].attn.processor, FluxFp8AttnProcessor)
    assert torch.equal(call.reference_call(transformer, step), expected)


@pytest.mark.gpu
def test_fp8_sdpa_on_hopper_is_close_to_fp32_attention_and_follows_its_inputs():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN's FP8 attention needs compute capability 9.0+")
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (_bhsd(2, 1536, 24, 128, device="cuda", generator=generator).bfloat16() for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = fp8_sdpa(q, k, v)
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16) and out.transpose(1, 2).is_contiguous()
    assert inputs.rel_l2(out, expected) < FP8_ATTENTION_REL_L2
    assert inputs.rel_l2(torch.compile(fp8_sdpa, fullgraph=True)(q, k, v), expected) < FP8_ATTENTION_REL_L2
    assert inputs.rel_l2(fp8_sdpa(q, v, k), expected) > 0.5  # k and v swapped
    assert inputs.rel_l2(fp8_sdpa(2 * q, k, v), expected) > 0.5  # sharper softmax: the descales are honoured
    q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
    arguments = (q8, k8, v8, *[torch.ones(1, 1, 1, 1, device="cuda")] * 4)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")  # test_schema compares inputs with allclose: not FP8
    torch.library.opcheck(torch.ops.flux_triton.cudnn_sdpa_fp8.default, arguments, test_utils=checks)


@pytest.mark.gpu
def test_fp8_cudnn_speedup_runs_a_compiled_flux_model_on_hopper():
    """The served path end to end on a small FLUX model with FLUX's head dim (2 heads of 128): the processors
    swapped, regional compile with dynamic shapes around the op, close to the fp32 answer of the same weights."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN's FP8 attention needs compute capability 9.0+")
    from diffusers import FluxTransformer2DModel

    from flux_triton.model.presets import TINY_PRESETS

    torch.manual_seed(0)
    config = {**TINY_PRESETS["tiny-flux-dev"], "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56]}
    transformer = FluxTransformer2DModel(**config).eval().to("cuda", torch.bfloat16)
    signature = DitSignature.from_config(transformer.config, torch.bfloat16)
    step = inputs.random_step(signature, height=512, width=512, text_tokens=512, device="cuda")  # 1536 tokens
    floats = {name: getattr(step, name).float() for name in ("hidden_states", "pooled_projections",
                                                            "encoder_hidden_states")}  # fmt: skip
    transformer.float()  # bf16 -> fp32 -> bf16 round-trips exactly
    with torch.inference_mode():
        expected = call.reference_call(transformer, step.replace(**floats))
    transformer.to(torch.bfloat16)
    with torch.inference_mode():
        eager = call.reference_call(transformer, step)
    compiled = apply_speedups(transformer, Speedups("fp8_cudnn", compile="regional"))
    assert isinstance(transformer.transformer_blocks[0].attn.processor, FluxFp8AttnProcessor)
    with torch.inference_mode():
        fp8 = call.reference_call(compiled, step)
    # an e4m3 emulation of the kernel (CPU, 256x256) leaves the error at eager bf16's, 4.0e-2 (bf16 rounding dominates)
    assert not torch.equal(fp8, eager)
    assert inputs.rel_l2(fp8, expected) < 1.5 * inputs.rel_l2(eager, expected)
