"""Generation sessions through a real server: one sequence per cache context of a pipeline call, the
prompt sent with its first step only. Served loops equal stateless ones and local diffusers bit for bit;
sequences are freed at END, on error and when idle, reclaimed least recently used first when a START finds the
model or its client at their limit, so they never run out; a sequence takes steps only from the client that
started it; a bad step of a sequence gets a clear 400."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, HALVED_PROMPT, TEXT_TOKENS, embeds, generate, start_server
from tritonclient.utils import InferenceServerException

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.contract import PROMPT_INPUTS, InputError, Step, validate
from flux_triton.contract.protocol import SequenceStep
from flux_triton.pipeline import call, inputs
from flux_triton.serving.sessions import held_only

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, model_root):
    """dit_transformer with room for two live sequences, idle ones freed after 2 s."""
    parameters = {"dit_transformer": {"max_sessions": "2", "session_idle_s": "2"}}
    server = start_server(tmp_path_factory.mktemp("sessions"), model_root, ["dit_transformer"], parameters=parameters)
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("preset", "steps", "extra"),
    [("schnell", 4, {}), ("dev", 28, {"guidance_scale": 3.5}), ("dev", 4, {"true_cfg_scale": 4.0})],
    ids=["schnell-4", "dev-28", "dev-true-cfg"],
)
def test_a_served_loop_with_sessions_equals_stateless_and_local(request, model_root, preset, steps, extra):
    server = request.getfixturevalue("dev_server" if preset == "dev" else "schnell_server")
    local = request.getfixturevalue("tiny_dev" if preset == "dev" else "tiny_schnell")
    kwargs = dict(num_inference_steps=steps, **embeds(4), **extra)
    if "true_cfg_scale" in extra:
        negative = embeds(5)
        kwargs |= {"negative_prompt_embeds": negative["prompt_embeds"],
                   "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"]}  # fmt: skip
    with RemoteFluxTransformer(url=server.url) as remote:
        assert remote.sessions
        served = generate(remote, preset, seed=4, **kwargs)
        contexts = 2 if "true_cfg_scale" in extra else 1
        assert remote.generations.started == contexts and not remote.generations.open  # ended by the pipeline
        sent = remote.sent_bytes
    with RemoteFluxTransformer(url=server.url, sessions=False) as stateless:
        assert torch.equal(served, generate(stateless, preset, seed=4, **kwargs))
        full = stateless.sent_bytes
    assert torch.equal(served, generate(local, preset, seed=4, **kwargs))
    # The prompt (T5 and CLIP embeddings, text ids, guidance) goes with each context's first step only.
    prompt = TEXT_TOKENS * 32 * 4 + 32 * 4 + TEXT_TOKENS * 3 * 4 + (4 if preset == "dev" else 0)
    assert sent[:contexts] == full[:contexts]
    assert [full[i] - sent[i] for i in range(contexts, len(sent))] == [prompt] * (len(sent) - contexts)


def _step(seed: int, size: int = 64):
    return inputs.random_step(DEV, height=size, width=size, seed=seed)


KEY = "client-a"  # the session key of these tests' client


def _seq(sequence_id: int, start: bool = False, end: bool = False, key: str = KEY) -> SequenceStep:
    return SequenceStep(sequence_id, start, end, key)


def _closing() -> dict[str, torch.Tensor]:
    """An END-only request: zero image tokens, no prompt."""
    wire = Step.closing(DEV).wire()
    return {name: wire[name] for name in ("hidden_states", "timestep", "img_ids")}


def _send(client, wire: dict, sequence: SequenceStep, without_prompt: bool = False) -> torch.Tensor:
    if without_prompt:
        wire = {name: tensor for name, tensor in wire.items() if name not in PROMPT_INPUTS}
    return infer_step(client, "dit_transformer", wire, sequence=sequence)


def test_interleaved_and_concurrent_generations_each_equal_their_solo_run(dev_server, tiny_dev):
    """Two generations step by step in turn, then two at once (the batcher may merge them into one forward)."""
    steps = {name: [_step(seed).replace(timestep=torch.tensor([900.0 - 100 * i])) for i, seed in enumerate(seeds)]
             for name, seeds in (("a", (1, 2, 3)), ("b", (4, 5, 6)))}  # fmt: skip
    prompts = {"a": _step(10), "b": _step(11)}
    for name, prompt in prompts.items():  # each generation keeps its own prompt
        steps[name] = [s.replace(**{k: getattr(prompt, k) for k in PROMPT_INPUTS}) for s in steps[name]]
    expected = {name: [call.reference_call(tiny_dev, s) for s in steps[name]] for name in steps}
    with httpclient.InferenceServerClient(dev_server.url) as client:
        ids = {"a": 101, "b": 202}
        for index in range(3):
            for name in ("a", "b"):
                sequence = _seq(ids[name], start=index == 0, end=index == 2)
                served = _send(client, steps[name][index].wire(), sequence, without_prompt=index > 0)
                assert torch.equal(served, expected[name][index]), (name, index)

    def run(name: str, sequence_id: int) -> list[torch.Tensor]:
        with httpclient.InferenceServerClient(dev_server.url) as client:
            return [_send(client, steps[name][i].wire(), _seq(sequence_id, i == 0, i == 2), i > 0)
                    for i in range(3)]  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = {(name, k): pool.submit(run, name, 1000 + 10 * k + ord(name)) for name in ("a", "b") for k in range(2)}
    for (name, _), future in runs.items():
        for served, wanted in zip(future.result(), expected[name], strict=True):
            assert torch.allclose(served, wanted, rtol=1e-5, atol=1e-6)


def _refused(client, wire, sequence, match: str, without_prompt: bool = True) -> None:
    with pytest.raises(InferenceServerException, match=match) as refused:
        _send(client, wire, sequence, without_prompt)
    assert "400" in str(refused.value.status()) or refused.value.status() == "400"


def test_sequences_are_freed_at_end_on_error_and_when_idle(small_server, tiny_dev):
    step = _step(7)
    expected = call.reference_call(tiny_dev, step)
    unknown = "sequence 5: unknown or expired"
    with httpclient.InferenceServerClient(small_server.url) as client:
        # END frees it: the next step of that id is unknown.
        assert torch.equal(_send(client, step.wire(), _seq(5, start=True)), expected)
        assert torch.equal(_send(client, step.wire(), _seq(5, end=True), without_prompt=True), expected)
        _refused(client, step.wire(), _seq(5), unknown)
        # A failed step frees it.
        _send(client, step.wire(), _seq(5, start=True))
        _refused(client, step.replace(timestep=torch.tensor([float("nan")])).wire(), _seq(5), "finite")
        _refused(client, step.wire(), _seq(5), unknown)
        # Idle past session_idle_s frees it.
        _send(client, step.wire(), _seq(5, start=True))
        time.sleep(2.5)
        _refused(client, step.wire(), _seq(5), unknown)
        # The same id starts clean, with another prompt, and answers as a stateless step of that prompt.
        other = step.replace(encoder_hidden_states=_step(8).encoder_hidden_states)
        assert torch.equal(_send(client, other.wire(), _seq(5, start=True)), call.reference_call(tiny_dev, other))
        assert torch.equal(
            _send(client, other.wire(), _seq(5), without_prompt=True), call.reference_call(tiny_dev, other)
        )
        # At most max_sessions (2) live: a third START reclaims the least recently used one; an END-only step
        # ends one.
        _send(client, step.wire(), _seq(6, start=True))
        _send(client, step.wire(), _seq(5), without_prompt=True)  # 6 is now the least recently used
        assert torch.equal(_send(client, step.wire(), _seq(7, start=True)), expected)
        _refused(client, step.wire(), _seq(6), "sequence 6: unknown or expired")
        assert torch.equal(
            _send(client, other.wire(), _seq(5), without_prompt=True), call.reference_call(tiny_dev, other)
        )
        closing = _closing()
        assert infer_step(client, "dit_transformer", closing, sequence=_seq(7, end=True)).shape == (1, 0, 4)
        _refused(client, step.wire(), _seq(7), "sequence 7: unknown or expired")
        assert torch.equal(_send(client, step.wire(), _seq(0)), expected)  # stateless, as ever
        infer_step(client, "dit_transformer", closing, sequence=_seq(5, end=True))  # leave none live


def test_bad_steps_of_a_sequence_name_what_is_wrong(small_server, tiny_dev):
    step = _step(9)
    with httpclient.InferenceServerClient(small_server.url) as client:
        _refused(client, step.wire(), _seq(31), "sequence 31: unknown or expired")  # never started
        _refused(client, step.wire(), _seq(32, start=True),
                 "encoder_hidden_states: missing at the START of sequence 32")  # fmt: skip
        _send(client, step.wire(), _seq(33, start=True))
        bigger = _step(9, size=128)
        _refused(client, bigger.wire(), _seq(33), "a sequence keeps its shapes")
        _refused(client, step.wire(), _seq(33), "sequence 33: unknown or expired")  # freed by the error
        # A stateless step must carry the prompt.
        wire = {k: v for k, v in step.wire().items() if k != "encoder_hidden_states"}
        with pytest.raises(InferenceServerException, match="encoder_hidden_states: missing required input"):
            infer_step(client, "dit_transformer", wire)
        assert torch.equal(_send(client, step.wire(), _seq(0)), call.reference_call(tiny_dev, step))


def test_the_client_starts_a_sequence_again_when_the_server_lost_it(small_server, tiny_dev):
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, **embeds(12))
    expected = generate(tiny_dev, "dev", seed=12, **kwargs)
    with RemoteFluxTransformer(url=small_server.url) as remote:
        pipe_steps = []
        original = remote.router._on

        def slow(endpoint, slot, tensors, sequence=None):  # the second step comes after the server's idle timeout
            pipe_steps.append(sequence)
            if len(pipe_steps) == 2:
                time.sleep(2.5)
            return original(endpoint, slot, tensors, sequence)

        remote.router._on = slow
        with pytest.warns(UserWarning, match="started it again"):
            served = generate(remote, "dev", seed=12, **kwargs)
        assert remote.generations.restarted == 1
    assert torch.equal(served, expected)


def test_a_sequence_takes_steps_only_from_the_client_that_started_it(dev_server, tiny_dev):
    """Another client that learns the sequence id (it travels in a header) cannot step on it, end it or start it
    again: each is refused by name, and the owner's next step is what diffusers answers."""
    step, attack = _step(21), _step(22)
    later = {name: tensor for name, tensor in step.wire().items() if name not in PROMPT_INPUTS}
    with httpclient.InferenceServerClient(dev_server.url) as client:
        _send(client, step.wire(), _seq(51, start=True))
        attempts = [(_seq(51, key="other"), attack.wire()), (_seq(51, start=True, key="other"), attack.wire()),
                    (_seq(51, end=True, key="other"), _closing())]  # fmt: skip
        for sequence, wire in attempts:
            with pytest.raises(InferenceServerException, match="sequence 51: session_key does not match"):
                infer_step(client, "dit_transformer", wire, sequence=sequence)
        _refused(client, step.wire(), SequenceStep(52, start=True), "session_key: missing at the START of sequence 52",
                 without_prompt=False)  # fmt: skip
        assert torch.equal(_send(client, later, _seq(51)), call.reference_call(tiny_dev, step))
        infer_step(client, "dit_transformer", _closing(), sequence=_seq(51, end=True))


