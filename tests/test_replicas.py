"""Generations across replicas: the client pins each generation to one replica (a list of endpoints, or every
address of a headless Service's name) and, when a step finds its replica gone or without the sequence, opens the
sequence again on a replica that answers, with the prompt. Real servers on loopback (two replicas of one model,
one of another); the switch happens mid-generation."""

from __future__ import annotations

import concurrent.futures
import warnings

import pytest
import torch
from helpers import embeds, generate, load_tiny, start_server

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.replicas import Replicas, endpoint, split_endpoint, unreachable
from flux_triton.client.wire import ServerUnavailable, sequence_arguments
from flux_triton.contract.protocol import SEQUENCE_HEADER, SESSION_KEY_PARAMETER, SequenceStep
from flux_triton.pipeline.caching import build_cache
from flux_triton.serving.settings import MODEL_DIR_ENV

STEPS = 8
SWITCH_AFTER = 3  # the step index after which the generation's replica goes away
CACHE = {"kind": "taylorseer"}  # schedule-based: it skips blocks whatever the weights, so a restart shows


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, model_root):
    """Started together: two replicas of dit_transformer (tiny-flux-dev) that keep sessions and allow the step cache,
    and one serving another model (tiny-flux-schnell)."""
    parameters = {"dit_transformer": {"cache": CACHE["kind"]}}

    def start(name: str):
        env = {MODEL_DIR_ENV: "tiny-flux-schnell"} if name == "schnell" else None
        folder = tmp_path_factory.mktemp(name)
        return start_server(folder, model_root, ["dit_transformer"], env, parameters=parameters)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(start, ("replica-a", "replica-b", "schnell")))
        yield servers
        list(pool.map(lambda server: server.stop(), servers))


@pytest.fixture(scope="module")
def pair(fleet):
    return {server.url: server for server in fleet[:2]}


def _kwargs(seed: int) -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=3.5, **embeds(seed))


@pytest.mark.server
def test_a_generation_whose_replica_stops_finishes_on_the_other_bitwise(pair, tiny_dev):
    """No cache: a step on the other replica is the same computation, so the latents equal an uninterrupted run."""
    expected = generate(tiny_dev, "dev", seed=31, **_kwargs(31))
    holders = []
    with RemoteFluxTransformer(urls=tuple(pair)) as remote:
        assert remote.sessions and remote.replicas.several

        def stop_the_holder(pipe, index, t, kwargs):
            if index == SWITCH_AFTER - 1:  # after this step, the replica holding the sequence goes away
                holders.append(remote.generations.open["cond"].endpoint)
                pair[holders[0]].stop()
            return kwargs

        try:
            with pytest.warns(UserWarning, match="stopped answering; started it again from this step on") as caught:
                served = generate(remote, "dev", seed=31, callback_on_step_end=stop_the_holder, **_kwargs(31))
            (other,) = set(pair) - set(holders)
            (moved,) = [str(w.message) for w in caught if "stopped answering" in str(w.message)]
            assert f"on {other} (" in moved and "any step cache starts over" in moved
            assert remote.replicas.moved == 1 and remote.generations.restarted == 1
            assert not remote.generations.open  # ended on the replica that finished it
            # The next generation avoids the stopped replica and still runs.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                again = generate(remote, "dev", seed=31, **_kwargs(31))
        finally:
            for holder in holders:  # serve again for the other tests
                pair[holder].start()
    assert torch.equal(served, expected)
    assert torch.equal(again, expected)


@pytest.mark.server
def test_a_cached_step_that_reaches_another_replica_restarts_the_cache_there(pair, model_root):
    """With a step cache: step SWITCH_AFTER goes to the other replica (as an ingress that lost the pinning would
    send it); that replica does not know the sequence, so the client opens it there with the prompt, and the cache
    starts over at that step: the latents equal local diffusers with the cache reset at the same step."""
    config = build_cache(CACHE)
    local = load_tiny(model_root, "tiny-flux-dev")
    local.enable_cache(config)

    def reset_at_the_switch(pipe, index, t, kwargs):
        if index == SWITCH_AFTER - 1:
            pipe.transformer._reset_stateful_cache()
        return kwargs

    expected = generate(local, "dev", seed=32, callback_on_step_end=reset_at_the_switch, **_kwargs(32))
    assert not torch.equal(expected, generate(local, "dev", seed=32, **_kwargs(32)))  # the restart shows

    with RemoteFluxTransformer(urls=tuple(pair)) as remote:
        remote.enable_cache(config)

        def route_to_the_other(pipe, index, t, kwargs):
            if index == SWITCH_AFTER - 1:
                generation = remote.generations.open["cond"]
                (generation.endpoint,) = set(pair) - {generation.endpoint}
            return kwargs

        with pytest.warns(UserWarning, match="unknown to .*its step cache restarted"):
            served = generate(remote, "dev", seed=32, callback_on_step_end=route_to_the_other, **_kwargs(32))
        assert remote.generations.restarted == 1 and remote.replicas.moved == 0
    assert torch.equal(served, expected)


@pytest.mark.server
def test_an_endpoint_that_never_answers_is_passed_over(pair):
    url = next(iter(pair))
    dead = "127.0.0.1:9"  # nothing listens on loopback port 9
    with RemoteFluxTransformer(urls=(dead, url), connection_timeout_s=1) as remote:
        for turn in range(2):  # whichever replica each generation is offered first
            remote.replicas._turn = turn
            served = generate(remote, "dev", seed=33, num_inference_steps=2, guidance_scale=3.5, **embeds(33))
            assert served.isfinite().all()
        assert remote.replicas.connected(dead) is None and remote.replicas.connected(url) is not None
    with pytest.raises(RemoteDitError, match="transport is closed"):  # closed is closed: nothing reconnects
        generate(remote, "dev", seed=33, num_inference_steps=2, guidance_scale=3.5, **embeds(33))
    with pytest.raises(RemoteDitError, match=f"^Triton server at {dead} is not reachable"):  # alone: its own error
        RemoteFluxTransformer(url=dead, connection_timeout_s=1)


