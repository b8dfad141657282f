"""``generate``: a whole generation in one request to the server's ``flux_generate`` model (prompt embeddings in,
``FluxPipeline``'s packed latents out), for callers that do not run the pipeline themselves. The latents equal a
client-driven generation's (``RemoteFluxTransformer`` in a local ``FluxPipeline``) with the same settings and seed."""

from __future__ import annotations

import json

import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.contract import TORCH_TO_WIRE, from_numpy, to_numpy
from flux_triton.contract.protocol import CACHE_PARAMETER
from flux_triton.pipeline.caching import describe_cache

GENERATE_MODEL = "flux_generate"


def generate(
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    *,
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
    ``model_name`` if set to something other than ``dit_transformer``, else ``flux_generate``), with the step
    ``cache`` that the served transformer runs (a diffusers cache config, a kind or its plain JSON spec; ``None``:
    none). Raises ``RemoteDitError`` with the server's message, which names a bad field."""
    settings = settings or RemoteSettings()
    model = settings.model_name if settings.model_name != RemoteSettings.model_name else GENERATE_MODEL
    tensors = {
        "prompt_embeds": prompt_embeds.float(),
        "pooled_prompt_embeds": pooled_prompt_embeds.float(),
        "height": torch.tensor([height], dtype=torch.int32),
        "width": torch.tensor([width], dtype=torch.int32),
        "num_inference_steps": torch.tensor([num_inference_steps], dtype=torch.int32),
        "guidance_scale": torch.tensor([guidance_scale], dtype=torch.float32),
        "true_cfg_scale": torch.tensor([true_cfg_scale], dtype=torch.float32),
        "seed": torch.tensor([seed], dtype=torch.int64),
    }
    if negative_prompt_embeds is not None:
        tensors["negative_prompt_embeds"] = negative_prompt_embeds.float()
    if negative_pooled_prompt_embeds is not None:
        tensors["negative_pooled_prompt_embeds"] = negative_pooled_prompt_embeds.float()
    inputs = []
    for name, tensor in tensors.items():
        item = httpclient.InferInput(name, list(tensor.shape), TORCH_TO_WIRE[tensor.dtype])
        item.set_data_from_numpy(to_numpy(tensor), binary_data=True)
        inputs.append(item)
    if cache is not None and not isinstance(cache, str):
        cache = json.dumps(describe_cache(cache))
    parameters = {CACHE_PARAMETER: cache} if cache else None
    client = httpclient.InferenceServerClient(settings.url, connection_timeout=settings.connection_timeout_s,
                                              network_timeout=settings.network_timeout_s)  # fmt: skip
    try:
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput("latents", binary_data=True)],
                              parameters=parameters, headers=settings.admin_headers)  # fmt: skip
    except InferenceServerException as exc:
        raise RemoteDitError(f"model '{model}' at {settings.url}: {exc.message()}") from exc
    except Exception as exc:  # refused, reset, timed out
        where = f"model '{model}' at {settings.url}"
        raise RemoteDitError(f"{where} is not reachable: {type(exc).__name__}: {exc}") from exc
    finally:
        client.close()
    return from_numpy(result.as_numpy("latents"))
