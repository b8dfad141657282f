"""Whole-step CUDA graphs: the transformer's forward captured once per input shape and replayed.

A compiled step still costs the host ~55 ms of Python and kernel launches per forward (more with context
parallelism's hooks and collectives); a small step waits on them. Replaying a captured graph launches the
whole step at once. Each distinct set of input shapes (batch, image tokens, text tokens) and dtypes is one
graph, captured on its first call after ``WARMUP_CALLS`` ordinary ones; the inputs are copied into the graph's
static buffers and its output copied out, so the graphs share one memory pool. Past ``max_graphs`` shapes a
step runs without a graph. Replays compute bitwise what the ordinary call computes (the same kernels).
With context parallelism every rank sees the same steps in the same order, so the ranks capture together
and the captured collectives pair up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

WARMUP_CALLS = 2  # a first call compiles and allocates (neither can be captured); a second settles the allocator
DEFAULT_MAX_GRAPHS = 16


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class GraphedTransformer:
    """Calls ``transformer`` (the keyword call of ``pipeline.call``) through one CUDA graph per input shape;
    everything else (``config``, ``dtype``...) is the transformer's."""

    def __init__(self, transformer, max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.transformer = transformer
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.calls: dict[tuple, int] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __getattr__(self, name):
        return getattr(self.__dict__["transformer"], name)

    def __call__(self, **kwargs):
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in kwargs.items() if name not in tensors}
        key = (*((name, tuple(t.shape), t.dtype) for name, t in tensors.items()), repr(sorted(others.items())))
        captured = self.graphs.get(key)
        if captured is None:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= WARMUP_CALLS or len(self.graphs) >= self.max_graphs:
                return self.transformer(**kwargs)
            captured = self.graphs[key] = self._capture(tensors, others)
        for name, tensor in tensors.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        return (captured.output.clone(),)

    def _capture(self, tensors: dict[str, torch.Tensor], others: dict) -> _Captured:
        inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: other threads' CUDA calls (NCCL's watchdog, Triton's) do not break the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            (output,) = self.transformer(**inputs, **others)
        return _Captured(graph, inputs, output)


def with_cuda_graphs(transformer, device: torch.device, max_graphs: int = DEFAULT_MAX_GRAPHS) -> GraphedTransformer:
    if torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device; this model runs on {device}")
    return GraphedTransformer(transformer, max_graphs)
