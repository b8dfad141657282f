"""Step caches across context-parallel ranks (``cache`` with ``parallel: ulysses``, 2 CPU ranks over gloo): every
rank runs the same diffusers hooks in the same cache context and takes the same decision. A schedule-based cache
(MagCache) decides alike on every rank as it is: the served cached loop equals diffusers' own context-parallel loop
under the same cache bit for bit. First-block caching decides on the head block's residual, of which each rank holds
a shard: the ranks decide on their shards together (diffusers' own context-parallel loop cannot be the reference
there: its ranks would decide apart), and the served loop is within 1e-5 of single-process diffusers with the same
cache, whose decisions it then makes. A sequence's cache state is freed on every rank when it ends."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import diffusers_context_parallel_loop, embeds, generate, load_tiny, start_variants

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.model import store
from flux_triton.model.parallel import ParallelSettings
from flux_triton.pipeline import inputs
from flux_triton.pipeline.caching import build_cache

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks (a GPU host: test_gpu_parallel.py)")
CACHES = {"mag": {"kind": "mag"}, "first_block": {"kind": "first_block", "threshold": 0.5}}
LOOP = dict(num_inference_steps=28, guidance_scale=3.5)


@pytest.fixture(scope="module")
def cached_parallel_server(tmp_path_factory, model_root):
    """One server with a dit_transformer across 2 ranks per cache: ``parallel_<kind>``."""
    variants = {f"parallel_{kind}": {"cache": json.dumps(spec).replace('"', '\\"')} for kind, spec in CACHES.items()}
    server = start_variants(
        tmp_path_factory.mktemp("parallel-caching"), model_root, variants, ParallelSettings("ulysses", 2)
    )
    yield server
    server.stop()


def _served(server, kind: str, seed: int, cached: bool = True) -> torch.Tensor:
    with RemoteFluxTransformer(url=server.url, model_name=f"parallel_{kind}") as remote:
        if cached:
            remote.enable_cache(build_cache(CACHES[kind]))
        return generate(remote, "dev", seed=seed, **LOOP, **embeds(seed))


def test_a_cached_loop_across_ranks_equals_diffusers_context_parallel_loop(
    cached_parallel_server, model_root, tmp_path
):
    served = _served(cached_parallel_server, "mag", seed=41)
    model_dir = store.resolve_model_dir("tiny-flux-dev", model_root)
    reference = diffusers_context_parallel_loop(model_dir, embeds(41), CACHES["mag"], 28, 41, 64, tmp_path)
    assert torch.equal(served, reference)
    uncached = _served(cached_parallel_server, "mag", seed=41, cached=False)
    assert inputs.rel_l2(served, uncached) > 1e-3  # the cache skipped steps


def test_first_block_decisions_are_taken_on_every_rank_together(cached_parallel_server, model_root):
    served = _served(cached_parallel_server, "first_block", seed=42)
    local = load_tiny(model_root, "tiny-flux-dev")
    uncached = generate(local, "dev", seed=42, **LOOP, **embeds(42))
    local.enable_cache(build_cache(CACHES["first_block"]))
    expected = generate(local, "dev", seed=42, **LOOP, **embeds(42))
    assert inputs.rel_l2(expected, uncached) > 1e-3  # single-process diffusers skips steps with this threshold
    assert inputs.rel_l2(served, expected) < 1e-5 < inputs.rel_l2(served, uncached)


def test_a_second_generation_starts_from_a_clean_cache_on_every_rank(cached_parallel_server):
    """The first generation's sequence ended (and its state went on every rank): the second is the same loop."""
    assert torch.equal(_served(cached_parallel_server, "mag", seed=43), _served(cached_parallel_server, "mag", seed=43))