SESSION_MODELS = {"dit_transformer": 64, "flux_dit": 256}  # model: image size (the engine's profile starts at 256)


@pytest.mark.parametrize("model", list(SESSION_MODELS))
def test_sessions_never_run_out(supervised, model):
    """Through ``python -m flux_triton serve`` (64 sessions, 8 per client): 200 clients in a row, each starting one
    generation and leaving without ending it, are all served; then one client opening 64 sequences keeps only its
    last 8 and blocks nobody."""
    step = _step(23, size=SESSION_MODELS[model])
    later = {name: tensor for name, tensor in step.wire().items() if name not in PROMPT_INPUTS}
    with httpclient.InferenceServerClient(supervised.url) as client:
        for index in range(200):
            key = f"client-{index}"
            for sequence, wire in (
                (_seq(1000 + index, start=True, key=key), step.wire()),
                (_seq(1000 + index, key=key), later),
            ):
                assert infer_step(client, model, wire, sequence=sequence).shape == step.hidden_states.shape
        for index in range(64):
            infer_step(client, model, step.wire(), sequence=_seq(2000 + index, start=True, key="greedy"))
        assert infer_step(client, model, step.wire(), sequence=_seq(3000, start=True, key="modest")).shape
        with pytest.raises(InferenceServerException, match="sequence 2055: unknown or expired"):
            infer_step(client, model, later, sequence=_seq(2055, key="greedy"))
        for sequence_id, key in [(2056 + i, "greedy") for i in range(8)] + [(3000, "modest")]:
            infer_step(client, model, later, sequence=_seq(sequence_id, key=key))
            infer_step(client, model, _closing(), sequence=_seq(sequence_id, end=True, key=key))


