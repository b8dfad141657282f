"""``flux_generate``: a whole generation in one request, diffusers' FluxPipeline on the server with every step sent to
``dit_transformer`` in process; its latents against local diffusers and the client-driven generation, concurrent
generations, prompt strings in and PNG images out through the tiny text encoders and VAE, and bad input (CPU, fp32,
tiny-flux-dev)."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import numpy
import pytest
import torch
import tritonclient.http as httpclient
from helpers import copy_model, embeds, generate, launch, load_tiny, start_server
from PIL import Image
from tritonclient.utils import InferenceServerException

from flux_triton.client import GenerationCancelled, RemoteDitError, RemoteFluxTransformer, RemoteSettings
from flux_triton.client import generate as served_generate
from flux_triton.client import generate_images as served_generate_images
from flux_triton.client.cli import main
from flux_triton.contract import InputError
from flux_triton.deploy import health
from flux_triton.deploy.pbtxt import set_parameter
from flux_triton.deploy.placement import transformer_in_process
from flux_triton.locations import MODEL_ROOT_ENV
from flux_triton.pipeline.caching import build_cache
from flux_triton.serving.generate import STEPS_AHEAD, StepsAhead

pytestmark = pytest.mark.server

SIZE = dict(height=64, width=64)  # the helpers' generate() size


@pytest.fixture(scope="module")
def generate_server(tmp_path_factory, model_root):
    models = ["dit_transformer", "flux_text_encoder", "flux_vae", "flux_generate", "flux_generate_stream"]
    server = start_server(tmp_path_factory.mktemp("generate"), model_root, models)
    yield server
    server.stop()


def _served(server, seed: int, **kwargs) -> torch.Tensor:
    return served_generate(**{**SIZE, **kwargs}, seed=seed, settings=RemoteSettings(url=server.url))


def test_a_served_generation_equals_local_diffusers_and_the_client_driven_one(generate_server, tiny_dev):
    prompt = embeds(31)
    kwargs = dict(num_inference_steps=8, guidance_scale=3.5)
    served = _served(generate_server, 31, **kwargs, **prompt)
    local = generate(tiny_dev, "dev", seed=31, **kwargs, **prompt)
    with RemoteFluxTransformer(url=generate_server.url) as remote:
        driven = generate(remote, "dev", seed=31, **kwargs, **prompt)
    assert served.shape == (1, (64 // 16) * (64 // 16), 4)
    assert torch.equal(served, local) and torch.equal(served, driven)
    other_seed = _served(generate_server, 32, **kwargs, **prompt)
    assert not torch.equal(other_seed, served)


def test_a_bfloat16_generation_runs_in_bfloat16_as_the_client_driven_one_does(tmp_path, model_root):
    """Served in bfloat16 (both models' dtype setting): FP32 embeddings on the wire are taken in the transformer's
    dtype, as FluxPipeline's text encoders give them, so the loop runs in bfloat16 latents like the client-driven
    generation and a local bfloat16 pipeline; kept in FP32 its latents would drift from theirs."""
    repository = tmp_path / "model_repository"
    for model in ("dit_transformer", "flux_generate"):
        set_parameter(copy_model(repository, model), "dtype", "bfloat16")
    server = launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root)}).start()
    try:
        kwargs = dict(num_inference_steps=8, guidance_scale=3.5)
        prompt = embeds(41)
        served = _served(server, 41, **kwargs, **prompt)
        in_bfloat16 = {name: tensor.to(torch.bfloat16) for name, tensor in prompt.items()}
        with RemoteFluxTransformer(url=server.url) as remote:
            driven = generate(remote, "dev", seed=41, **kwargs, **in_bfloat16)
    finally:
        server.stop()
    local = load_tiny(model_root, "tiny-flux-dev").to(torch.bfloat16)
    assert driven.dtype == torch.bfloat16
    assert torch.equal(served, driven.float())
    assert torch.equal(served, generate(local, "dev", seed=41, **kwargs, **in_bfloat16).float())


def test_true_cfg_and_two_prompts_equal_local_diffusers(generate_server, tiny_dev):
    negative = embeds(34)
    prompts = {
        name: torch.cat([embeds(33)[name], embeds(35)[name]]) for name in ("prompt_embeds", "pooled_prompt_embeds")
    }
    kwargs = dict(num_inference_steps=6, guidance_scale=3.5, true_cfg_scale=4.0,
                  negative_prompt_embeds=torch.cat([negative["prompt_embeds"]] * 2),
                  negative_pooled_prompt_embeds=torch.cat([negative["pooled_prompt_embeds"]] * 2))  # fmt: skip
    served = _served(generate_server, 33, **kwargs, **prompts)
    local = generate(tiny_dev, "dev", seed=33, **kwargs, **prompts)
    assert served.shape[0] == 2 and torch.equal(served, local)


def test_concurrent_generations_each_get_their_own_latents(generate_server, tiny_dev):
    """Four at once through two instances: their steps meet in dit_transformer's batcher (merged forwards: within
    fp32 rounding of the local run), each answer its own generation's."""
    seeds = (40, 41, 42, 43)
    kwargs = dict(num_inference_steps=6, guidance_scale=3.5)
    expected = {seed: generate(tiny_dev, "dev", seed=seed, **kwargs, **embeds(seed)) for seed in seeds}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {seed: pool.submit(_served, generate_server, seed, **kwargs, **embeds(seed)) for seed in seeds}
    for seed, future in futures.items():
        torch.testing.assert_close(future.result(), expected[seed], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": 50}, "height: expected a positive multiple of 16, got 50"),
        ({"width": 0}, "width: expected a positive multiple of 16, got 0"),
        ({"height": 4096, "width": 4096}, "height x width: 4096x4096 is 65536 image tokens, past this server's limit"),
        ({"num_inference_steps": 0}, "num_inference_steps: expected 1 to 100, got 0"),
        ({"num_inference_steps": 101}, "num_inference_steps: expected 1 to 100, got 101"),
        ({"guidance_scale": float("nan")}, "guidance_scale: expected a finite value >= 0, got nan"),
        ({"prompt_embeds": torch.full((1, 8, 32), float("nan"))}, "prompt_embeds: contains NaN or Inf"),
        ({"prompt_embeds": torch.zeros(1, 8, 16)}, r"prompt_embeds: expected \[1, S, 32\], got \[1, 8, 16\]"),
        ({"true_cfg_scale": 4.0}, "negative_prompt: true_cfg_scale > 1 needs a negative prompt or its embeddings"),
        ({"prompt": "a red fox"}, "prompt and prompt_embeds: send a prompt as strings or as embeddings, not both"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt: 2 strings for 1 prompts"),
        ({"cache": '{"kind": "pyramid"}'}, "cache: cache kind 'pyramid' is not served"),
        ({"cache": build_cache({"kind": "mag"})}, "cache: this model caches with none"),
    ],
    ids=["height", "width", "too-large", "no-steps", "too-many-steps", "nan-guidance", "nan-prompt", "prompt-dim",
         "true-cfg-without-negative", "strings-and-embeddings", "negative-count", "unknown-cache", "cache-not-served"],
)  # fmt: skip
def test_bad_input_gets_a_400_naming_the_field_and_the_server_keeps_serving(generate_server, change, message):
    request = {**embeds(50), "num_inference_steps": 2, **change}
    with pytest.raises(RemoteDitError, match=message) as refused:
        _served(generate_server, 50, **request)
    assert refused.value.__cause__.status() == "400"
    assert _served(generate_server, 50, **embeds(50), num_inference_steps=2).shape == (1, 16, 4)


