"""``RemoteFluxTransformer``: a stand-in for ``FluxPipeline.transformer`` that runs every DiT call
on Triton. ``pipe.transformer = RemoteFluxTransformer(RemoteSettings(url=...))`` and the pipeline
denoises on the server, with the latents it would get from the local transformer."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
import weakref
from collections.abc import Iterator

import torch
import tritonclient.http as httpclient
from diffusers.configuration_utils import FrozenDict
from tritonclient.utils import InferenceServerException
from tritonclient.utils.shared_memory import SharedMemoryException

from flux_triton.client.connection import RemoteDitError, RemoteSettings, connect, describe, keeps_sessions
from flux_triton.client.generations import Generation, Generations
from flux_triton.client.replicas import Replicas, unreachable
from flux_triton.client.timestep import raw_timestep
from flux_triton.client.transport import Transport, make_transport
from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature, Step
from flux_triton.contract.protocol import ADMIN_KEY_ENV, SequenceStep
from flux_triton.pipeline.caching import describe_cache


class RemoteFluxTransformer:
    """What ``FluxPipeline`` uses of ``FluxTransformer2DModel``: ``config.in_channels``,
    ``config.guidance_embeds``, ``dtype``, ``cache_context(name)`` and the call. Not an
    ``nn.Module``: the pipeline's device is then its other modules' (CPU when it has none)."""

    def __init__(self, settings: RemoteSettings | None = None, **overrides):
        if settings is not None and overrides:
            raise TypeError("pass either settings or keyword overrides, not both")
        self.settings = settings or RemoteSettings(**overrides)
        self.signature: DitSignature | None = None
        opener = weakref.WeakMethod(self._open)  # no cycle: a dropped transformer frees its regions at once
        self.replicas = Replicas(self.settings, lambda own: opener()(own))
        try:
            first = self.replicas.choose()
            config = first.client.get_model_config(self.settings.model_name, self.settings.model_version)
            self.sessions = keeps_sessions(config) if self.settings.sessions is None else self.settings.sessions
            self.generations = Generations()
            self._runs_caches = config.get("platform") != "ensemble"  # flux_dit's engine has no diffusers hooks
        except Exception:
            self.replicas.close()
            raise
        self._primary = first.url  # the replica that answered first (the stateless steps' while it answers)
        self._closed_transport: Transport | None = None
        self.config = FrozenDict(
            in_channels=self.signature.in_channels,
            out_channels=self.signature.in_channels,
            patch_size=1,
            guidance_embeds=self.signature.guidance_embeds,
            pooled_projection_dim=self.signature.pooled_dim,
            joint_attention_dim=self.signature.text_dim,
        )
        self.cache_name: str | None = None
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
        return self.replicas.replica(self._primary).transport

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
        if not self.sessions:
            raise RemoteDitError(f"model '{self.settings.model_name}' keeps no generation sessions, so no step cache")
        if not self._runs_caches:
            raise RemoteDitError(f"model '{self.settings.model_name}' runs no step caches (its engine has no "
                                 f"diffusers hooks); use dit_transformer for them")  # fmt: skip
        self.generations.cache = json.dumps(describe_cache(config))

    def disable_cache(self) -> None:
        self.generations.cache = ""

    @property
    def is_cache_enabled(self) -> bool:
        return bool(self.generations.cache)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What ``FluxPipeline`` calls at the end of a generation: its sequences end on the server."""
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
            self._reset_stateful_cache()
        finally:
            primary = self.replicas.connected(self._primary)
            self._closed_transport = primary.transport if primary is not None else None
            self.replicas.close()

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

    def wire_tensors(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The pipeline's call arguments as one Triton request (batch dim on every input)."""
        sig = self.signature
        batch = hidden_states.shape[0]
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != sig.in_channels:
            raise ValueError(f"hidden_states: expected [B, N, {sig.in_channels}], got {list(hidden_states.shape)}")
        if guidance is None and sig.guidance_embeds:
            raise ValueError(f"guidance: required, model '{self.settings.model_name}' has guidance embeddings")
        if guidance is not None and not sig.guidance_embeds:
            raise ValueError(f"guidance: model '{self.settings.model_name}' has no guidance embeddings")
        model_dtype = sig.torch_dtype
        tensors = {
            "hidden_states": hidden_states.to(model_dtype),
            "timestep": raw_timestep(timestep.expand(batch), model_dtype),
            # Embeddings of batch 1 broadcast over the latents, as in the local transformer (FluxPipeline
            # with num_images_per_prompt > 1 and prompt_embeds passed in does not repeat them).
            "pooled_projections": _batched("pooled_projections", pooled_projections, batch).to(model_dtype),
            "encoder_hidden_states": _batched("encoder_hidden_states", encoder_hidden_states, batch).to(model_dtype),
            # 2-D ids as the pipeline has them (3-D, deprecated in diffusers: the first row).
            "txt_ids": _rows(txt_ids).float().expand(batch, -1, -1),
            "img_ids": _rows(img_ids).float().expand(batch, -1, -1),
        }
        if guidance is not None:
            tensors["guidance"] = guidance.float().expand(batch).reshape(batch, 1)
        return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}

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
        tensors = self.wire_tensors(
            hidden_states, timestep, pooled_projections, encoder_hidden_states, txt_ids, img_ids, guidance
        )
        noise_pred = self._infer(tensors).to(hidden_states.device, hidden_states.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=noise_pred)
        return (noise_pred,)

    def _infer(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        slot = self.cache_name or "call"
        self._endpoint = self._primary
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
        except Exception as exc:  # the connection dropped or timed out mid-run
            raise RemoteDitError(f"{self._where()} is not reachable: {type(exc).__name__}: {exc}") from exc
        self.latencies_s.append(time.perf_counter() - start)
        return result

    def _where(self) -> str:
        return f"model '{self.settings.model_name}' at {self._endpoint}"

    def _on(self, endpoint: str, slot: str, tensors: dict[str, torch.Tensor], sequence: SequenceStep | None = None):
        """Send to the replica at ``endpoint``."""
        self._endpoint = endpoint
        return self._transport_infer(slot, tensors, sequence)

    def _transport_infer(self, slot: str, tensors: dict[str, torch.Tensor], sequence: SequenceStep | None = None):
        self.sent_bytes.append(sum(tensor.nbytes for tensor in tensors.values()))
        transport = self.replicas.replica(self._endpoint).transport
        return transport.infer(self.settings.model_name, tensors, self.settings.model_version, slot, sequence)

    def _stateless(self, slot: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A step without a session: any replica answers it the same; the first one while it answers."""
        try:
            return self._on(self._primary, slot, tensors)
        except Exception as exc:
            if not (self.replicas.several and unreachable(exc)):
                raise
            self.replicas.mark_down(self._primary)
            self._primary = self.replicas.choose(avoid=self._primary).url
        return self._on(self._primary, slot, tensors)

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
