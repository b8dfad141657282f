"""What ``FluxPipeline`` uses of ``FluxTransformer2DModel``, for a transformer that runs elsewhere: ``config``,
``dtype``, ``cache_context(name)`` and the call, whose arguments become the contract's step (on the host, or on
the GPU of a server that runs the transformer itself; in the model's dtype, with the raw timestep whose server-side
scaling gives back the pipeline's). Subclasses say where the step goes (``send``): the client's
``RemoteFluxTransformer`` over the network, the server's ``flux_generate`` to the served transformer in process.
Not an ``nn.Module``: the pipeline's device is then its other modules' (the CPU when it has none)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from diffusers.configuration_utils import FrozenDict

from flux_triton.contract import DitSignature, Step
from flux_triton.pipeline.timestep import raw_timestep


class StandInTransformer:
    """A transformer whose steps run elsewhere: ``send(slot, step)`` returns ``noise_pred`` for the step on the
    pipeline's cache context ``slot`` ("cond", "uncond", or "call" outside one); ``end_generations()`` is what the
    pipeline's ``_reset_stateful_cache`` at the end of a call does."""

    def __init__(self, signature: DitSignature, model_name: str, device: torch.device | str = "cpu"):
        self.signature, self.model_name = signature, model_name
        self.device = torch.device(device)  # where the steps' tensors go
        self.config = FrozenDict(
            in_channels=signature.in_channels,
            out_channels=signature.in_channels,
            patch_size=1,
            guidance_embeds=signature.guidance_embeds,
            pooled_projection_dim=signature.pooled_dim,
            joint_attention_dim=signature.text_dim,
        )
        # per calling thread: the pipeline's cache context (``name``), the prompt tensors last moved to the device
        self._local = threading.local()

    def send(self, slot: str, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def end_generations(self) -> None:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.signature.torch_dtype

    @property
    def cache_name(self) -> str | None:
        return getattr(self._local, "name", None)

    @cache_name.setter
    def cache_name(self, name: str | None) -> None:
        self._local.name = name

    @contextlib.contextmanager
    def cache_context(self, name: str, **_) -> Iterator[None]:
        """The pipeline's "cond"/"uncond" marker: each context of a generation is its own sequence."""
        previous, self.cache_name = self.cache_name, name
        try:
            yield
        finally:
            self.cache_name = previous

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What ``FluxPipeline`` calls at the end of a generation: its sequences end where they run."""
        self.end_generations()

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
        """The pipeline's call arguments as the contract's step, on ``self.device`` in the model's dtype, with the raw
        timestep whose server-side scaling gives back the pipeline's (``Step.wire()`` is the request). On a GPU nothing
        is read back on the host (``raw_timestep``), so the pipeline's host runs ahead of its GPU as with a local
        transformer."""
        sig, batch = self.signature, hidden_states.shape[0]
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != sig.in_channels:
            raise ValueError(f"hidden_states: expected [B, N, {sig.in_channels}], got {list(hidden_states.shape)}")
        if guidance is None and sig.guidance_embeds:
            raise ValueError(f"guidance: required, model '{self.model_name}' has guidance embeddings")
        if guidance is not None and not sig.guidance_embeds:
            raise ValueError(f"guidance: model '{self.model_name}' has no guidance embeddings")

        def moved(tensor: torch.Tensor, dtype: torch.dtype = sig.torch_dtype) -> torch.Tensor:
            return tensor.detach().to(self.device, dtype)

        def prompt(name: str, tensor: torch.Tensor, dtype: torch.dtype = sig.torch_dtype) -> torch.Tensor:
            """A prompt tensor on the device, moved once while the pipeline passes the same unchanged tensor (a GPU
            pipeline's prompt is not copied back every step, and the sessions see the same object again)."""
            if not hasattr(self._local, "placed"):
                self._local.placed = {}
            placed, key = self._local.placed, (self.cache_name, name)  # per context: cond and uncond alternate
            last = placed.get(key)
            if last is not None and last[0] is tensor and last[1:3] == (tensor._version, batch):
                return last[3]
            moved_once = moved(_rows(tensor) if name == "txt_ids" else _batched(name, tensor, batch), dtype)
            placed[key] = (tensor, tensor._version, batch, moved_once)
            return moved_once

        on_host = self.device.type == "cpu"
        return Step(
            hidden_states=moved(hidden_states),
            timestep=raw_timestep(moved(timestep.expand(batch), timestep.dtype), sig.torch_dtype, on_host).reshape(-1),
            guidance=None if guidance is None else moved(guidance, torch.float32).expand(batch),
            # Embeddings of batch 1 broadcast over the latents, as in the local transformer (FluxPipeline with
            # num_images_per_prompt > 1 and prompt_embeds passed in does not repeat them).
            pooled_projections=prompt("pooled_projections", pooled_projections),
            encoder_hidden_states=prompt("encoder_hidden_states", encoder_hidden_states),
            # 2-D ids as the pipeline has them (3-D, deprecated in diffusers: the first row).
            txt_ids=prompt("txt_ids", txt_ids, torch.float32),
            img_ids=moved(_rows(img_ids), torch.float32),
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
        noise_pred = self.send(self.cache_name or "call", step).to(hidden_states.device, hidden_states.dtype)
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
