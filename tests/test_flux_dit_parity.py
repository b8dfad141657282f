"""flux_dit (ensemble -> dit_preprocess -> dit_engine on ONNX Runtime) through a real tritonserver
against diffusers, with the same scenarios as dit_transformer.

Tolerance (FP32 ONNX Runtime engine vs eager diffusers, CPU): one step within rtol 1e-5 and
atol 1e-5 (measured: ~5e-7 relative, see test_onnx_export); the denoising loops within 1e-4. The
engine is a different program (ONNX Runtime kernels, RoPE in float32), so results are close, not
bitwise equal. FP16/BF16/FP8 TensorRT engines are not run here (docs/engines.md states theirs).
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch
import tritonclient.http as httpclient
from helpers import BUSY_SIZE, DEV, HALVED_PROMPT, SCHNELL, TEXT_TOKENS, embeds, generate, infer_concurrently
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError
from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.wire import infer_step
from flux_triton.contract import PROMPT_INPUTS, Limits, Step
from flux_triton.contract.protocol import HELD_BY_ENGINE, SequenceStep
from flux_triton.pipeline import call, inputs, loop
from flux_triton.pipeline.caching import build_cache
from flux_triton.serving.merging import run_engine_requests
from flux_triton.serving.preprocess import Preprocessor
from flux_triton.serving.settings import PreprocessSettings

pytestmark = pytest.mark.server

TOL = {"rtol": 1e-5, "atol": 1e-5}
LOOP_TOL = {"rtol": 1e-4, "atol": 1e-4}
SIZE = {"height": 256, "width": 256}  # the profiles' minimum: 256 image tokens


def test_single_latent_matches_the_pipeline_call(dev_engine_server, http_client, tiny_dev):
    step = inputs.random_step(DEV, batch=1, seed=1, **SIZE)
    served = infer_step(http_client(dev_engine_server), "flux_dit", step.wire())
    expected = call.reference_call(tiny_dev, step)
    assert served.shape == expected.shape == step.hidden_states.shape
    torch.testing.assert_close(served, expected, **TOL)


@pytest.mark.parametrize("timestep", [0.0, 1.0, 137.25, 500.0, 999.5, 1000.0])
def test_timesteps_across_the_range(dev_engine_server, http_client, tiny_dev, timestep):
    step = inputs.random_step(DEV, timestep=timestep, seed=2, **SIZE)
    served = infer_step(http_client(dev_engine_server), "flux_dit", step.wire())
    torch.testing.assert_close(served, call.reference_call(tiny_dev, step), **TOL)
    # dit_preprocess scales by 1/1000: the timestep fed unscaled (or scaled twice) would not match.
    wrong = step.replace(timestep=step.timestep / 1000)
    if timestep > 0:
        assert not torch.allclose(served, call.reference_call(tiny_dev, wrong), atol=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5, 7.0])
def test_guidance_scales(dev_engine_server, http_client, tiny_dev, guidance_scale):
    step = inputs.random_step(DEV, guidance_scale=guidance_scale, seed=3, **SIZE)
    served = infer_step(http_client(dev_engine_server), "flux_dit", step.wire())
    torch.testing.assert_close(served, call.reference_call(tiny_dev, step), **TOL)
    other = inputs.random_step(DEV, guidance_scale=guidance_scale + 1.0, seed=3, **SIZE)
    assert not torch.allclose(served, call.reference_call(tiny_dev, other), atol=1e-4)


def test_batch_in_one_request_matches_diffusers_per_row(dev_engine_server, http_client, tiny_dev):
    client = http_client(dev_engine_server)
    step = inputs.random_step(DEV, batch=3, seed=4, height=256, width=384).replace(
        timestep=torch.tensor([10.0, 400.0, 900.0]),  # per-sample timesteps
        guidance=torch.tensor([1.0, 3.5, 7.0]),  # per-sample guidance
    )
    served = infer_step(client, "flux_dit", step.wire())
    for row in range(3):
        torch.testing.assert_close(served[row : row + 1], call.reference_call(tiny_dev, step.row(row)), **TOL)
    assert not torch.allclose(served[0], served[1], atol=1e-3)


def test_concurrent_requests_are_merged_by_the_engine_and_split_in_order(dev_engine_server, tiny_dev):
    steps = [
        inputs.random_step(DEV, timestep=50.0 * (i + 1), guidance_scale=1.0 + i, seed=10 + i, **BUSY_SIZE)
        for i in range(8)
    ]
    merged, inferences, executions = infer_concurrently(
        dev_engine_server, "flux_dit", [s.wire() for s in steps], batching_model="dit_engine"
    )
    assert inferences == len(steps)
    assert executions < inferences, "the dynamic batcher did not merge any requests for dit_engine"
    for step, result in zip(steps, merged, strict=True):
        torch.testing.assert_close(result, call.reference_call(tiny_dev, step), **TOL)


@pytest.mark.parametrize(
    ("preset", "steps", "guidance_scale"), [("schnell", 4, None), ("dev", 28, 3.5)], ids=["schnell-4", "dev-28"]
)
def test_denoising_loop_matches_flux_pipeline(
    request, http_client, tiny_dev, tiny_schnell, preset, steps, guidance_scale
):
    signature, transformer = (SCHNELL, tiny_schnell) if preset == "schnell" else (DEV, tiny_dev)
    client = http_client(request.getfixturevalue(f"{preset}_engine_server"))
    first = inputs.random_step(signature, height=256, width=320, guidance_scale=guidance_scale or 0, seed=5)
    served = loop.denoise(
        lambda step: infer_step(client, "flux_dit", step.wire()), loop.make_scheduler(preset), first, steps
    )
    expected = loop.pipeline_latents(transformer, preset, first, steps, height=256, width=320)
    torch.testing.assert_close(served, expected, **LOOP_TOL)
    assert not torch.allclose(served, first.hidden_states, atol=1e-2)


def engine_request(step) -> dict[str, torch.Tensor]:
    return step.engine_tensors(DEV)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unscaled timestep", "timestep: expected scaled timesteps (t / 1000) in [0, 1], got 500"),
        ("nan timestep", "timestep: expected finite values, got NaN or Inf"),
        ("beyond the profile", "hidden_states: N=7057 exceeds this server's limit of 7056"),
        ("ids differ", "img_ids: rows differ within the request"),
        ("guidance", "guidance: expected guidance scales in [0, 50], got -3"),
    ],
)
def test_dit_engine_checks_its_own_inputs(dev_engine_server, http_client, tiny_dev, case, message):
    """dit_engine called directly (not through dit_preprocess) refuses what the engine may not run."""
    client = http_client(dev_engine_server)
    step = inputs.random_step(DEV, batch=2, seed=6, **SIZE)
    tensors = engine_request(step)
    if case == "unscaled timestep":
        tensors["timestep"] = torch.full_like(tensors["timestep"], 500.0)
    elif case == "nan timestep":
        tensors["timestep"][1, 0] = float("nan")
    elif case == "beyond the profile":
        tensors = engine_request(inputs.random_step(DEV, seed=6, height=16, width=16 * 7057))
    elif case == "ids differ":
        tensors["img_ids"][1, 0, 1] += 1.0
    else:
        tensors["guidance"] = torch.full_like(tensors["guidance"], -3.0)
    with pytest.raises(InferenceServerException) as info:
        infer_step(client, "dit_engine", tensors)
    assert info.value.status() == "400" and message in info.value.message(), info.value.message()
    # and the same engine answers a valid request of its own, as diffusers does
    served = infer_step(client, "dit_engine", engine_request(step))
    torch.testing.assert_close(served, call.reference_call(tiny_dev, step), **TOL)


def test_generation_sessions_hold_the_prompt_in_the_preprocessor(dev_engine_server, tiny_dev):
    """flux_dit keeps sessions in dit_preprocess: a generation's later steps send no prompt and give bitwise the
    stateless latents; each generation ends its sequence with an END-only request, which dit_preprocess frees and
    dit_engine answers empty without a forward."""
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, size=256, **embeds(6))
    with RemoteFluxTransformer(url=dev_engine_server.url, model_name="flux_dit") as remote:
        assert remote.sessions
        served = generate(remote, "dev", seed=6, **kwargs)
        again = generate(remote, "dev", seed=6, **kwargs)
        assert remote.generations.started == 2 and remote.generations.restarted == 0
        with pytest.raises(RemoteDitError, match="runs no step caches"):
            remote.enable_cache(build_cache({"kind": "mag"}))
        sent = remote.sent_bytes
    with RemoteFluxTransformer(url=dev_engine_server.url, model_name="flux_dit", sessions=False) as stateless:
        expected = generate(stateless, "dev", seed=6, **kwargs)
        full = stateless.sent_bytes
    assert torch.equal(served, expected) and torch.equal(again, expected)
    prompt = TEXT_TOKENS * 32 * 4 + 32 * 4 + TEXT_TOKENS * 3 * 4 + 4  # T5, CLIP, text ids, guidance
    assert [whole - part for whole, part in zip(full * 2, sent, strict=True)] == [0, prompt, prompt, prompt] * 2
    step = inputs.random_step(DEV, **SIZE, seed=7)
    later = {name: step.wire()[name] for name in ("hidden_states", "timestep", "img_ids")}  # no prompt
    closing = {**later, "hidden_states": step.hidden_states[:, :0], "img_ids": later["img_ids"][:, :0]}
    with httpclient.InferenceServerClient(dev_engine_server.url) as client:
        infer_step(client, "flux_dit", step.wire(), sequence=SequenceStep(99, start=True, key="k"))
        assert infer_step(client, "flux_dit", closing, sequence=SequenceStep(99, end=True, key="k")).shape == (1, 0, 4)
        with pytest.raises(InferenceServerException, match="sequence 99: unknown or expired"):  # ended
            infer_step(client, "flux_dit", later, sequence=SequenceStep(99, key="k"))


def test_an_end_only_request_reaches_no_engine_forward():
    """What dit_preprocess passes on for an END-only request (zero tokens) is answered empty by dit_engine's runner
    without calling the engine."""
    calls = []
    closing = Step.closing(DEV).engine_tensors(DEV)
    [answer] = run_engine_requests(lambda tensors: calls.append(tensors), [closing], DEV, Limits())
    assert answer.shape == (1, 0, 4) and calls == []


def test_dit_engine_holds_each_sequences_prompt(dev_engine_server, http_client):
    """dit_engine (one instance, ``hold_prompts``) keeps a sequence's prompt from its START: a later step that comes
    with zero text tokens, as dit_preprocess passes it on, gets bitwise the answer of the whole step; a sequence it
    does not hold is refused as unknown, which a client answers by starting it again."""
    client = http_client(dev_engine_server)
    first, later = (inputs.random_step(DEV, timestep=t, seed=8, **SIZE) for t in (900.0, 450.0))
    without_prompt = {name: t[:, :0] if name in HELD_BY_ENGINE else t for name, t in engine_request(later).items()}
    infer_step(client, "dit_engine", engine_request(first), sequence=SequenceStep(41, start=True, key="k"))
    held = infer_step(client, "dit_engine", without_prompt, sequence=SequenceStep(41, key="k"))
    assert torch.equal(held, infer_step(client, "dit_engine", engine_request(later)))
    with pytest.raises(InferenceServerException, match="sequence 42: unknown or expired") as refused:
        infer_step(client, "dit_engine", without_prompt, sequence=SequenceStep(42, key="k"))
    assert refused.value.status() == "400"
    bad = {**without_prompt, "timestep": torch.full_like(without_prompt["timestep"], float("nan"))}
    with pytest.raises(InferenceServerException, match="timestep: expected finite values"):
        infer_step(client, "dit_engine", bad, sequence=SequenceStep(41, key="k"))
    with pytest.raises(InferenceServerException, match="sequence 41: unknown or expired"):  # freed by the failure
        infer_step(client, "dit_engine", without_prompt, sequence=SequenceStep(41, key="k"))


def test_a_generation_goes_on_when_dit_engine_lost_its_prompt(dev_engine_server, http_client):
    """dit_engine loses a sequence that dit_preprocess still holds (reclaimed, or the engine loaded again; here its
    END sent to dit_engine alone): the next step is refused as unknown, the client starts the sequence again with the
    prompt, and the latents are bitwise the stateless ones."""
    kwargs = dict(num_inference_steps=4, guidance_scale=3.5, size=256, **embeds(9))
    closing = Step.closing(DEV).engine_tensors(DEV)
    with RemoteFluxTransformer(url=dev_engine_server.url, model_name="flux_dit") as remote:
        original, steps = remote.router._on, []

        def losing(endpoint, slot, tensors, sequence=None):
            steps.append(sequence)
            if len(steps) == 3:  # before the third step, dit_engine alone ends the sequence
                ending = SequenceStep(sequence.sequence_id, end=True, key=sequence.key)
                infer_step(http_client(dev_engine_server), "dit_engine", closing, sequence=ending)
            return original(endpoint, slot, tensors, sequence)

        remote.router._on = losing
        with pytest.warns(UserWarning, match="started it again"):
            served = generate(remote, "dev", seed=9, **kwargs)
        assert remote.generations.restarted == 1
    with RemoteFluxTransformer(url=dev_engine_server.url, model_name="flux_dit", sessions=False) as stateless:
        expected = generate(stateless, "dev", seed=9, **kwargs)
    assert torch.equal(served, expected)


def test_dit_preprocess_passes_the_prompt_on_only_with_the_steps_that_carry_it():
    """With ``engine_holds_prompts``, a sequence's START and a step that sends the prompt again (changed) pass it on
    whole; the other steps pass it on with zero text tokens. Without, every step passes the held prompt on."""
    step = inputs.random_step(DEV, seed=10, **SIZE)
    latents = {name: step.wire()[name] for name in ("hidden_states", "timestep", "img_ids")}
    changed = {**latents, "encoder_hidden_states": step.wire()["encoder_hidden_states"] * 0.5}
    for holds in (True, False):
        settings = PreprocessSettings.of_engine(DEV, Limits(min_image_tokens=1), engine_holds_prompts=holds)
        preprocessor = Preprocessor(settings)
        start, later = SequenceStep(5, start=True, key="k"), SequenceStep(5, key="k")
        text_tokens = [
            {name: preprocessor.run(tensors, sequence)[name].shape[1] for name in HELD_BY_ENGINE}
            for tensors, sequence in ((step.wire(), start), (latents, later), (changed, later), (latents, later))
        ]
        whole, held = {name: TEXT_TOKENS for name in HELD_BY_ENGINE}, {name: 0 for name in HELD_BY_ENGINE}
        assert text_tokens == ([whole, held, whole, held] if holds else [whole] * 4)


def test_a_prompt_changed_in_place_reaches_dit_engine(dev_engine_server):
    """A callback that scales ``prompt_embeds`` in place after the first step: the client sends it again, and
    dit_engine's held prompt follows, so the served loop with sessions is bitwise the stateless one."""

    def run(**settings) -> tuple[torch.Tensor, list[int]]:
        kwargs = dict(num_inference_steps=4, guidance_scale=3.5, size=256, **embeds(27), **HALVED_PROMPT)
        with RemoteFluxTransformer(url=dev_engine_server.url, model_name="flux_dit", **settings) as remote:
            return generate(remote, "dev", seed=27, **kwargs), remote.sent_bytes

    served, sent = run()
    expected, full = run(sessions=False)
    assert torch.equal(served, expected)
    t5 = TEXT_TOKENS * 32 * 4  # the T5 embeddings went with the first step and the one after the change
    assert [whole - part < t5 for whole, part in zip(full, sent, strict=True)] == [True, True, False, False]


