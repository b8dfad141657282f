"""Where each step of a ``RemoteFluxTransformer`` goes, and how: the served model's replicas (each generation kept on
one, moved when its replica stops answering; ``client.replicas``), its generation sessions (the prompt sent once per
sequence; ``client.generations``), the transport of each replica, and the server's errors, named."""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref

import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils.shared_memory import SharedMemoryException

from flux_triton.client.connection import RemoteDitError, RemoteSettings, connect, describe
from flux_triton.client.generations import Generation, Generations
from flux_triton.client.replicas import Replicas, unreachable
from flux_triton.client.transport import Transport, make_transport
from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature, Step
from flux_triton.contract.protocol import ADMIN_KEY_ENV, SequenceStep
from flux_triton.contract.served import keeps_sessions, runs_step_caches


class StepRouter:
    """The steps of one client of one served model: ``send`` a step's request, ``end_generations`` when the
    pipeline's call ends, ``close`` to free the connections and shared-memory regions."""

    def __init__(self, settings: RemoteSettings, signature: DitSignature | None = None):
        """``signature``: the model's, as another router found it (every replica must serve it); ``None``: the
        first replica's."""
        self.settings = settings
        self.signature = signature
        opener = weakref.WeakMethod(self._open)  # no cycle: a dropped client frees its regions at once
        self.replicas = Replicas(settings, lambda own: opener()(own))
        try:
            first = self.replicas.choose()
            config = first.client.get_model_config(settings.model_name, settings.model_version)
            self.sessions = keeps_sessions(config) if settings.sessions is None else settings.sessions
            self.runs_caches = runs_step_caches(config)
        except Exception:
            self.replicas.close()
            raise
        self.generations = Generations()
        self.primary = first.url  # the replica that answered first (the stateless steps' while it answers)
        self.last_endpoint = first.url  # where the last request went: errors name it
        self._closed_transport: Transport | None = None
        self.latencies_s: list[float] = []  # one entry per server call, in order
        self.sent_bytes: list[int] = []  # the tensor bytes of each step request, in order

    def _open(self, settings: RemoteSettings) -> tuple[httpclient.InferenceServerClient, Transport]:
        """Connect to one replica: the first one gives the model's signature, every later one must serve the same."""
        client = connect(settings)
        try:
            found = describe(client, settings)
            if self.signature is None:
                self.signature = found
            elif found != self.signature:  # e.g. a schnell replica among dev ones, mid-update
                raise RemoteDitError(
                    f"model '{settings.model_name}' at {settings.url} is {found}, unlike the other replicas' "
                    f"{self.signature}"
                )
            return client, make_transport(settings.transport, client, settings.admin_headers)
        except Exception:
            client.close()
            raise

    @property
    def transport(self) -> Transport:
        """The first replica's transport (the only one, with one server); after ``close()``, the closed one."""
        if self._closed_transport is not None:
            return self._closed_transport
        return self.replicas.replica(self.primary).transport

    def end_generations(self) -> None:
        """The pipeline's call ended: its sequences end on the server."""
        for generation in self.generations.end_all():
            self._end(generation)

    def _end(self, generation: Generation) -> None:
        """End a sequence without a step: an END request with zero image tokens (a server that already
        freed the sequence answers the same)."""
        wire = Step.closing(self.signature).wire()
        closing = {name: wire[name] for name in ("hidden_states", "timestep", "img_ids")}
        sequence = SequenceStep(generation.sequence_id, end=True, key=self.generations.key)
        replica = self.replicas.connected(generation.endpoint)
        if replica is None:  # its replica stopped answering: it frees the sequence itself, if it comes back
            return
        with contextlib.suppress(Exception):  # the server is gone, or freed it already: nothing is held
            infer_step(replica.client, self.settings.model_name, closing, self.settings.model_version, sequence)

    def close(self) -> None:
        try:
            self.end_generations()
        finally:
            primary = self.replicas.connected(self.primary)
            self._closed_transport = primary.transport if primary is not None else None
            self.replicas.close()

    def send(self, slot: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``noise_pred`` for one step's request, on the pipeline's cache context ``slot`` ("cond", "uncond",
        "call"); server failures raise ``RemoteDitError`` naming the replica."""
        start = time.perf_counter()
        self.last_endpoint = self.primary
        try:
            result = self._send(slot, tensors) if self.sessions else self._stateless(slot, tensors)
        except RemoteDitError:
            raise
        except InferenceServerException as exc:
            hint = ""
            message = str(exc.message()).lower()
            if "admin key" in message or "restricted" in message:
                hint = f" (this server restricts the API: set {ADMIN_KEY_ENV} or RemoteSettings.admin_key to its key)"
            elif self.settings.transport == "shm" and "shared memory" in message and "unable to find" not in message:
                hint = " (transport shm needs the server on this host, sharing its /dev/shm)"
            raise RemoteDitError(f"{self._where()} failed ({slot}): {exc.message()}{hint}") from exc
        except SharedMemoryException as exc:
            raise RemoteDitError(f"{self._where()}: shared memory failed ({slot}): {exc} ({exc.__cause__})") from exc
        except Exception as exc:  # the connection dropped or timed out mid-run, or the client failed: say which
            what = "is not reachable" if unreachable(exc) else f"failed ({slot})"
            raise RemoteDitError(f"{self._where()} {what}: {type(exc).__name__}: {exc}") from exc
        self.latencies_s.append(time.perf_counter() - start)
        return result

    def _where(self) -> str:
        return f"model '{self.settings.model_name}' at {self.last_endpoint}"

    def _on(self, endpoint: str, slot: str, tensors: dict[str, torch.Tensor], sequence: SequenceStep | None = None):
        """Send to the replica at ``endpoint``."""
        self.last_endpoint = endpoint
        self.sent_bytes.append(sum(tensor.nbytes for tensor in tensors.values()))
        transport = self.replicas.replica(endpoint).transport
        return transport.infer(self.settings.model_name, tensors, self.settings.model_version, slot, sequence)

    def _stateless(self, slot: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A step without a session: any replica answers it the same; the first one while it answers."""
        try:
            return self._on(self.primary, slot, tensors)
        except Exception as exc:
            if not (self.replicas.several and unreachable(exc)):
                raise
            self.replicas.mark_down(self.primary)
            self.primary = self.replicas.choose(avoid=self.primary).url
        return self._on(self.primary, slot, tensors)

    def _send(self, slot: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A step of ``slot``'s generation: the prompt only where it is new to the sequence, on the generation's
        replica; a sequence that replica lost, or whose replica stopped answering, starts again from this step."""
        sent, sequence, ended = self.generations.step(slot, tensors, lambda: self.replicas.choose().url)
        if ended is not None:
            self._end(ended)
        endpoint = self.generations.open[slot].endpoint
        try:
            return self._on(endpoint, slot, sent, sequence)
        except InferenceServerException as exc:
            if sequence.start or "unknown or expired" not in str(exc.message()):
                self.generations.drop(slot)  # the server freed it with the failed step
                raise
            # The replica lost the sequence (idle too long, restarted, or the step reached another replica).
            target, why = endpoint, f"unknown to {endpoint}"
        except Exception as exc:
            if not (self.replicas.several and unreachable(exc)):
                self.generations.drop(slot)
                raise
            self.replicas.mark_down(endpoint)
            try:
                target = self.replicas.choose(avoid=endpoint).url
            except RemoteDitError:
                self.generations.drop(slot)
                raise
            self.replicas.moved += 1
            if sequence.start:  # nothing was held yet: the same START on another replica
                self.generations.open[slot].endpoint = target
                return self._on(target, slot, sent, sequence)
            why = f"on {endpoint}, which stopped answering"
        cache = "its step cache restarted" if self.generations.cache else "any step cache starts over"
        warnings.warn(
            f"sequence of '{slot}' {why}; started it again from this step on {target} "
            f"(the prompt is sent again and {cache})",
            stacklevel=4,
        )
        return self._on(target, slot, tensors, self.generations.restart(slot, tensors, target))
