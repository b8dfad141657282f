"""One ``StepRouter`` per calling thread, so that a ``RemoteFluxTransformer`` made once serves every thread that calls
it (a web server's pool threads, several pipelines at once).

tritonclient's HTTP client runs on gevent, whose hub belongs to the thread that made the client: from any other
thread its calls fail ("cannot switch to a different thread"). So each thread gets its own router (its own
connections, shared-memory regions, generations and session key: the server counts each thread as a client of its
own, so that a pool's generations do not reclaim each other's sessions) the first time it calls; the model's
signature and the chosen step cache are the transformer's, shared by all. A thread's router is freed with the
thread; ``close()`` closes every router still open.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace

from flux_triton.client.connection import RemoteDitError, RemoteSettings
from flux_triton.client.router import StepRouter


class ThreadRouters:
    """The routers of one remote transformer, one per thread; ``get()`` is the calling thread's."""

    def __init__(self, settings: RemoteSettings):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._routers: weakref.WeakSet[StepRouter] = weakref.WeakSet()
        self._closed, self.cache = False, ""
        first = self._add(StepRouter(settings))  # connects: the server's answer, or its error, comes at once
        self.signature = first.signature
        # later threads know the signature: no guidance probe, and every replica must serve the same model
        self._settings = replace(settings, guidance_embeds=self.signature.guidance_embeds)

    def get(self) -> StepRouter:
        """The calling thread's router, connected on its first call."""
        router = getattr(self._local, "router", None)
        if router is None:
            if self._closed:
                raise RemoteDitError("the remote transformer is closed: its transport is closed, and its connections")
            router = self._add(StepRouter(self._settings, self.signature))
        return router

    def set_cache(self, cache: str) -> None:
        """The step cache every thread's later generations ask for (JSON; "": none)."""
        with self._lock:
            self.cache = cache
            for router in self._routers:
                router.generations.cache = cache

    def close(self) -> None:
        """Close every router: the calling thread's ends its generations and frees its connections and regions;
        another thread's is closed as far as this thread can (its sequences then end on the server when idle)."""
        with self._lock:
            self._closed, routers = True, list(self._routers)
        for router in routers:
            router.close()

    def _add(self, router: StepRouter) -> StepRouter:
        with self._lock:
            router.generations.cache = self.cache
            self._routers.add(router)
        self._local.router = router
        return router
