"""Step caches (diffusers' own hooks) per generation session, through a real server: a served loop with
``pipe.transformer.enable_cache(config)`` gives bitwise the latents of local ``FluxPipeline`` with the same
cache, each generation in its own cache context, whose state is dropped when its sequence ends."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading

import pytest
import torch
import tritonclient.http as httpclient
from helpers import CHECKOUT, DEV, embeds, generate, load_tiny, start_variants
from safetensors.torch import load_file, save_file
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.contract.protocol import SequenceStep
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline import inputs
from flux_triton.pipeline.caching import build_cache, cache_merges, describe_cache
from flux_triton.pipeline.internals import hooked_forward
from flux_triton.serving import caching
from flux_triton.serving.generate import ServedSteps
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings

KINDS = {
    "first_block": {"kind": "first_block", "threshold": 0.5},
    "mag": {"kind": "mag"},
    "taylorseer": {"kind": "taylorseer"},
}


SCHNELL_KINDS = ("first_block", "taylorseer")  # schnell-like 4 steps: MagCache's FLUX ratios are for 28 dev steps


def _setting(spec: dict) -> str:
    return spec["kind"] if len(spec) == 1 else json.dumps(spec)


@pytest.fixture(scope="module")
def caching_server(tmp_path_factory, model_root):
    """One server with a dit_transformer per cache setting: ``cached_<kind>`` (tiny-flux-dev) and
    ``cached_schnell_<kind>`` (tiny-flux-schnell)."""
    variants = {f"cached_{kind}": {"cache": _setting(spec)} for kind, spec in KINDS.items()}
    variants |= {f"cached_schnell_{kind}": {"cache": kind, "model_dir": "tiny-flux-schnell"} for kind in SCHNELL_KINDS}
    server = start_variants(tmp_path_factory.mktemp("caching"), model_root, variants)
    yield server
    server.stop()


@pytest.fixture(params=list(KINDS))
def cached_server(request, caching_server):
    """The server, the name of the dit_transformer that caches with the kind, and that cache's config."""
    return caching_server, f"cached_{request.param}", build_cache(KINDS[request.param])


def _local_loops(model_root, config, seed: int, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny dev model's dev loop in local diffusers: without a cache, then with the cache ``config``."""
    local = load_tiny(model_root, "tiny-flux-dev")
    uncached = generate(local, "dev", seed=seed, **kwargs)
    local.enable_cache(config)
    return uncached, generate(local, "dev", seed=seed, **kwargs)


@pytest.mark.server
def test_a_cached_served_loop_equals_local_diffusers_with_the_same_cache(cached_server, model_root):
    server, model, config = cached_server
    kwargs = dict(num_inference_steps=28, guidance_scale=3.5, **embeds(21))
    uncached, expected = _local_loops(model_root, config, 21, kwargs)
    with RemoteFluxTransformer(url=server.url, model_name=model) as remote:
        remote.enable_cache(config)
        served = generate(remote, "dev", seed=21, **kwargs)
        again = generate(remote, "dev", seed=21, **kwargs)  # a second generation starts from a clean cache
        remote.disable_cache()
        served_uncached = generate(remote, "dev", seed=21, **kwargs)
    assert torch.equal(served, expected)
    assert torch.equal(again, expected)
    assert torch.equal(served_uncached, uncached)
    if config.__class__.__name__ != "FirstBlockCacheConfig":  # schedule-based: they skip whatever the weights
        assert not torch.equal(expected, uncached)


@pytest.mark.server
def test_concurrent_true_cfg_generations_keep_their_own_cache(cached_server, model_root):
    server, model, config = cached_server
    negative = embeds(23)
    kwargs = dict(num_inference_steps=8, guidance_scale=3.5, true_cfg_scale=4.0, **embeds(22),
                  negative_prompt_embeds=negative["prompt_embeds"],
                  negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])  # fmt: skip
    local = load_tiny(model_root, "tiny-flux-dev")
    local.enable_cache(config)
    expected = generate(local, "dev", seed=22, **kwargs)

    def run(_: int) -> torch.Tensor:
        with RemoteFluxTransformer(url=server.url, model_name=model) as remote:
            remote.enable_cache(config)
            return generate(remote, "dev", seed=22, **kwargs)

    # Two generations at once on one server, their steps interleaved: each keeps its own cache state. MagCache's
    # steps in lockstep may share a forward (a batch of two rounds differently): within fp32 rounding then.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(2)))
    for served in results:
        if cache_merges(config):
            torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(served, expected)


