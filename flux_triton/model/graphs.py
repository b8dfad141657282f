"""Whole-step CUDA graphs: a step captured once per input shape and replayed.

A compiled step still costs the host ~55 ms of Python and kernel launches per forward (more with context
parallelism's hooks and collectives); a small step waits on them. Replaying a captured graph launches the
whole step at once. Each distinct set of input shapes (batch, image tokens, text tokens) and dtypes is one
graph, captured on its first call after ``WARMUP_CALLS`` ordinary ones; the inputs are copied into the graph's
static buffers and its output copied out, so the graphs share one memory pool. Past ``max_graphs`` shapes a
step runs without a graph. Replays compute bitwise what the ordinary call computes (the same kernels).
With context parallelism every rank sees the same steps in the same order, so the ranks capture together
and the captured collectives pair up.

``GraphedTransformer`` wraps the transformer's keyword call (``dit_transformer``), ``GraphedEngine`` an engine's
call (``dit_engine``'s AOTI runners). With a step cache the whole step cannot be one graph (the cache hooks decide
on the host, per step, which blocks run): ``graph_cached_regions`` captures instead each forward a cache hook wraps,
per input shape, and each module the step runs around the blocks (embedders, rotary embedding, output layers); the
hooks run between the replays; a block that runs is a replay, a skipped one costs nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flux_triton.pipeline.internals import flatten, hooked_block_forwards, unflatten, unhooked_step_edges

WARMUP_CALLS = 2  # a first call compiles and allocates (neither can be captured); a second settles the allocator
DEFAULT_MAX_GRAPHS = 16
Tensors = Mapping[str, torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: object  # a tensor, or a tuple or list of tensors (and None)


def _cloned(output):
    if isinstance(output, tuple | list):
        return type(output)(_cloned(item) for item in output)
    return output.clone() if isinstance(output, torch.Tensor) else output


class ShapeGraphs:
    """``run(tensors, fn, key)``: ``fn(tensors)`` (a tensor or a tuple of tensors, all on one GPU), replayed from
    the graph of the tensors' shapes and dtypes (and ``key``) once captured. Graphs that always replay one after
    another on one stream (a step's blocks) may share a memory ``pool`` and their static input buffers
    (``shared_inputs``, by shapes and dtypes): each replay copies its inputs in first."""

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS, capture_mode: str = "thread_local", pool=None,
                 shared_inputs: dict | None = None):  # fmt: skip
        self.max_graphs, self.capture_mode = max_graphs, capture_mode
        self.graphs: dict[tuple, _Captured] = {}
        self.calls: dict[tuple, int] = {}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.shared_inputs = shared_inputs

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, tensors: Tensors, fn: Callable[[Tensors], torch.Tensor], key: str = "") -> torch.Tensor:
        shape_key = (*((name, tuple(t.shape), t.dtype) for name, t in tensors.items()), key)
        captured = self.graphs.get(shape_key)
        if captured is None:
            self.calls[shape_key] = self.calls.get(shape_key, 0) + 1
            if self.calls[shape_key] <= WARMUP_CALLS or len(self.graphs) >= self.max_graphs:
                return fn(tensors)
            captured = self.graphs[shape_key] = self._capture(tensors, fn, shape_key[:-1])
        for name, tensor in tensors.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return _cloned(captured.output)

    def _capture(self, tensors: Tensors, fn: Callable[[Tensors], torch.Tensor], inputs_key: tuple) -> _Captured:
        if self.shared_inputs is None:
            inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        else:
            inputs = self.shared_inputs.setdefault(inputs_key, {name: t.clone() for name, t in tensors.items()})
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local (the default): other threads' CUDA calls (NCCL's watchdog, Triton's) do not break it
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=self.capture_mode):
            output = fn(inputs)
        return _Captured(graph, inputs, output)


class GraphedTransformer:
    """Calls ``transformer`` (the keyword call of ``pipeline.call``) through ``ShapeGraphs``; everything else
    (``config``, ``dtype``...) is the transformer's."""

    def __init__(self, transformer, max_graphs: int = DEFAULT_MAX_GRAPHS, capture_mode: str = "thread_local"):
        self.transformer = transformer
        self.graphs = ShapeGraphs(max_graphs, capture_mode)

    def __getattr__(self, name):
        return getattr(self.__dict__["transformer"], name)

    def __call__(self, **kwargs):
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in kwargs.items() if name not in tensors}
        forward = lambda inputs: self.transformer(**inputs, **others)[0]  # noqa: E731
        return (self.graphs.run(tensors, forward, repr(sorted(others.items()))),)


class GraphedEngine:
    """An engine's ``run(tensors) -> noise_pred`` (``dit_engine``) through ``ShapeGraphs``, its inputs first moved to
    ``device``."""

    def __init__(self, engine: Callable[[Tensors], torch.Tensor], device: torch.device, max_graphs=DEFAULT_MAX_GRAPHS):
        self.engine, self.device = engine, device
        self.graphs = ShapeGraphs(max_graphs)

    def __call__(self, tensors: Tensors) -> torch.Tensor:
        return self.graphs.run({name: tensor.to(self.device) for name, tensor in tensors.items()}, self.engine)


class GraphedForward:
    """A forward called as ``forward(*args, **kwargs)`` (a hooked block's: tensors, a tuple of rotary tensors,
    ``None``) through ``ShapeGraphs``; arguments other than tensors are part of the graph's key."""

    def __init__(self, forward: Callable, graphs: ShapeGraphs):
        self.forward, self.graphs = forward, graphs

    def __call__(self, *args, **kwargs):
        leaves, spec = flatten((args, kwargs))
        tensors = {str(i): leaf for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}
        others = [(i, leaf) for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)]

        def forward(inputs: Tensors):
            filled = list(leaves)
            for name, tensor in inputs.items():
                filled[int(name)] = tensor
            call_args, call_kwargs = unflatten(filled, spec)
            return self.forward(*call_args, **call_kwargs)

        return self.graphs.run(tensors, forward, repr((spec, others)))


def graph_cached_regions(transformer, device: torch.device, max_graphs: int = DEFAULT_MAX_GRAPHS) -> int:
    """Capture each forward that a step cache's hook wraps inside ``transformer``'s repeated blocks (MagCache and
    first-block caching wrap every block, TaylorSeer the attention modules), and each unhooked module a step runs
    around the blocks (left eager, their many small kernels would leave the GPU waiting on the host for a few
    milliseconds a step), per input shape, in one memory pool with shared input buffers; the hooks' decisions stay
    on the host between replays. Call it after the cache is enabled (and after ``compile_regions``, whose compiled
    forwards are what is captured). Returns how many forwards it wraps."""
    check_cuda(device)
    pool, shared_inputs = torch.cuda.graph_pool_handle(), {}

    def graphed(forward: Callable) -> GraphedForward:
        return GraphedForward(forward, ShapeGraphs(max_graphs, pool=pool, shared_inputs=shared_inputs))

    references, edges = hooked_block_forwards(transformer), unhooked_step_edges(transformer)
    for reference in references:
        reference.original_forward = graphed(reference.original_forward)
    for module in edges:
        module.forward = graphed(module.forward)
    return len(references) + len(edges)


def check_cuda(device: torch.device | str) -> None:
    if torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device; this model runs on {device}")


def with_cuda_graphs(transformer, device: torch.device, max_graphs: int = DEFAULT_MAX_GRAPHS) -> GraphedTransformer:
    check_cuda(device)
    return GraphedTransformer(transformer, max_graphs)
