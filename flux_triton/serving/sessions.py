"""Generation sessions, server side: one generation (one cache context of one pipeline call) is one sequence, a
Triton correlation id whose first step carries the START flag and whose last the END flag.

The prompt's tensors (``HELD``: the contract's ``PROMPT_INPUTS``) come with the START step, or whenever they
change, and are kept on the model's device; the other steps send the latents, the timestep and the image ids
only. A step of END with zero image tokens only ends its sequence. Requests without a correlation id are stateless
steps, exactly as before sessions.

A sequence belongs to the client that started it: every step carries the START's session key (a request
parameter, ``contract.protocol.SESSION_KEY_PARAMETER``), so knowing a sequence id is not enough to step on it or
end it. Sessions cannot run out: a sequence is freed at END, when one of its steps fails and once idle for
``idle_timeout_s``; a client (a session key) keeps at most ``max_per_client`` and the model ``max_sessions``, and
a START at either limit reclaims the least recently used sequence (that client's own first). The memory held is
bounded by ``max_sessions`` x one prompt's tensors (512 text tokens of a full-size model in bf16: 4.2 MB each).

Triton's sequence batcher would refuse the stateless requests, so the model keeps the sessions itself, behind the
dynamic batcher; steps of different generations still merge into one forward.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flux_triton.contract import PROMPT_INPUTS as HELD
from flux_triton.contract import InputError
from flux_triton.contract.protocol import SESSION_KEY_PARAMETER, SequenceStep, SessionSettings

PROMPT = HELD[:3]  # required at START (guidance as the model requires it)


@dataclass
class Session:
    held: dict[str, torch.Tensor]
    image_shape: tuple[int, ...]
    owner: bytes  # the session key's digest
    last_used: float
    cached: bool = False  # the sequence chose the model's step cache at START


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def held_only(tensors: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The prompt's tensors a step of a sequence did not carry: its session fills them in, and their values were
    checked with the step that brought them (a step that fails its checks frees its sequence)."""
    return tuple(name for name in HELD if name not in tensors)


def closes_only(tensors: Mapping[str, torch.Tensor], sequence: SequenceStep) -> bool:
    """An END step with zero image tokens: it ends its sequence and runs no forward."""
    latents = tensors.get("hidden_states")
    return sequence.end and latents is not None and latents.ndim == 3 and latents.shape[1] == 0


