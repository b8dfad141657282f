"""``RemoteFluxTransformer``: a stand-in for ``FluxPipeline.transformer`` that runs every DiT call
on Triton. ``pipe.transformer = RemoteFluxTransformer(RemoteSettings(url=...))`` and the pipeline
denoises on the server, with the latents it would get from the local transformer.

This is the diffusers face only (what the pipeline reads and calls); where each step goes, and how, is
``client.router.StepRouter``'s, one per calling thread (``client.threads``): any thread may call it."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import torch
from diffusers.configuration_utils import FrozenDict

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.client.router import StepRouter
from flux_triton.client.threads import ThreadRouters
from flux_triton.client.timestep import raw_timestep
from flux_triton.contract import Step
from flux_triton.pipeline.caching import describe_cache


class RemoteFluxTransformer:
    """What ``FluxPipeline`` uses of ``FluxTransformer2DModel``: ``config.in_channels``,
    ``config.guidance_embeds``, ``dtype``, ``cache_context(name)``, the step caches' ``enable_cache`` and the
    call. Not an ``nn.Module``: the pipeline's device is then its other modules' (CPU when it has none)."""

    def __init__(self, settings: RemoteSettings | None = None, **overrides):
        if settings is not None and overrides:
            raise TypeError("pass either settings or keyword overrides, not both")
        self.settings = settings or RemoteSettings(**overrides)
        self.routers = ThreadRouters(self.settings)
        self.signature = self.routers.signature
        self.config = FrozenDict(
            in_channels=self.signature.in_channels,
            out_channels=self.signature.in_channels,
            patch_size=1,
            guidance_embeds=self.signature.guidance_embeds,
            pooled_projection_dim=self.signature.pooled_dim,
            joint_attention_dim=self.signature.text_dim,
        )
        self._context = threading.local()  # the pipeline's cache context, per calling thread

    @property
    def router(self) -> StepRouter:
        """The calling thread's router (``client.threads``)."""
        return self.routers.get()

    @property
    def cache_name(self) -> str | None:
        return getattr(self._context, "name", None)

    @cache_name.setter
    def cache_name(self, name: str | None) -> None:
        self._context.name = name

    # What the router knows, for callers and tests: sessions, generations, replicas, transport, the calls' record.
    sessions = property(lambda self: self.router.sessions)
    generations = property(lambda self: self.router.generations)
    replicas = property(lambda self: self.router.replicas)
    transport = property(lambda self: self.router.transport)
    latencies_s = property(lambda self: self.router.latencies_s)  # one entry per server call, in order
    sent_bytes = property(lambda self: self.router.sent_bytes)  # the tensor bytes of each step request

    @property
    def dtype(self) -> torch.dtype:
        return self.signature.torch_dtype

    @contextlib.contextmanager
    def cache_context(self, name: str, **_) -> Iterator[None]:
        """The pipeline's "cond"/"uncond" marker: each context of a generation is its own sequence."""
        previous, self.cache_name = self.cache_name, name
        try:
            yield
        finally:
            self.cache_name = previous

    def enable_cache(self, config) -> None:
        """As diffusers' ``CacheMixin.enable_cache``: the server runs each later generation with this step cache
        (a diffusers config of a kind in ``pipeline.caching.CACHE_KINDS``; the model's ``cache`` setting must be
        the same)."""
        if not self.router.sessions:
            raise RemoteDitError(f"model '{self.settings.model_name}' keeps no generation sessions, so no step cache")
        if not self.router.runs_caches:
            raise RemoteDitError(f"model '{self.settings.model_name}' runs no step caches (its engine serves none: "
                                 f"make repo --cache with an aoti engine, or dit_transformer)")  # fmt: skip
        self.routers.set_cache(json.dumps(describe_cache(config)))

    def disable_cache(self) -> None:
        self.routers.set_cache("")

    @property
    def is_cache_enabled(self) -> bool:
        return bool(self.routers.cache)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What ``FluxPipeline`` calls at the end of a generation: its sequences end on the server."""
        self.router.end_generations()

    def close(self) -> None:
        self.routers.close()

    def __enter__(self) -> RemoteFluxTransformer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings
        where = f"urls={s.urls!r}" if s.urls else f"url={s.url!r}" + (", resolve=True" if s.resolve else "")
        return (
            f"RemoteFluxTransformer({where}, model={s.model_name!r}, transport={s.transport!r}, "
            f"signature={self.signature})"
        )

    def step(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> Step:
        """The pipeline's call arguments as the contract's step, on the host in the model's dtype, with the raw
        timestep whose server-side scaling gives back the pipeline's (``Step.wire()`` is the request)."""
        sig, batch = self.signature, hidden_states.shape[0]
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != sig.in_channels:
            raise ValueError(f"hidden_states: expected [B, N, {sig.in_channels}], got {list(hidden_states.shape)}")
        if guidance is None and sig.guidance_embeds:
            raise ValueError(f"guidance: required, model '{self.settings.model_name}' has guidance embeddings")
        if guidance is not None and not sig.guidance_embeds:
            raise ValueError(f"guidance: model '{self.settings.model_name}' has no guidance embeddings")

        def host(tensor: torch.Tensor, dtype: torch.dtype = sig.torch_dtype) -> torch.Tensor:
            return tensor.detach().to("cpu", dtype)

        return Step(
            hidden_states=host(hidden_states),
            timestep=raw_timestep(timestep.expand(batch), sig.torch_dtype).reshape(-1),
            guidance=None if guidance is None else host(guidance, torch.float32).expand(batch),
            # Embeddings of batch 1 broadcast over the latents, as in the local transformer (FluxPipeline with
            # num_images_per_prompt > 1 and prompt_embeds passed in does not repeat them).
            pooled_projections=host(_batched("pooled_projections", pooled_projections, batch)),
            encoder_hidden_states=host(_batched("encoder_hidden_states", encoder_hidden_states, batch)),
            # 2-D ids as the pipeline has them (3-D, deprecated in diffusers: the first row).
            txt_ids=host(_rows(txt_ids), torch.float32),
            img_ids=host(_rows(img_ids), torch.float32),
        )

    @torch.no_grad()
    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        **unsupported,
    ):
        if unsupported or (joint_attention_kwargs or {}):
            raise NotImplementedError(
                f"the remote transformer does not support {sorted({*unsupported, *(joint_attention_kwargs or {})})}"
            )
        step = self.step(hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids, guidance)
        noise_pred = self.router.send(self.cache_name or "call", step.wire()).to(
            hidden_states.device, hidden_states.dtype
        )
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=noise_pred)
        return (noise_pred,)


def _batched(name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name}: batch {tensor.shape[0]} does not match the {batch} latents")


def _rows(ids: torch.Tensor) -> torch.Tensor:
    if ids.ndim == 3:
        return ids[0]
    if ids.ndim != 2 or ids.shape[-1] != 3:
        raise ValueError(f"ids: expected [L, 3], got {list(ids.shape)}")
    return ids