@pytest.mark.server
def test_a_sequence_asking_for_another_cache_is_refused(cached_server):
    server, model, config = cached_server
    other = {"kind": "mag", "threshold": 0.3} if describe_cache(config)["kind"] != "mag" else {"kind": "taylorseer"}
    step = inputs.random_step(DEV, height=64, width=64, seed=3)
    with httpclient.InferenceServerClient(server.url) as client:
        for cache, message in [
            (json.dumps(other), "cache: this model caches with"),
            (json.dumps({"kind": "pyramid"}), "cache: cache kind 'pyramid' is not served"),
            (json.dumps({**describe_cache(config), "speed": 2}), "unknown parameter 'speed'"),
            ("{not json", "cache: "),
        ]:
            with pytest.raises(InferenceServerException, match=message):
                sequence = SequenceStep(41, start=True, key="k", cache=cache)
                infer_step(client, model, step.wire(), sequence=sequence)
        # The id was freed with the error: it starts again cleanly.
        infer_step(client, model, step.wire(), sequence=SequenceStep(41, start=True, end=True, key="k"))


@pytest.mark.server
def test_a_model_without_a_cache_refuses_enable_cache_per_sequence(dev_server):
    with RemoteFluxTransformer(url=dev_server.url) as remote:
        remote.enable_cache(build_cache({"kind": "mag"}))
        with pytest.raises(RemoteDitError, match="cache: this model caches with none"):
            generate(remote, "dev", seed=1, num_inference_steps=2, guidance_scale=3.5, **embeds(1))


def test_cache_state_is_dropped_when_its_sequence_ends_fails_or_expires(model_root):
    """In process: the hooks' state per context, counted, as sequences end, fail and expire."""
    settings = TransformerSettings(model_dir="tiny-flux-dev", cache="mag", session_idle_s=60)
    service = DitService(settings, model_root, torch.device("cpu"))
    step = inputs.random_step(service.signature, height=64, width=64, seed=5)
    cache = json.dumps(describe_cache(service.cache))

    def run(sequence_id: int, flags: int, tensors=None):
        sequence = SequenceStep.from_flags(
            sequence_id, flags, {"session_key": "k", "cache": cache if flags & 1 else ""}
        )
        return service.run([(tensors or step.wire(), sequence)])[0]

    for sequence_id in (1, 2, 3):
        assert isinstance(run(sequence_id, 1), torch.Tensor)
    assert caching.live_contexts(service.transformer) == {"1", "2", "3"}
    run(1, 2)  # END
    bad = {**step.wire(), "timestep": torch.tensor([[float("nan")]])}
    assert isinstance(run(2, 0, bad), Exception)  # a failed step
    assert caching.live_contexts(service.transformer) == {"3"}
    service.sessions._clock = lambda: float("inf")  # every sequence idle past the timeout
    run(0, 0)  # any request expires them
    assert caching.live_contexts(service.transformer) == set()
    assert len(service.sessions) == 0
    # A stateless request under the hooks leaves no state either.
    assert torch.equal(run(0, 0), service.run([(step.wire(), SequenceStep())])[0])
    assert caching.live_contexts(service.transformer) == set()


class Together:
    """Each step of ``count`` generations handed to the service in one batch, as Triton's dynamic batcher lists
    requests that arrive together (each generation a ``ServedSteps`` over ``infer`` in its own thread)."""

    def __init__(self, service: DitService, count: int):
        self.service, self.pending, self.answers = service, [], {}
        self.lock, self.barrier = threading.Lock(), threading.Barrier(count, action=self._run)

    def _run(self) -> None:
        results = self.service.run(self.pending)
        self.answers = {
            sequence.sequence_id: result for (_, sequence), result in zip(self.pending, results, strict=True)
        }
        self.pending = []

    def infer(self, tensors: dict, sequence: SequenceStep) -> torch.Tensor:
        with self.lock:
            self.pending.append((tensors, sequence))
        self.barrier.wait()
        answer = self.answers[sequence.sequence_id]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_magcache_generations_in_lockstep_share_every_forward(model_root):
    """Two MagCache generations whose steps arrive together: their contexts count the same steps, so each step is
    one forward of both (their states side by side, then each given its rows back), not two. Each generation stays
    within fp32 rounding of its own local cached loop, far from the uncached one; a context a step ahead never
    merges."""
    settings = TransformerSettings(model_dir="tiny-flux-dev", cache="mag", max_batch=4)
    service = DitService(settings, model_root, torch.device("cpu"))
    batches = []  # the batch of every forward

    def count(_module, _args, call: dict) -> None:
        batches.append(call["hidden_states"].shape[0])

    service.transformer.register_forward_pre_hook(count, with_kwargs=True)
    cache = json.dumps(describe_cache(service.cache))
    together = Together(service, 2)
    kwargs = dict(num_inference_steps=28, guidance_scale=3.5)

    def run(seed: int) -> torch.Tensor:
        steps = ServedSteps(service.signature, "dit_transformer", together.infer, cache)
        return generate(steps, "dev", seed=seed, **kwargs, **embeds(seed))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        served = dict(zip((24, 25), pool.map(run, (24, 25)), strict=True))
    assert batches == [2] * 28  # one forward a step for both
    for seed, latents in served.items():
        uncached, expected = _local_loops(model_root, service.cache, seed, {**kwargs, **embeds(seed)})
        torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
        assert inputs.rel_l2(latents, uncached) > 100 * inputs.rel_l2(latents, expected)
    step = inputs.random_step(service.signature, height=64, width=64, seed=5)
    start = {"session_key": "k", "cache": cache}
    service.run([(step.wire(), SequenceStep.from_flags(7, 1, start))])  # sequence 7 is a step ahead of 8
    batches.clear()
    service.run(
        [(step.wire(), SequenceStep.from_flags(7, 0, start)), (step.wire(), SequenceStep.from_flags(8, 1, start))]
    )
    assert batches == [1, 1]