def test_a_prompt_changed_in_place_between_steps_is_sent_again(dev_server, tiny_dev):
    """A callback that scales ``prompt_embeds`` in place after the first step: the same tensor object with new
    values goes to the server again, and the served loop equals local diffusers doing the same."""

    def run(transformer) -> torch.Tensor:
        return generate(transformer, "dev", seed=26, num_inference_steps=4, guidance_scale=3.5, **embeds(26),
                        **HALVED_PROMPT)  # fmt: skip

    expected = run(tiny_dev)
    with RemoteFluxTransformer(url=dev_server.url) as remote:
        served = run(remote)
        prompt_steps = [sent > 1000 for sent in remote.sent_bytes]
    assert torch.equal(served, expected)
    assert prompt_steps == [True, True, False, False]  # the first step, and the one after the change


def test_a_prompt_is_moved_to_the_host_once_while_the_pipeline_passes_it_unchanged():
    """A pipeline whose prompt is not already on the host in the model's dtype (on a GPU; here float64) gets it moved
    once per cache context, not every step, so the session sees the same tensor and sends nothing; changed in place,
    it is moved again."""
    from flux_triton.pipeline.stand_in import StandInTransformer

    stand_in = StandInTransformer(DEV, "dit_transformer")
    step = inputs.random_step(DEV, seed=3)
    prompt = step.encoder_hidden_states.double()

    def hosted(context: str, text: torch.Tensor) -> torch.Tensor:
        with stand_in.cache_context(context):
            call = step.replace(encoder_hidden_states=text)
            return stand_in.step(call.hidden_states, call.timestep / 1000, call.pooled_projections, text, call.txt_ids,
                                 call.img_ids, call.guidance).encoder_hidden_states  # fmt: skip

    first, negative = hosted("cond", prompt), hosted("uncond", prompt * 2)
    assert hosted("cond", prompt) is first and hosted("uncond", negative.double()) is not negative
    prompt.mul_(0.5)
    moved = hosted("cond", prompt)
    assert moved is not first and torch.equal(moved, prompt.float())


def test_a_held_prompt_is_checked_when_it_comes_not_with_every_step():
    """The prompt a session fills in was checked with the step that brought it (a step that fails frees its
    sequence), so a later step checks its shapes against the rest but not its values again."""
    wire = inputs.random_step(DEV, seed=4).wire()
    later = {name: wire[name] for name in ("hidden_states", "timestep", "img_ids")}
    assert held_only(later) == PROMPT_INPUTS and held_only(wire) == ()
    poisoned = {**wire, "encoder_hidden_states": torch.full_like(wire["encoder_hidden_states"], float("nan"))}
    with pytest.raises(InputError, match="encoder_hidden_states: expected finite values"):
        validate(poisoned, DEV)
    validate(poisoned, DEV, checked=held_only(later))  # as held: its values are not checked again
    with pytest.raises(InputError, match="timestep: expected finite values"):  # the step's own still are
        validate({**poisoned, "timestep": torch.full_like(wire["timestep"], float("nan"))}, DEV, checked=("txt_ids",))
    shorter = {**wire, "txt_ids": wire["txt_ids"][:, 1:]}
    with pytest.raises(InputError, match="txt_ids: expected S="):  # and the held ones' shapes
        validate(shorter, DEV, checked=held_only(later))