def test_a_served_generation_runs_the_served_transformers_step_cache(tmp_path, model_root, tiny_dev):
    """flux_generate and dit_transformer both set to MagCache: the generation that chooses it equals local diffusers
    with the same cache (and differs from the uncached one). Without flux_text_encoder and flux_vae loaded, prompt
    strings and images get a 400 naming the model that is missing."""
    parameters = {"dit_transformer": {"cache": "mag"}, "flux_generate": {"cache": "mag"}}
    server = start_server(tmp_path, model_root, ["dit_transformer", "flux_generate"], parameters=parameters)
    try:
        kwargs = dict(num_inference_steps=28, guidance_scale=3.5, **embeds(36))
        config = build_cache({"kind": "mag"})
        uncached = _served(server, 36, **kwargs)
        served = _served(server, 36, **kwargs, cache=config)
        for request, message in (  # this server has no flux_text_encoder or flux_vae loaded
            (dict(prompt="a red fox"), "prompt: this server has no text encoders \\(flux_text_encoder is not loaded"),
            (embeds(36), "images: this server has no VAE \\(flux_vae is not loaded"),
        ):
            with pytest.raises(RemoteDitError, match=message):
                served_generate_images(**request, num_inference_steps=1, settings=RemoteSettings(url=server.url))
    finally:
        server.stop()
    assert torch.equal(uncached, generate(tiny_dev, "dev", seed=36, **kwargs))
    local = load_tiny(model_root, "tiny-flux-dev")
    local.enable_cache(config)
    assert torch.equal(served, generate(local, "dev", seed=36, **kwargs))
    assert not torch.equal(served, uncached)


