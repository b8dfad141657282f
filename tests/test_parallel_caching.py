"""Step caches across context-parallel ranks (``cache`` with ``parallel: ulysses``, 2 CPU ranks over gloo): every
rank runs the same diffusers hooks in the same cache context and takes the same decision. A schedule-based cache
(MagCache) decides alike on every rank as it is: the served cached loop equals diffusers' own context-parallel loop
under the same cache bit for bit. First-block caching decides on the head block's residual, of which each rank holds
a shard: the ranks decide on their shards together (diffusers' own context-parallel loop cannot be the reference
there: its ranks would decide apart), and the served loop is within 1e-5 of single-process diffusers with the same
cache, whose decisions it then makes. A sequence's cache state is freed on every rank when it ends. After every
step the ranks compare how many cached blocks each ran, and a step where they differ fails on every rank."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import diffusers_context_parallel_loop, embeds, generate, load_tiny, start_variants

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.model import store
from flux_triton.model.parallel import CachedBlocks, CacheDecisionsDiverged, ParallelSettings
from flux_triton.pipeline import inputs
from flux_triton.pipeline.caching import build_cache

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks (a GPU host: test_gpu_parallel.py)")
CACHES = {"mag": {"kind": "mag"}, "first_block": {"kind": "first_block", "threshold": 0.5}}
LOOP = dict(num_inference_steps=28, guidance_scale=3.5)


@pytest.fixture(scope="module")
def cached_parallel_server(tmp_path_factory, model_root):
    """One server with a dit_transformer across 2 ranks per cache: ``parallel_<kind>``."""
    variants = {f"parallel_{kind}": {"cache": json.dumps(spec)} for kind, spec in CACHES.items()}
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


def test_every_cached_block_a_rank_runs_is_counted(model_root):
    """The count each rank compares after a step: one per block the cache let run (MagCache on tiny-flux-dev: two
    hooked blocks per full step, none on a skipped one)."""
    transformer = load_tiny(model_root, "tiny-flux-dev")
    transformer.enable_cache(build_cache(CACHES["mag"]))
    blocks = CachedBlocks(transformer)
    generate(transformer, "dev", seed=7, **LOOP, **embeds(7))
    assert blocks.count % 2 == 0 and 2 * 10 <= blocks.count < 2 * 28  # MagCache skipped some of the 28 steps


def _check_counts(rank: int, port: int, counts: list[int], outcomes) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(counts))
    from flux_triton.model.presets import build_tiny

    blocks = CachedBlocks(build_tiny("tiny-flux-dev"))  # no cache, so nothing hooked: the count is set by hand
    blocks.count = counts[rank]
    try:
        blocks.check(torch.device("cpu"), lambda tensor: dist.all_reduce(tensor, op=dist.ReduceOp.MAX))
        outcomes[rank] = "agreed"
    except CacheDecisionsDiverged as exc:
        outcomes[rank] = str(exc)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("counts", "agreed"), [([38, 38], True), ([38, 2], False), ([0, 2], False)])
def test_ranks_whose_caches_ran_other_blocks_fail_the_step_on_every_rank(counts, agreed):
    """Two gloo ranks compare how many cached blocks they ran: the same number passes; any other fails on both
    ranks, naming the counts (a rank's latents would otherwise diverge silently)."""
    import torch.multiprocessing as mp

    from flux_triton.deploy.server import free_port

    with mp.Manager() as manager:
        outcomes = manager.dict()
        mp.spawn(_check_counts, args=(free_port(), counts, outcomes), nprocs=2)
        results = dict(outcomes)
    if agreed:
        assert results == {0: "agreed", 1: "agreed"}
    else:
        message = f"decided differently: between {min(counts)} and {max(counts)} cached blocks ran this step"
        assert all(message in results[rank] for rank in (0, 1)), results