class Sessions:
    """The live sequences of one model instance, by correlation id, least recently used first."""

    def __init__(
        self,
        settings: SessionSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_free: Callable[[int | str], None] | None = None,
    ):
        self.settings = settings or SessionSettings()
        self._clock = clock
        self._open: OrderedDict[int | str, Session] = OrderedDict()
        self._on_free = on_free or (lambda sequence_id: None)
        self.reclaimed = 0  # sequences freed to make room for a START

    def __len__(self) -> int:
        return len(self._open)

    def get(self, sequence_id: int | str) -> Session | None:
        return self._open.get(sequence_id)

    def step_tensors(self, sequence: SequenceStep, tensors: Mapping[str, torch.Tensor], cached: bool = False) -> dict:
        """The step's tensors: the request's, with the sequence's held prompt filled in (``tensors`` already on the
        model's device). Opens the sequence at START (``cached``: with the model's step cache); raises
        ``InputError`` for a step that cannot be part of one (the caller frees the sequence, if it is the
        caller's)."""
        session = self._start(sequence, tensors, cached) if sequence.start else self._continue(sequence, tensors)
        # A copy: the request's tensors may live in Triton's buffers, freed after the response.
        session.held.update({name: tensors[name].clone() for name in HELD if name in tensors})
        self._touch(sequence.sequence_id)
        return {**session.held, **tensors}

    def owns(self, sequence: SequenceStep) -> bool:
        """Whether ``sequence`` carries the key its live sequence was started with (an unknown id: False)."""
        session = self._open.get(sequence.sequence_id)
        return session is not None and hmac.compare_digest(session.owner, _digest(sequence.key))

    def close(self, sequence: SequenceStep) -> None:
        """An END-only request: frees the sequence if the key is its owner's; an unknown id is already free."""
        if sequence.sequence_id in self._open and not self.owns(sequence):
            raise InputError(self._not_yours(sequence))
        self._free(sequence.sequence_id)

    def _start(self, sequence: SequenceStep, tensors: Mapping[str, torch.Tensor], cached: bool) -> Session:
        at = f"at the START of sequence {sequence.sequence_id}"
        if not sequence.key:
            raise InputError(f"{SESSION_KEY_PARAMETER}: missing {at}; every step of a sequence carries the secret "
                             f"its client chose for it (a request parameter)")  # fmt: skip
        missing = [name for name in PROMPT if name not in tensors]
        if missing:
            raise InputError(f"{missing[0]}: missing {at}; the first step of a sequence carries the prompt's "
                             f"tensors ({', '.join(PROMPT)})")  # fmt: skip
        if sequence.sequence_id in self._open and not self.owns(sequence):
            raise InputError(self._not_yours(sequence))
        self._free(sequence.sequence_id)  # a START of the client's own live id starts it clean
        owner = _digest(sequence.key)
        self._make_room(owner)
        session = Session({}, tuple(tensors["hidden_states"].shape), owner, self._clock(), cached)
        self._open[sequence.sequence_id] = session
        return session

    def _make_room(self, owner: bytes) -> None:
        """At the client's or the model's limit, free the least recently used sequence (the client's own first)."""
        if self.settings.max_sessions <= 0:
            raise InputError("sequence: this model keeps no generation sessions (max_sessions 0); send stateless "
                             "steps (no correlation id)")  # fmt: skip
        own = [key for key, session in self._open.items() if session.owner == owner]
        if len(own) >= self.settings.max_per_client:
            self._reclaim(own[0])
        if len(self._open) >= self.settings.max_sessions:
            self._reclaim(next(iter(self._open)))

    def _reclaim(self, sequence_id: int | str) -> None:
        self._free(sequence_id)
        self.reclaimed += 1

    def _continue(self, sequence: SequenceStep, tensors: Mapping[str, torch.Tensor]) -> Session:
        session = self._open.get(sequence.sequence_id)
        if session is None:
            raise InputError(
                f"sequence {sequence.sequence_id}: unknown or expired (never started, ended, failed, reclaimed for "
                f"a newer one, or idle over {self.settings.idle_timeout_s:g} s); start it again with the START flag "
                f"and the prompt's tensors"
            )
        if not self.owns(sequence):
            raise InputError(self._not_yours(sequence))
        shape = tuple(tensors["hidden_states"].shape) if "hidden_states" in tensors else None
        if shape != session.image_shape:
            raise InputError(
                f"hidden_states: shape {list(shape or [])} differs from {list(session.image_shape)} at the START "
                f"of sequence {sequence.sequence_id}; a sequence keeps its shapes (start another for another size)"
            )
        return session

    @staticmethod
    def _not_yours(sequence: SequenceStep) -> str:
        return (f"sequence {sequence.sequence_id}: {SESSION_KEY_PARAMETER} does not match the one it started with; "
                f"a sequence takes steps only from the client that started it")  # fmt: skip

    def finish(self, sequence: SequenceStep, failed: bool) -> None:
        """After a sequence's step: freed at END or when the step failed (only by its owner)."""
        if (sequence.end or failed) and self.owns(sequence):
            self._free(sequence.sequence_id)

    def _touch(self, sequence_id: int | str) -> None:
        self._open.move_to_end(sequence_id)
        self._open[sequence_id].last_used = self._clock()

    def _free(self, sequence_id: int | str) -> None:
        if self._open.pop(sequence_id, None) is not None:
            self._on_free(sequence_id)  # e.g. drop its cache state

    def drop(self, which: Callable[[Session], bool]) -> None:
        """Free the sequences ``which`` selects (e.g. those whose cache state is gone); their next step is unknown."""
        for key in [key for key, session in self._open.items() if which(session)]:
            self._free(key)

    def expire(self) -> float:
        """Free the sequences idle past the timeout; returns the time now."""
        now = self._clock()
        timeout = self.settings.idle_timeout_s
        for key in [key for key, session in self._open.items() if now - session.last_used > timeout]:
            self._free(key)
        return now