def test_a_generation_with_its_transformer_in_process_equals_local_diffusers(tmp_path, model_root, tiny_dev):
    """flux_generate placed --in-process: dit_transformer's parameters (MagCache) copied in, dit_transformer itself
    not served. Its generations equal local diffusers bitwise, cached and uncached; the supervisor's probe sizes its
    request by the dims place wrote; bad input is a 400, latents that overflow a 500 naming them, and the model keeps
    serving."""
    repository = tmp_path / "model_repository"
    set_parameter(copy_model(repository, "dit_transformer"), "cache", "mag")
    config = transformer_in_process(copy_model(repository, "flux_generate"), model_root=model_root)
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    shutil.rmtree(repository / "dit_transformer")
    server = launch(repository, tmp_path, {MODEL_ROOT_ENV: str(model_root)}).start()
    try:
        kwargs = dict(num_inference_steps=28, guidance_scale=3.5, **embeds(37))
        cache = build_cache({"kind": "mag"})
        uncached, cached = _served(server, 37, **kwargs), _served(server, 37, **kwargs, cache=cache)
        assert health.probe_model(server.url, "flux_generate", None, 30.0) == health.Outcome(None)
        with pytest.raises(RemoteDitError, match="height: expected a positive multiple of 16, got 50") as refused:
            _served(server, 37, **embeds(37), num_inference_steps=2, height=50)
        assert refused.value.__cause__.status() == "400"
        huge = {name: value * 1e30 for name, value in embeds(37).items()}  # finite, but the forward overflows
        with pytest.raises(RemoteDitError, match="latents: NaN or Inf after 2 steps") as overflowed:
            _served(server, 37, **huge, num_inference_steps=2)  # its steps are not read back one by one
        assert overflowed.value.__cause__.status() == "500"
        again = _served(server, 37, **kwargs)
    finally:
        server.stop()
    assert torch.equal(uncached, generate(tiny_dev, "dev", seed=37, **kwargs)) and torch.equal(again, uncached)
    local = load_tiny(model_root, "tiny-flux-dev")
    local.enable_cache(cache)
    assert torch.equal(cached, generate(local, "dev", seed=37, **kwargs)) and not torch.equal(cached, uncached)


@pytest.mark.parametrize("limit", [1, STEPS_AHEAD])
def test_an_in_process_generations_host_waits_for_the_step_limit_steps_before_the_one_it_queued(limit):
    """The bound on a GPU loop's lead (``StepsAhead``), with events that log what the host waited for: after queuing
    step n it has waited for steps up to n - limit, and for none after them."""
    waited: list[int] = []

    class Event:  # a torch.cuda.Event's role: recorded after a step, waited for later
        count = 0

        def __init__(self):
            self.step, Event.count = Event.count, Event.count + 1

        def record(self):
            pass

        def synchronize(self):
            waited.append(self.step)

    ahead = StepsAhead(limit, Event)
    for step in range(8):
        ahead.queued()
        assert waited == list(range(step - limit + 1))