@pytest.mark.server
def test_a_replica_serving_another_model_is_not_used(pair, fleet, monkeypatch):
    url, schnell_server = next(iter(pair)), fleet[2]
    monkeypatch.setattr("flux_triton.client.replicas.random.randrange", lambda _: 0)  # the dev replica first
    with RemoteFluxTransformer(urls=(url, schnell_server.url)) as remote:
        assert remote.signature.guidance_embeds
        for _ in range(2):  # the second generation is offered the schnell replica first
            generate(remote, "dev", seed=34, num_inference_steps=2, guidance_scale=3.5, **embeds(34))
        assert remote.replicas.connected(schnell_server.url) is None and remote.generations.started == 2


def test_every_step_of_a_generation_names_its_sequence_in_a_header():
    """The header an ingress hashes on (deploy/k8s/components/istio): the sequence id, at every step; the session
    key goes in the body's parameters only, never in a header a proxy may log."""
    for step in (
        SequenceStep(7, True, key="secret"),
        SequenceStep(7, key="secret"),
        SequenceStep(7, end=True, key="secret"),
    ):
        arguments = sequence_arguments(step)
        assert arguments["headers"] == {SEQUENCE_HEADER: "7"}
        assert arguments["parameters"] == {SESSION_KEY_PARAMETER: "secret"}
    assert sequence_arguments(None) == {}


class _Opened:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def _replicas(settings: RemoteSettings, down: set[str] = frozenset(), addresses=None, clock=None) -> Replicas:
    def opener(own: RemoteSettings):
        assert not own.urls and not own.resolve  # a replica is opened as a single server
        if own.url in down:
            raise RemoteDitError(f"Triton server at {own.url} is not reachable")
        return _Opened(), _Opened()

    resolved = addresses or {}
    return Replicas(settings, opener, resolver=lambda host, port: resolved[host], clock=clock or (lambda: 0.0))


def test_new_generations_take_the_replicas_in_turn_and_skip_one_that_is_down():
    replicas = _replicas(RemoteSettings(urls=("a:1", "b:1", "c:1")), down={"b:1"})
    replicas._turn = 0
    assert [replicas.choose().url for _ in range(4)] == ["a:1", "c:1", "c:1", "a:1"]
    assert replicas.choose(avoid="a:1").url == "c:1"
    # A replica that stopped answering is passed over, its connection closed, and tried again later.
    now = [0.0]
    replicas = _replicas(RemoteSettings(urls=("a:1", "b:1")), clock=lambda: now[0])
    replicas._turn = 0
    opened = replicas.choose()
    replicas.mark_down("a:1")
    assert opened.client is None and replicas.connected("a:1") is None
    assert {replicas.choose().url for _ in range(3)} == {"b:1"}
    now[0] = 1e6
    assert {replicas.choose().url for _ in range(2)} == {"a:1", "b:1"}
    with pytest.raises(RemoteDitError, match="no replica of 'dit_transformer' answers"):
        _replicas(RemoteSettings(urls=("a:1", "b:1")), down={"a:1", "b:1"}).choose()


def test_a_headless_service_name_is_every_address_it_resolves_to_and_is_looked_up_again():
    now = [0.0]
    addresses = {"flux-triton-replicas": ["10.0.0.1", "10.0.0.2"]}
    settings = RemoteSettings(url="flux-triton-replicas:8000", resolve=True, resolve_interval_s=30)
    replicas = _replicas(settings, addresses=addresses, clock=lambda: now[0])
    assert replicas.several and replicas.endpoints() == ["10.0.0.1:8000", "10.0.0.2:8000"]
    addresses["flux-triton-replicas"] = ["10.0.0.2", "10.0.0.3", "fd00::4"]  # scaled; a pod replaced
    assert replicas.endpoints() == ["10.0.0.1:8000", "10.0.0.2:8000"]  # not due yet
    now[0] = 31.0
    assert replicas.endpoints() == ["10.0.0.2:8000", "10.0.0.3:8000", "[fd00::4]:8000"]
    assert split_endpoint("[fd00::4]:8000/v2x") == ("fd00::4", 8000, "/v2x") and endpoint("fd00::4", 1) == "[fd00::4]:1"
    # A real name: localhost resolves to a loopback address.
    real = Replicas(RemoteSettings(url="localhost:8000", resolve=True), lambda own: (_Opened(), _Opened()))
    assert any(url in ("127.0.0.1:8000", "[::1]:8000") for url in real.endpoints())


def test_settings_for_several_replicas_are_checked():
    with pytest.raises(ValueError, match="not both"):
        RemoteSettings(urls=("a:1",), resolve=True)
    with pytest.raises(ValueError, match="several replicas need http"):
        RemoteSettings(urls=("a:1", "b:1"), transport="shm")
    assert RemoteSettings(urls=["a:1", "b:1"]).urls == ("a:1", "b:1")
    assert not Replicas(RemoteSettings(urls=("a:1",)), lambda own: (None, None)).several
    assert unreachable(ServerUnavailable("refused")) and unreachable(RemoteDitError("not ready"))
    assert not unreachable(ValueError("a bad request"))
