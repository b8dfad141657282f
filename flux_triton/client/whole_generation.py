"""``generate``: a whole generation in one request to the server's ``flux_generate`` model (a prompt as embeddings or
strings in, ``FluxPipeline``'s packed latents out; ``generate_images``: the images its VAE decodes), for callers that
do not run the pipeline themselves. The latents equal a client-driven generation's (``RemoteFluxTransformer`` in a
local ``FluxPipeline``) with the same settings and seed."""

from __future__ import annotations

import base64
import io
import json
import queue
from collections.abc import Callable

import numpy
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.contract import TORCH_TO_WIRE, WIRE_TO_TORCH, from_numpy, to_numpy
from flux_triton.contract.generation import (
    GENERATE_INPUT_TYPES,
    GENERATE_MODEL,
    GENERATE_STREAM_MODEL,
    IMAGES,
    LATENTS,
    PROGRESS,
    STRING_INPUTS,
)
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.pipeline.caching import describe_cache

Progress = Callable[[int, int], bool | None]  # (steps done, steps) -> False to cancel


def generate(
    prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    *,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.5,
    true_cfg_scale: float = 1.0,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    seed: int = 0,
    cache=None,
    progress: Progress | None = None,
    settings: RemoteSettings | None = None,
) -> torch.Tensor:
    """The final latents ``[B, N, C]`` (FP32) of one generation on the server at ``settings.url`` (its
    ``model_name`` if set to something other than ``dit_transformer``, else ``flux_generate``): the prompt as its
    embeddings, or as strings (``prompt``, ``negative_prompt``: the server's text encoders encode them), with the
    step ``cache`` that the served transformer runs (a diffusers cache config, a kind or its plain JSON spec;
    ``None``: none). With ``progress``, the generation streams from ``flux_generate_stream`` over gRPC
    (``settings.grpc_address``) and ``progress(done, steps)`` is called after each step; returning ``False`` cancels
    it (``GenerationCancelled``), as any exception it raises does. Raises ``RemoteDitError`` with the server's
    message, which names a bad field."""
    arguments = {key: value for key, value in locals().items() if key not in ("settings", "progress")}
    return from_numpy(_request(LATENTS, arguments, settings or RemoteSettings(), progress))


def generate_images(prompt: str | list[str] | None = None, **options) -> list:
    """``generate``'s images, decoded by the server's VAE: one PIL image per prompt (``generate``'s arguments)."""
    from PIL import Image

    settings, progress = options.pop("settings", None) or RemoteSettings(), options.pop("progress", None)
    encoded = _request(IMAGES, {"prompt": prompt, **options}, settings, progress)
    return [Image.open(io.BytesIO(base64.b64decode(item))) for item in encoded.reshape(-1)]


class GenerationCancelled(RemoteDitError):
    """The caller's ``progress`` stopped the generation; the server stopped it at its next step."""


def _inputs(module, arguments: dict) -> list:
    """``generate``'s arguments as ``module``'s (tritonclient's HTTP or gRPC) inputs."""
    inputs = []
    for name, value in arguments.items():
        if name == "cache" or value is None:
            continue
        if name in STRING_INPUTS:
            strings = numpy.array([value] if isinstance(value, str) else list(value), dtype=numpy.str_)
            item = module.InferInput(name, list(strings.shape), "BYTES")
            item.set_data_from_numpy(numpy.char.encode(strings, "utf-8").astype(numpy.object_))
        else:
            dtype = WIRE_TO_TORCH[GENERATE_INPUT_TYPES[name]]
            tensor = value.to(dtype) if isinstance(value, torch.Tensor) else torch.tensor([value], dtype=dtype)
            item = module.InferInput(name, list(tensor.shape), TORCH_TO_WIRE[tensor.dtype])
            item.set_data_from_numpy(to_numpy(tensor))
        inputs.append(item)
    return inputs


def _parameters(cache) -> dict | None:
    if cache is not None and not isinstance(cache, str):
        cache = json.dumps(describe_cache(cache))
    return {CACHE_PARAMETER: cache} if cache else None


def _request(output: str, arguments: dict, settings: RemoteSettings, progress: Progress | None) -> numpy.ndarray:
    """``output`` of one generation with ``generate``'s ``arguments``: one request, or a stream with ``progress``."""
    if progress is not None:
        return _stream(output, arguments, settings, progress)
    model = settings.model_name if settings.model_name != RemoteSettings.model_name else GENERATE_MODEL
    inputs, parameters = _inputs(httpclient, arguments), _parameters(arguments.get("cache"))
    client = httpclient.InferenceServerClient(settings.url, connection_timeout=settings.connection_timeout_s,
                                              network_timeout=settings.network_timeout_s)  # fmt: skip
    try:
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(output, binary_data=True)],
                              parameters=parameters, headers=settings.admin_headers)  # fmt: skip
    except InferenceServerException as exc:
        raise RemoteDitError(f"model '{model}' at {settings.url}: {exc.message()}") from exc
    except Exception as exc:  # refused, reset, timed out
        where = f"model '{model}' at {settings.url}"
        raise RemoteDitError(f"{where} is not reachable: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()
    return result.as_numpy(output)


def _stream(output: str, arguments: dict, settings: RemoteSettings, progress: Progress) -> numpy.ndarray:
    """``output`` of one generation streamed from ``flux_generate_stream``, ``progress`` told of every step; the
    stream is stopped, cancelling the request on the server, however this ends."""
    import tritonclient.grpc as grpcclient

    where = f"model '{GENERATE_STREAM_MODEL}' at {settings.grpc_address}"
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(settings.grpc_address)
    try:
        client.start_stream(lambda result, error: answers.put((result, error)), headers=settings.admin_headers)
        client.async_stream_infer(GENERATE_STREAM_MODEL, _inputs(grpcclient, arguments),
                                  outputs=[grpcclient.InferRequestedOutput(name) for name in (output, PROGRESS)],
                                  parameters=_parameters(arguments.get("cache")))  # fmt: skip
        while True:
            try:
                result, error = answers.get(timeout=settings.network_timeout_s)
            except queue.Empty:
                raise RemoteDitError(f"{where}: no answer in {settings.network_timeout_s:g} s") from None
            if error is not None:
                raise RemoteDitError(f"{where}: {error.message()}") from error
            steps = result.as_numpy(PROGRESS)
            if steps is None:
                return result.as_numpy(output)
            if progress(int(steps[0]), int(steps[1])) is False:
                raise GenerationCancelled(f"{where}: cancelled after {int(steps[0])} of {int(steps[1])} steps")
    except InferenceServerException as exc:
        raise RemoteDitError(f"{where} is not reachable: {exc.message()}") from exc
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
