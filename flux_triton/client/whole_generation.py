"""``generate``: a whole generation in one request to the server's ``flux_generate`` model (a prompt as embeddings or
strings in, ``FluxPipeline``'s packed latents out; ``generate_images``: the images its VAE decodes), for callers that
do not run the pipeline themselves. The latents equal a client-driven generation's (``RemoteFluxTransformer`` in a
local ``FluxPipeline``) with the same settings and seed."""

from __future__ import annotations

import base64
import io
import json

import numpy
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.contract import TORCH_TO_WIRE, from_numpy, to_numpy
from flux_triton.contract.generation import GENERATE_INPUT_TYPES, GENERATE_MODEL, IMAGES, LATENTS, STRING_INPUTS
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.pipeline.caching import describe_cache

WIRE_TO_TORCH = {wire: dtype for dtype, wire in TORCH_TO_WIRE.items()}


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
    settings: RemoteSettings | None = None,
) -> torch.Tensor:
    """The final latents ``[B, N, C]`` (FP32) of one generation on the server at ``settings.url`` (its
    ``model_name`` if set to something other than ``dit_transformer``, else ``flux_generate``): the prompt as its
    embeddings, or as strings (``prompt``, ``negative_prompt``: the server's text encoders encode them), with the
    step ``cache`` that the served transformer runs (a diffusers cache config, a kind or its plain JSON spec;
    ``None``: none). Raises ``RemoteDitError`` with the server's message, which names a bad field."""
    arguments = {key: value for key, value in locals().items() if key != "settings"}
    return from_numpy(_infer(LATENTS, arguments, settings or RemoteSettings()))


def generate_images(prompt: str | list[str] | None = None, **options) -> list:
    """``generate``'s images, decoded by the server's VAE: one PIL image per prompt (``generate``'s arguments)."""
    from PIL import Image

    settings = options.pop("settings", None) or RemoteSettings()
    encoded = _infer(IMAGES, {"prompt": prompt, **options}, settings)
    return [Image.open(io.BytesIO(base64.b64decode(item))) for item in encoded.reshape(-1)]


def _infer(output: str, arguments: dict, settings: RemoteSettings) -> numpy.ndarray:
    """``output`` of one ``flux_generate`` request with ``generate``'s ``arguments``."""
    model = settings.model_name if settings.model_name != RemoteSettings.model_name else GENERATE_MODEL
    inputs = []
    for name, value in arguments.items():
        if name == "cache" or value is None:
            continue
        if name in STRING_INPUTS:
            strings = numpy.array([value] if isinstance(value, str) else list(value), dtype=numpy.object_)
            item = httpclient.InferInput(name, list(strings.shape), "BYTES")
            item.set_data_from_numpy(numpy.char.encode(strings.astype(str), "utf-8").astype(numpy.object_))
        else:
            dtype = WIRE_TO_TORCH[GENERATE_INPUT_TYPES[name]]
            tensor = value.to(dtype) if isinstance(value, torch.Tensor) else torch.tensor([value], dtype=dtype)
            item = httpclient.InferInput(name, list(tensor.shape), TORCH_TO_WIRE[tensor.dtype])
            item.set_data_from_numpy(to_numpy(tensor), binary_data=True)
        inputs.append(item)
    cache = arguments.get("cache")
    if cache is not None and not isinstance(cache, str):
        cache = json.dumps(describe_cache(cache))
    parameters = {CACHE_PARAMETER: cache} if cache else None
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