@pytest.mark.server
def test_the_cli_runs_a_generation_with_a_cache(cached_server, model_root, tmp_path):
    server, model, config = cached_server
    prompt = embeds(24)
    save_file(prompt, tmp_path / "embeds.safetensors")
    output = tmp_path / "latents.safetensors"
    command = [
        sys.executable,
        "-m",
        "flux_triton.client",
        "--url",
        server.url,
        "--model",
        model,
        "--embeds",
        str(tmp_path / "embeds.safetensors"),
    ]
    command += ["--steps", "28", "--seed", "3", "--height", "64", "--width", "64", "--output", str(output)]
    done = subprocess.run([*command, "--cache", json.dumps(describe_cache(config))], cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    local = load_tiny(model_root, "tiny-flux-dev")
    local.enable_cache(config)
    expected = generate(local, "dev", seed=3, num_inference_steps=28, guidance_scale=3.5, **prompt)
    assert torch.equal(load_file(output)["latents"], expected)


@pytest.fixture(params=list(SCHNELL_KINDS))
def cached_schnell_server(request, caching_server):
    return caching_server, f"cached_schnell_{request.param}", build_cache({"kind": request.param})


@pytest.mark.server
def test_a_cached_schnell_loop_equals_local_diffusers(cached_schnell_server, model_root):
    server, model, config = cached_schnell_server
    kwargs = dict(num_inference_steps=4, **embeds(25))
    local = load_tiny(model_root, "tiny-flux-schnell")
    local.enable_cache(config)
    expected = generate(local, "schnell", seed=25, **kwargs)
    with RemoteFluxTransformer(url=server.url, model_name=model) as remote:
        remote.enable_cache(config)
        assert torch.equal(generate(remote, "schnell", seed=25, **kwargs), expected)


@pytest.mark.parametrize("kind", ["mag", "taylorseer"])
def test_regional_compile_runs_under_the_cache_hooks(kind, model_root):
    """compile regional with a cache: what each hook wraps is compiled (MagCache hooks the blocks, TaylorSeer
    their attention modules) and the cached loop matches eager diffusers with the same cache, up to the
    compiled kernels' rounding - far closer than to the uncached loop."""
    config = build_cache({"kind": kind})
    kwargs = dict(num_inference_steps=28, guidance_scale=3.5, **embeds(23))
    uncached, expected = _local_loops(model_root, config, 23, kwargs)
    compiled = load_tiny(model_root, "tiny-flux-dev")
    apply_speedups(compiled, Speedups(compile="regional"), config)
    wrapped = [hooked_forward(module) for module in compiled.modules() if hooked_forward(module) is not None]
    assert wrapped and all(hasattr(ref.original_forward, "_torchdynamo_orig_callable") for ref in wrapped)
    served = generate(compiled, "dev", seed=23, **kwargs)
    assert inputs.rel_l2(served, expected) < 1e-5 < inputs.rel_l2(uncached, expected)
    torch._dynamo.reset()


def test_a_cache_with_a_whole_model_compile_is_refused(model_root):
    with pytest.raises(ValueError, match=r"compile full: .* use compile regional with a cache"):
        DitService(TransformerSettings(model_dir="tiny-flux-dev", cache="mag", speedups=Speedups(compile="full")),
                   model_root, torch.device("cpu"))  # fmt: skip
