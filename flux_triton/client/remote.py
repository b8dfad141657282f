"""``RemoteFluxTransformer``: a stand-in for ``FluxPipeline.transformer`` that runs every DiT call
on Triton. ``pipe.transformer = RemoteFluxTransformer(RemoteSettings(url=...))`` and the pipeline
denoises on the server, with the latents it would get from the local transformer.

The diffusers face is ``pipeline.stand_in``'s; where each step goes, and how, is ``client.router.StepRouter``'s,
one per calling thread (``client.threads``): any thread may call it."""

from __future__ import annotations

import json

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.client.router import StepRouter
from flux_triton.client.threads import ThreadRouters
from flux_triton.contract import Step
from flux_triton.pipeline.caching import describe_cache
from flux_triton.pipeline.stand_in import StandInTransformer


class RemoteFluxTransformer(StandInTransformer):
    """What ``FluxPipeline`` uses of ``FluxTransformer2DModel`` (``pipeline.stand_in``), and the step caches'
    ``enable_cache``, with every step sent to the served model."""

    def __init__(self, settings: RemoteSettings | None = None, **overrides):
        if settings is not None and overrides:
            raise TypeError("pass either settings or keyword overrides, not both")
        self.settings = settings or RemoteSettings(**overrides)
        self.routers = ThreadRouters(self.settings)
        super().__init__(self.routers.signature, self.settings.model_name)

    @property
    def router(self) -> StepRouter:
        """The calling thread's router (``client.threads``)."""
        return self.routers.get()

    # What the router knows, for callers and tests: sessions, generations, replicas, transport, the calls' record.
    sessions = property(lambda self: self.router.sessions)
    generations = property(lambda self: self.router.generations)
    replicas = property(lambda self: self.router.replicas)
    transport = property(lambda self: self.router.transport)
    latencies_s = property(lambda self: self.router.latencies_s)  # one entry per server call, in order
    sent_bytes = property(lambda self: self.router.sent_bytes)  # the tensor bytes of each step request

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

    def send(self, slot: str, step: Step):
        return self.router.send(slot, step.wire())

    def end_generations(self) -> None:
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
