"""FP8 (e4m3) attention on Hopper through NVIDIA's cuDNN frontend (``nvidia-cudnn-frontend``, module ``cudnn``):
its per-tensor-scaled ``sdpa_fp8`` forward.

``fp8_sdpa(query, key, value)`` computes what ``F.scaled_dot_product_attention`` does (no mask, not causal, softmax
scale 1/sqrt(head_dim)) for bf16 (or fp16) q/k/v. Each of q, k and v is quantized to e4m3 with one scale per
tensor, ``448 / amax``, computed on the GPU (no host sync); cuDNN takes the descales ``1 / scale``. On Hopper cuDNN
writes O only in FP8 (a bf16/fp16 O is Blackwell-only, cuDNN 9.13+), so O is written in e4m3 with the scale
``scale_v / O_HEADROOM`` (|O| <= amax(v): O is a convex combination of v's rows) and dequantized here.

The quantization and dequantization are plain torch ops, so ``torch.compile`` can fuse them with the neighbouring
kernels (RoPE before, the output projection's input after); only the cuDNN call is opaque to it: the
custom op ``flux_triton::cudnn_sdpa_fp8`` (FP8 q/k/v and their descales in, FP8 O out), with a fake
implementation for tracing. Its cuDNN graphs are built on first use, one per (shapes, strides, device), and kept.

``cudnn`` is imported on first use only; its wheel is optional (pyproject's ``fp8-attention`` group) and needs
``libcudnn.so.9``, which PyTorch's ``nvidia-cudnn-cu13`` wheel provides (see ``require_frontend``)."""

from __future__ import annotations

import enum
import functools
import math

import torch

from flux_triton.model.fp8 import FP8, FP8_MAX

FRONTEND_PACKAGE = "nvidia-cudnn-frontend"  # pinned in pyproject's fp8-attention group and gpu_host.sh
MIN_CAPABILITY = (9, 0)  # cuDNN's FP8 SDPA: Hopper and newer
O_HEADROOM = 2.0  # O's scale leaves 2x room over amax(v): FP8-rounded softmax weights may sum past 1


class _Uid(enum.IntEnum):
    """The cuDNN graph's operand ids (its variant pack is keyed by them)."""

    Q = 1
    K = 2
    V = 3
    OUT = 4
    DESCALE_Q = 5
    DESCALE_K = 6
    DESCALE_V = 7
    DESCALE_S = 8
    SCALE_S = 9
    SCALE_O = 10
    AMAX_S = 11
    AMAX_O = 12


_graphs: dict[tuple, tuple] = {}  # (device, shapes, strides) -> (built cuDNN graph, workspace bytes)
_handles: dict[int, object] = {}  # device index -> cudnn.Handle
_constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # device index -> (descale_s, scale_s)


def fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, kernel=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(query, key, value)`` with FP8 q/k/v, P and O inside (CUDA, sm_90+).

    Layout as SDPA's: ``(batch, heads, seq, head_dim)`` (BHSD), any strides; diffusers' ``(batch, seq, heads,
    head_dim)`` tensors transposed are read in place (another layout is copied into that one for cuDNN). The output
    has the query's dtype and shape and is laid out ``(batch, seq, heads, head_dim)`` in memory, so its transpose
    back is contiguous. ``kernel`` replaces ``cudnn_sdpa_fp8`` (same arguments; the tests pass a reference of
    cuDNN's contract to check the scales on the CPU)."""
    kernel = kernel or torch.ops.flux_triton.cudnn_sdpa_fp8
    arguments = kernel_arguments(query, key, value)
    return dequantize_output(kernel(*arguments), arguments).to(query.dtype)


def kernel_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``cudnn_sdpa_fp8``'s arguments for bf16 q/k/v: each in e4m3 with its descale, then O's scale."""
    (q8, descale_q), (k8, descale_k), (v8, descale_v) = quantize(query), quantize(key), quantize(value)
    return q8, k8, v8, descale_q, descale_k, descale_v, descale_v.reciprocal() / O_HEADROOM


def dequantize_output(out: torch.Tensor, arguments: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The kernel's e4m3 O back in float32, by the O scale among its ``arguments``."""
    return out.float() * arguments[-1].reciprocal()


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in e4m3 with one scale ``448 / amax(|x|)``, and its descale ``1 / scale`` as a ``(1, 1, 1, 1)``
    float32 tensor on ``x``'s device."""
    amax = x.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    scale = FP8_MAX / amax
    quantized = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale.reciprocal().reshape(1, 1, 1, 1)


@torch.library.custom_op("flux_triton::cudnn_sdpa_fp8", mutates_args=())
def cudnn_sdpa_fp8(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale_o: torch.Tensor,
) -> torch.Tensor:
    """cuDNN's ``sdpa_fp8`` forward: e4m3 BHSD q/k/v with their float32 descales in, e4m3 O scaled by ``scale_o``
    out (BHSD, laid out BSHD in memory); softmax scale 1/sqrt(head_dim), P quantized with scale 448."""
    require_fp8_attention(query.device)
    if {query.dtype, key.dtype, value.dtype} != {FP8}:
        raise ValueError(f"cudnn_sdpa_fp8 takes {FP8} q/k/v, got {query.dtype}, {key.dtype}, {value.dtype}")
    cudnn = require_frontend()
    q, k, v = (_bshd_memory(t) for t in (query, key, value))
    out = _empty_output(q, v)
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device):
        handle = _handle(cudnn, device)
        graph, workspace_size = _graph(cudnn, handle, device, q, k, v, out)
        cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
        descale_s, scale_s = _softmax_scales(device)
        amax = torch.empty(2, 1, 1, 1, device=q.device, dtype=torch.float32)  # required outputs, unused
        pack = {
            _Uid.Q: q,
            _Uid.K: k,
            _Uid.V: v,
            _Uid.OUT: out,
            _Uid.DESCALE_Q: descale_q.float().contiguous(),
            _Uid.DESCALE_K: descale_k.float().contiguous(),
            _Uid.DESCALE_V: descale_v.float().contiguous(),
            _Uid.DESCALE_S: descale_s,
            _Uid.SCALE_S: scale_s,
            _Uid.SCALE_O: scale_o.float().contiguous(),
            _Uid.AMAX_S: amax[0],
            _Uid.AMAX_O: amax[1],
        }
        workspace = torch.empty(workspace_size, device=q.device, dtype=torch.uint8)
        graph.execute({int(uid): tensor for uid, tensor in pack.items()}, workspace, handle=handle)
    return out