def test_prompt_strings_in_images_out_equal_local_diffusers_with_the_same_encoders_and_vae(generate_server, tiny_dev,
                                                                                         model_root):  # fmt: skip
    """flux_generate with the tiny text encoders and VAE served as flux_text_encoder and flux_vae (``make tiny``'s
    components_dir): prompt strings, true CFG with a negative prompt; its latents and its decoded PNG images equal
    local FluxPipeline's with the same components in one process, bit for bit."""
    from diffusers import FluxPipeline

    from flux_triton.model.components import TINY_COMPONENTS, load_components
    from flux_triton.pipeline import loop

    components = load_components(model_root / TINY_COMPONENTS, "cpu", torch.float32)
    pipe = FluxPipeline(loop.make_scheduler("dev"), transformer=tiny_dev, **components.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    prompts = dict(prompt=["a red fox", "two owls at night"], negative_prompt=["blurry", "dark"])
    kwargs = dict(num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=2.0, **SIZE)

    def local(output_type: str):
        return pipe(**prompts, **kwargs, generator=torch.Generator().manual_seed(40), output_type=output_type).images

    assert torch.equal(_served(generate_server, 40, **prompts, **kwargs), local("latent"))
    images = served_generate_images(**prompts, **kwargs, seed=40, settings=RemoteSettings(url=generate_server.url))
    expected = local("pil")
    assert len(images) == 2 and all(image.format == "PNG" for image in images)
    for image, reference in zip(images, expected, strict=True):
        assert numpy.array_equal(numpy.asarray(image), numpy.asarray(reference))
    assert not numpy.array_equal(numpy.asarray(images[0]), numpy.asarray(images[1]))


def _streamed(server, seed: int, progress, **kwargs):
    settings = RemoteSettings(url=server.url, grpc_url=server.endpoints[1])
    return served_generate(**{**SIZE, **kwargs}, seed=seed, progress=progress, settings=settings)


def test_a_streamed_generation_reports_every_step_and_answers_the_same_latents(generate_server, tiny_dev):
    """flux_generate_stream (decoupled, over gRPC's stream): a progress response after each step, in order, then
    the latents, equal to local diffusers'."""
    seen = []
    kwargs = dict(num_inference_steps=6, guidance_scale=3.5, **embeds(41))
    latents = _streamed(generate_server, 41, lambda done, total: seen.append((done, total)), **kwargs)
    assert seen == [(step, 6) for step in range(1, 7)]
    assert torch.equal(latents, generate(tiny_dev, "dev", seed=41, **kwargs))


def test_a_cancelled_generation_stops_on_the_server_and_frees_what_it_held(tmp_path, model_root, tiny_dev):
    """dit_transformer keeps one session at most. The caller's progress returns False after 2 of 100 steps: the
    client stops the stream, the server stops the loop at its next step (dit_transformer's step count settles far
    below 100) and ends the generation's sequence, so the next generations, streamed and not, can start theirs and
    are right."""
    models = ["dit_transformer", "flux_generate", "flux_generate_stream"]
    server = start_server(tmp_path, model_root, models, parameters={"dit_transformer": {"max_sessions": "1"}})
    try:
        kwargs = dict(num_inference_steps=100, guidance_scale=3.5, **embeds(42))
        with pytest.raises(GenerationCancelled, match="cancelled after 2 of 100 steps"):
            _streamed(server, 42, lambda done, total: done < 2, **kwargs)
        ran, deadline = -1, time.monotonic() + 30
        while (now := _steps_run(server)) != ran and time.monotonic() < deadline:  # the loop stops at its next step
            ran = now
            time.sleep(0.5)
        assert ran < 50  # stopped early, not after the 100 steps
        again = dict(num_inference_steps=3, guidance_scale=3.5, **embeds(43))
        expected = generate(tiny_dev, "dev", seed=43, **again)
        assert torch.equal(_streamed(server, 43, lambda done, total: None, **again), expected)
        assert torch.equal(_served(server, 43, **again), expected)
    finally:
        server.stop()


def test_the_cli_streams_a_prompt_with_a_progress_bar_and_writes_its_png(generate_server, tmp_path, capsys):
    """``python -m flux_triton.client --prompt``: one streamed request, a progress bar to the last step, the PNG the
    server's VAE decoded (the same image ``generate_images`` gets)."""
    png = tmp_path / "fox.png"
    argv = ["--url", generate_server.url, "--grpc-url", generate_server.endpoints[1], "--prompt", "a red fox",
            "--steps", "4", "--height", "64", "--width", "48", "--seed", "5", "--png", str(png)]  # fmt: skip
    assert main(argv) == 0
    assert "4/4" in capsys.readouterr().err
    settings = RemoteSettings(url=generate_server.url)
    expected = served_generate_images(
        "a red fox", num_inference_steps=4, height=64, width=48, seed=5, settings=settings
    )
    with Image.open(png) as written:
        assert written.size == (48, 64) and numpy.array_equal(numpy.asarray(written), numpy.asarray(expected[0]))


def _steps_run(server) -> int:
    with httpclient.InferenceServerClient(server.url) as client:
        return int(client.get_inference_statistics("dit_transformer")["model_stats"][0]["inference_count"])


def test_the_supervisors_probes_run_a_one_step_generation_an_encoding_and_a_decoding(generate_server):
    for model in ("flux_generate", "flux_text_encoder", "flux_vae"):
        assert health.probe_model(generate_server.url, model, None, 30.0) == health.Outcome(None), model


@pytest.mark.parametrize(
    ("request_inputs", "outputs", "message"),
    [
        ({"prompt": [b"a red fox"]}, set(), "prompt: this server has no text encoders"),
        ({"negative_prompt": [b"blurry"]}, set(), "negative_prompt: this server has no text encoders"),
        ({}, {"images"}, "images: this server has no VAE"),
        ({"prompt": [b"\xff\xfe"]}, set(), "prompt: expected UTF-8 strings"),
    ],
    ids=["prompt", "negative-prompt", "images", "not-utf-8"],
)
def test_what_the_server_lacks_is_refused_naming_the_field(request_inputs, outputs, message):
    """A server without text encoder or VAE models refuses prompt strings and images."""
    from flux_triton.contract import DitSignature
    from flux_triton.serving.generation_request import Generation, Parts
    from flux_triton.serving.settings import GenerateSettings

    signature = DitSignature(4, 32, 32, True, "FP32")
    request = {**{k: v.float() for k, v in embeds(60).items()}, **request_inputs}
    if "prompt" in request_inputs:
        del request["prompt_embeds"], request["pooled_prompt_embeds"]
    with pytest.raises(InputError, match=message):
        Generation.parse(request, "", signature, GenerateSettings(), Parts(), outputs)
    assert not Generation.parse({k: v.float() for k, v in embeds(60).items()}, "", signature, GenerateSettings(),
                                Parts(), set()).images  # fmt: skip


GOOD_INPUTS = {  # a 64x64 image's latents; a prompt
    "flux_vae": {"latents": numpy.zeros((1, 16, 4), numpy.float32), "height": numpy.array([64], numpy.int32),
                 "width": numpy.array([64], numpy.int32)},
    "flux_text_encoder": {"prompt": numpy.array([b"a red fox"], numpy.object_)},
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "inputs", "message"),
    [
        ("flux_vae", {"latents": numpy.zeros((1, 15, 4), numpy.float32)}, r"latents: expected \[B, 16, 4\] for 64x64"),
        ("flux_vae", {"latents": numpy.full((1, 16, 4), numpy.nan, numpy.float32)}, "latents: contains NaN or Inf"),
        ("flux_vae", {"height": numpy.array([40], numpy.int32)}, "height: expected a positive multiple of 16, got 40"),
        ("flux_text_encoder", {"prompt": numpy.array([b"\xff"], numpy.object_)}, "prompt: expected UTF-8 strings"),
        ("flux_text_encoder", {"max_sequence_length": numpy.array([0], numpy.int32)}, "max_sequence_length: expected"),
    ],
    ids=["latents-shape", "latents-nan", "height", "not-utf-8", "text-tokens"],
)
def test_the_text_encoder_and_vae_models_refuse_bad_input_naming_it_and_keep_serving(generate_server, model, inputs,
                                                                                     message):  # fmt: skip
    """Called on their own (they are internal behind the guard): a 400 naming the input; the next request answers."""
    good = GOOD_INPUTS[model]

    def infer(arrays: dict) -> dict:
        items = []
        for name, array in arrays.items():
            dtype = "BYTES" if array.dtype == numpy.object_ else ("FP32" if array.dtype == numpy.float32 else "INT32")
            items.append(httpclient.InferInput(name, list(array.shape), dtype))
            items[-1].set_data_from_numpy(array)
        return client.infer(model, items)

    with httpclient.InferenceServerClient(generate_server.url) as client:
        with pytest.raises(InferenceServerException, match=message) as refused:
            infer({**good, **inputs})
        assert refused.value.status() == "400"
        answer = infer(good)
    if model == "flux_vae":
        assert answer.as_numpy("images").shape == (1,)
    else:
        assert answer.as_numpy("prompt_embeds").shape == (1, 512, 32)
