"""Generation sessions, client side: each cache context of a pipeline call ("cond", "uncond", or "call"
outside one) is one sequence on the server. Its first step carries the START flag and the prompt's
tensors (``PROMPT_INPUTS``); later steps send them only when they change. A generation ends when the
pipeline resets the transformer's caches, when the transformer is closed, or when a step of the same
context comes with a timestep not below the previous one or other latents' shape (a new generation:
``FluxPipeline``'s timesteps fall); the server also frees sequences left idle. Every step carries this client's
session key, a secret that binds its sequences to it on the server.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flux_triton.contract import PROMPT_INPUTS
from flux_triton.contract.protocol import SequenceStep


@dataclass
class Generation:
    sequence_id: int
    timestep: float
    latents_shape: tuple[int, ...]
    sent: dict[str, Sent]  # the prompt's tensors as last sent
    endpoint: str = ""  # the replica that holds the sequence (client.replicas)


def _position(tensors: Mapping[str, torch.Tensor]) -> tuple[float, tuple[int, ...]]:
    """Where a step stands in its generation: its timestep and its latents' shape."""
    return float(tensors["timestep"].reshape(-1)[0]), tuple(tensors["hidden_states"].shape)


@dataclass(frozen=True)
class Sent:
    """A prompt tensor as it was sent: the tensor, its version counter then, and a copy of what it held (a tensor
    changed in place between steps, by a callback say, is the same object with new values)."""

    tensor: torch.Tensor
    version: int
    values: torch.Tensor

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Sent:
        return cls(tensor, tensor._version, tensor.detach().clone())

    def same(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` holds what was sent: the same object unchanged since, or equal values bit for bit."""
        if tensor is self.tensor and tensor._version == self.version:
            return True
        return (
            self.values.shape == tensor.shape and self.values.dtype == tensor.dtype and torch.equal(self.values, tensor)
        )


class Generations:
    """The open sequences of one ``RemoteFluxTransformer``, by cache context."""

    def __init__(self) -> None:
        self.cache = ""  # the step cache each new sequence asks for (RemoteFluxTransformer.enable_cache)
        self.key = secrets.token_urlsafe(32)  # this client's session key: only it can step on its sequences
        self.open: dict[str, Generation] = {}
        self.started = 0
        self.restarted = 0  # sequences the server no longer knew, started again with the prompt

    def step(
        self, context: str, tensors: Mapping[str, torch.Tensor], endpoint: Callable[[], str] = str
    ) -> tuple[dict, SequenceStep, Generation | None]:
        """What to send for this call: the tensors, its sequence step, and the generation it ends first
        (``None``: it continues or starts the only one of ``context``). ``endpoint`` chooses the replica of a
        generation this call starts."""
        timestep, shape = _position(tensors)
        current = self.open.get(context)
        if current is not None and timestep < current.timestep and shape == current.latents_shape:
            prompt = {name: tensors[name] for name in PROMPT_INPUTS if name in tensors}
            changed = {
                name: t for name, t in prompt.items() if name not in current.sent or not current.sent[name].same(t)
            }
            current.sent.update({name: Sent.of(t) for name, t in changed.items()})
            current.timestep = timestep
            sent = {name: t for name, t in tensors.items() if name not in PROMPT_INPUTS or name in changed}
            return sent, SequenceStep(current.sequence_id, key=self.key), None
        ended = self.open.pop(context, None)
        return dict(tensors), self._start(context, tensors, endpoint()), ended

    def _start(self, context: str, tensors: Mapping[str, torch.Tensor], endpoint: str) -> SequenceStep:
        timestep, shape = _position(tensors)
        sequence_id = secrets.randbits(63) or 1  # 0 means no sequence
        prompt = {name: Sent.of(tensors[name]) for name in PROMPT_INPUTS if name in tensors}
        self.open[context] = Generation(sequence_id, timestep, shape, prompt, endpoint)
        self.started += 1
        return SequenceStep(sequence_id, start=True, key=self.key, cache=self.cache)

    def restart(self, context: str, tensors: Mapping[str, torch.Tensor], endpoint: str = "") -> SequenceStep:
        """The server no longer knows ``context``'s sequence (expired, restarted, another replica), or its replica
        stopped answering: a new one from this step on ``endpoint``, which then carries the prompt again."""
        self.open.pop(context, None)
        self.restarted += 1
        return self._start(context, tensors, endpoint)

    def drop(self, context: str) -> None:
        """The server freed ``context``'s sequence (its step failed)."""
        self.open.pop(context, None)

    def end_all(self) -> list[Generation]:
        ended, self.open = list(self.open.values()), {}
        return ended