def test_concurrent_generations_each_get_their_own_held_prompt(dev_engine_server, http_client):
    """Four generations at once through flux_dit with sessions, each with its own prompt: dit_engine fills each
    step's prompt in before its dynamic batcher's requests merge, so every step answers as the same step sent
    whole without a session (a prompt filled in from another sequence would be far off)."""
    prompts = [inputs.random_step(DEV, seed=60 + k, **SIZE) for k in range(4)]
    steps = [[prompt.replace(hidden_states=inputs.random_step(DEV, seed=70 + 4 * k + i, **SIZE).hidden_states,
                             timestep=torch.tensor([900.0 - 200 * i])) for i in range(4)]
             for k, prompt in enumerate(prompts)]  # fmt: skip
    expected = [[infer_step(http_client(dev_engine_server), "flux_dit", s.wire()) for s in run] for run in steps]

    def generation(k: int) -> list[torch.Tensor]:
        answers, client = [], http_client(dev_engine_server)
        for i, step in enumerate(steps[k]):
            wire = step.wire() if i == 0 else {n: t for n, t in step.wire().items() if n not in PROMPT_INPUTS}
            answers.append(infer_step(client, "flux_dit", wire, sequence=SequenceStep(500 + k, i == 0, i == 3, "k")))
        return answers

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        served = list(pool.map(generation, range(4)))
    for run, wanted in zip(served, expected, strict=True):
        for answer, reference in zip(run, wanted, strict=True):
            torch.testing.assert_close(answer, reference, **TOL)
