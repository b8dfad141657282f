"""Generation sessions of ``dit_transformer``: one generation (one cache context of one pipeline call) is
one sequence, a Triton correlation id whose first step carries the START flag and whose last the END flag.

The prompt's tensors (``HELD``: the contract's ``PROMPT_INPUTS``) come with the START step, or whenever
they change, and are kept on the model's device; the other steps send the latents, the timestep and the
image ids only. A sequence is freed at END, when one of its steps fails, and once idle for
``idle_timeout_s``; at most ``max_sessions`` are live, so the memory they hold is bounded by
``max_sessions`` x one prompt's tensors (512 text tokens of a full-size model in bf16: 4.2 MB each).
A step of END with zero image tokens only ends its sequence. Requests without a correlation id are
stateless steps, exactly as before sessions.

Triton's sequence batcher would refuse those stateless requests, so the model keeps the sessions itself,
behind the dynamic batcher; steps of different generations still merge into one forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flux_triton.contract import PROMPT_INPUTS as HELD
from flux_triton.contract import InputError

PROMPT = HELD[:3]  # required at START (guidance as the model requires it)
START, END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END, as the Python backend's request.flags()


@dataclass(frozen=True)
class SessionSettings:
    max_sessions: int = 64
    idle_timeout_s: float = 600.0  # a client between two steps of one generation waits well under this


@dataclass
class Session:
    held: dict[str, torch.Tensor]
    image_shape: tuple[int, ...]
    last_used: float
    cached: bool = False  # the sequence chose the model's step cache at START


def closes_only(tensors: Mapping[str, torch.Tensor], flags: int) -> bool:
    """An END step with zero image tokens: it ends its sequence and runs no forward."""
    latents = tensors.get("hidden_states")
    return bool(flags & END) and latents is not None and latents.ndim == 3 and latents.shape[1] == 0


class Sessions:
    """The live sequences of one model instance, by correlation id."""

    def __init__(
        self,
        settings: SessionSettings = SessionSettings(),
        clock: Callable[[], float] = time.monotonic,
        on_free: Callable[[int | str], None] | None = None,
    ):
        self.settings = settings
        self._clock = clock
        self._open: dict[int | str, Session] = {}
        self._on_free = on_free or (lambda sequence_id: None)

    def __len__(self) -> int:
        return len(self._open)

    def get(self, sequence_id: int | str) -> Session | None:
        return self._open.get(sequence_id)

    def step_tensors(
        self, sequence_id: int | str, flags: int, tensors: Mapping[str, torch.Tensor], cached: bool = False
    ) -> dict:
        """The step's tensors: the request's, with the sequence's held prompt filled in (``tensors`` already
        on the model's device). Opens the sequence at START (``cached``: with the model's step cache); raises
        ``InputError`` for a step that cannot be part of one (the caller frees the sequence)."""
        now = self._clock()
        session = (
            self._start(sequence_id, tensors, now, cached) if flags & START else self._continue(sequence_id, tensors)
        )
        # A copy: the request's tensors may live in Triton's buffers, freed after the response.
        session.held.update({name: tensors[name].clone() for name in HELD if name in tensors})
        session.last_used = now
        return {**session.held, **tensors}

    def _start(self, sequence_id: int | str, tensors: Mapping[str, torch.Tensor], now: float, cached: bool) -> Session:
        missing = [name for name in PROMPT if name not in tensors]
        if missing:
            raise InputError(f"{missing[0]}: missing at the START of sequence {sequence_id}; the first step of a "
                             f"sequence carries the prompt's tensors ({', '.join(PROMPT)})")  # fmt: skip
        self._free(sequence_id)  # a START of a live id starts it clean
        if len(self._open) >= self.settings.max_sessions:
            raise InputError(
                f"sequence {sequence_id}: {len(self._open)} sequences are live, this server's limit; end one "
                f"(END flag) or let idle ones expire ({self.settings.idle_timeout_s:g} s)"
            )
        session = self._open[sequence_id] = Session({}, tuple(tensors["hidden_states"].shape), now, cached)
        return session

    def _continue(self, sequence_id: int | str, tensors: Mapping[str, torch.Tensor]) -> Session:
        session = self._open.get(sequence_id)
        if session is None:
            raise InputError(
                f"sequence {sequence_id}: unknown or expired (never started, ended, failed, or idle over "
                f"{self.settings.idle_timeout_s:g} s); start it again with the START flag and the prompt's tensors"
            )
        shape = tuple(tensors["hidden_states"].shape) if "hidden_states" in tensors else None
        if shape != session.image_shape:
            raise InputError(
                f"hidden_states: shape {list(shape or [])} differs from {list(session.image_shape)} at the START "
                f"of sequence {sequence_id}; a sequence keeps its shapes (start another for another size)"
            )
        return session

    def finish(self, sequence_id: int | str, flags: int, failed: bool) -> None:
        """After a sequence's step: freed at END or when the step failed."""
        if flags & END or failed:
            self._free(sequence_id)

    def _free(self, sequence_id: int | str) -> None:
        if self._open.pop(sequence_id, None) is not None:
            self._on_free(sequence_id)  # e.g. drop its cache state

    def expire(self) -> float:
        """Free the sequences idle past the timeout; returns the time now."""
        now = self._clock()
        idle = [key for key, session in self._open.items() if now - session.last_used > self.settings.idle_timeout_s]
        for key in idle:
            self._free(key)
        return now