@cudnn_sdpa_fp8.register_fake
def _cudnn_sdpa_fp8_fake(query, key, value, descale_q, descale_k, descale_v, scale_o):
    return _empty_output(query, value)


def _bshd_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` (batch, heads, seq, head_dim) laid out (batch, seq, heads, head_dim) in memory, the layout of
    diffusers' tensors and of cuDNN's own FP8 SDPA tests; copied only if it is not already."""
    return t if t.transpose(1, 2).is_contiguous() else t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1]), dtype=FP8).transpose(1, 2)


def require_fp8_attention(device) -> None:
    """Raise unless ``device`` is a CUDA device of compute capability 9.0 or newer (cuDNN's FP8 SDPA)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"fp8_cudnn attention needs a CUDA GPU of compute capability 9.0+ (Hopper); got {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"fp8_cudnn attention needs a CUDA GPU of compute capability 9.0+ (Hopper); "
            f"{torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}"
        )


@functools.cache  # once per process: each attention call asks
def require_frontend():
    """The ``cudnn`` module of ``nvidia-cudnn-frontend``.

    On import it dlopens ``libcudnn.so.9``: from ``LD_LIBRARY_PATH`` first, then from ``nvidia/cudnn/lib`` under
    the interpreter's purelib (where PyTorch's ``nvidia-cudnn-cu13`` wheel puts it), then by soname. PyTorch's copy
    is loaded into the process first, so the soname fallback finds that same library if the wheel lives elsewhere
    (a cuDNN on ``LD_LIBRARY_PATH`` would still win: ``backend_version()`` tells which one is in use)."""
    torch.backends.cudnn.version()  # loads PyTorch's libcudnn.so.9
    try:
        import cudnn
    except ImportError as error:
        raise ImportError(
            f"fp8_cudnn attention needs NVIDIA's cuDNN frontend: pip install {FRONTEND_PACKAGE} "
            "(pinned in pyproject's fp8-attention group; benchmarks/gpu_host.sh carries its wheel)"
        ) from error
    return cudnn


def _handle(cudnn, device: int):
    if device not in _handles:
        _handles[device] = cudnn.create_handle()  # bound to the current device (the caller sets it)
    return _handles[device]


def _softmax_scales(device: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's S = softmax(Q K^T) lies in [0, 1]: quantized with the fixed scale 448 (its recipe without dropout)."""
    if device not in _constants:
        _constants[device] = tuple(
            torch.full((1, 1, 1, 1), value, device=f"cuda:{device}", dtype=torch.float32)
            for value in (1.0 / FP8_MAX, FP8_MAX)
        )
    return _constants[device]


def _graph(cudnn, handle, device: int, q, k, v, out) -> tuple:
    layout = tuple((tuple(t.shape), t.stride()) for t in (q, k, v, out))
    key = (device, layout)
    if key not in _graphs:
        _graphs[key] = _build_graph(cudnn, handle, q, k, v, out)
    return _graphs[key]


def _build_graph(cudnn, handle, q, k, v, out) -> tuple:
    """The inference ``sdpa_fp8`` graph (no softmax stats) over these tensors' shapes and strides; built and
    planned (heuristics A, then fallback). Returns it with its workspace size."""
    fp8, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def operand(uid: _Uid, tensor: torch.Tensor):
        return graph.tensor(name=uid.name, uid=int(uid), dim=list(tensor.shape), stride=list(tensor.stride()),
                            data_type=fp8)  # fmt: skip

    def scalar(uid: _Uid):
        return graph.tensor(name=uid.name, uid=int(uid), dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)

    o, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=operand(_Uid.Q, q),
        k=operand(_Uid.K, k),
        v=operand(_Uid.V, v),
        descale_q=scalar(_Uid.DESCALE_Q),
        descale_k=scalar(_Uid.DESCALE_K),
        descale_v=scalar(_Uid.DESCALE_V),
        descale_s=scalar(_Uid.DESCALE_S),
        scale_s=scalar(_Uid.SCALE_S),
        scale_o=scalar(_Uid.SCALE_O),
        generate_stats=False,
        attn_scale=1.0 / math.sqrt(q.shape[-1]),
        name="sdpa_fp8",
    )
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(fp8).set_uid(int(_Uid.OUT))
    for tensor, uid in ((amax_s, _Uid.AMAX_S), (amax_o, _Uid.AMAX_O)):
        tensor.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32).set_uid(int(uid))
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, graph.get_workspace_size()
