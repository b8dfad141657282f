"""System shared memory for same-host clients: tensors go through /dev/shm regions registered
with the server, and only the inputs that changed since the previous call are rewritten.

One region per (slot, input): the slot is the pipeline's cache context ("cond", "uncond"), so
true CFG keeps both prompts' embeddings in place. At the start of each generation (a timestep not
below the slot's previous one: a pipeline's timesteps fall) the held inputs are compared with the
regions' contents and rewritten where they differ, so that a region altered by another process
cannot change more than the rest of one generation. ``noise_pred`` comes back through an output
region. Regions grow when a larger shape comes and are unregistered and unlinked on ``close``
(also at exit and when the transport is garbage-collected).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from flux_triton.client.wire import sequence_arguments
from flux_triton.contract import OUTPUT_NAME, TORCH_TO_TRITON
from flux_triton.contract.protocol import SequenceStep

KEY_PREFIX = "flux_triton_"
"""Every region's /dev/shm name starts with this, then the process id and 128 random bits; the name the server
knows it by is another 128 random bits, so a listing of /dev/shm does not give it away."""

# Bit-exact views: regions are written and compared as integers of the element's width.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_BITS = {torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


_CHUNK = 1 << 16  # elements compared at a time: a changed tensor (new latents) differs in the first chunk


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers in host memory (a GPU tensor is copied to the host)."""
    return tensor.detach().reshape(-1).view(_BITS[tensor.element_size()]).cpu()


def _same_bits(left: np.ndarray, right: np.ndarray) -> bool:
    """Bitwise equality, chunk by chunk so that a difference stops the comparison early
    (single-threaded numpy: torch's thread pool costs more than it saves on a busy host)."""
    for start in range(0, left.size, _CHUNK):
        if not np.array_equal(left[start : start + _CHUNK], right[start : start + _CHUNK]):
            return False
    return True


@dataclass
class Region:
    """One registered region: its Triton name, /dev/shm key and capacity."""

    name: str
    key: str
    capacity: int
    handle: shm.SharedMemoryRegion

    def write(self, tensor: torch.Tensor) -> None:
        shm.set_shared_memory_region(self.handle, [_bits(tensor).numpy()])

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the region's first bytes are bit for bit ``tensor``."""
        bits = _bits(tensor)
        view = shm.get_contents_as_numpy(self.handle, _NUMPY_BITS[bits.dtype], [bits.numel()])
        try:
            return _same_bits(view, bits.numpy())
        finally:
            del view  # release the buffer export, or the region cannot be closed

    def read(self, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        count = int(np.prod(shape))
        bits = _BITS[torch.empty((), dtype=dtype).element_size()]
        view = shm.get_contents_as_numpy(self.handle, _NUMPY_BITS[bits], [count])
        try:
            return torch.from_numpy(view.copy()).view(dtype).reshape(shape)
        finally:
            del view


@dataclass
class _Slot:
    """What an input region holds: the tensor last written (kept alive, so that its memory is
    not reused by another tensor) and its version counter at that time."""

    region: Region
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    source: torch.Tensor | None = None
    version: int = -1

    def same(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the memory last written, not written to in place since."""
        return self._fits(tensor) and tensor.data_ptr() == self.source.data_ptr() and tensor._version == self.version

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the region holds ``tensor`` bit for bit."""
        return self._fits(tensor) and self.region.holds(tensor)

    def _fits(self, tensor: torch.Tensor) -> bool:
        return self.source is not None and tensor.shape == self.shape and tensor.dtype == self.dtype

    def store(self, tensor: torch.Tensor) -> int:
        self.source = None  # a failed write leaves the slot unknown
        self.region.write(tensor)
        self.shape, self.dtype, self.source, self.version = tensor.shape, tensor.dtype, tensor, tensor._version
        return tensor.nbytes


@dataclass
class _Regions:
    """The regions of one transport; a separate object so that the finalizer does not hold the transport."""

    client: httpclient.InferenceServerClient
    headers: dict[str, str] | None = None  # the server's admin key, where the shared-memory API is restricted
    regions: list[Region] = field(default_factory=list)

    def create(self, byte_size: int) -> Region:
        name = f"{KEY_PREFIX}{secrets.token_hex(16)}"  # the server's name for it: a secret of this client
        key = f"/{KEY_PREFIX}{os.getpid()}_{secrets.token_hex(16)}"
        handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)
        region = Region(name, key, byte_size, handle)
        self.regions.append(region)
        self.client.register_system_shared_memory(name, key, byte_size, headers=self.headers)
        return region

    def destroy(self, region: Region) -> None:
        self.regions.remove(region)
        try:
            self.client.unregister_system_shared_memory(region.name, headers=self.headers)
        except Exception:  # the server is gone: its mapping went with it
            pass
        finally:
            shm.destroy_shared_memory_region(region.handle)

    def register_again(self) -> None:
        """Register every region anew (after a server restart or an unregister; their contents are ours)."""
        for region in self.regions:
            with contextlib.suppress(InferenceServerException):  # not registered any more
                self.client.unregister_system_shared_memory(region.name, headers=self.headers)
            self.client.register_system_shared_memory(region.name, region.key, region.capacity, headers=self.headers)

    def close(self) -> None:
        for region in list(self.regions):
            self.destroy(region)


class ShmTransport:
    """Step requests through system shared memory; one call at a time (a lock serialises them).

    ``written`` has one entry per call: the bytes written into each input region (inputs left
    out were unchanged and not rewritten). ``repaired`` counts held inputs whose region was found
    altered at a generation's start and written again."""

    def __init__(self, client: httpclient.InferenceServerClient, headers: dict[str, str] | None = None):
        self._regions = _Regions(client, headers)
        self._headers = headers  # a request that names regions carries the admin key too (the guard checks it)
        self._finalizer = weakref.finalize(self, _Regions.close, self._regions)
        self._client = client
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._output: Region | None = None
        self._lock = threading.Lock()
        self.written: list[dict[str, int]] = []
        self.reregistered = 0  # times the regions were registered again after the server lost them
        self.repaired = 0
        self._last_timestep: dict[str, float] = {}

    @property
    def regions(self) -> list[tuple[str, str]]:
        """Each live region's name on the server and its /dev/shm key."""
        return [(region.name, region.key) for region in self._regions.regions]

    def _region_for(self, current: Region | None, byte_size: int) -> Region:
        if current is not None and current.capacity >= byte_size:
            return current
        if current is not None:
            self._regions.destroy(current)
        return self._regions.create(byte_size)

    def _generation_starts(self, slot: str, timestep: torch.Tensor) -> bool:
        """Whether this call starts a generation in ``slot``: its timestep is not below the previous one."""
        current, previous = float(timestep.reshape(-1)[0]), self._last_timestep.get(slot)
        self._last_timestep[slot] = current
        return previous is None or current >= previous

    def _input(
        self, slot_name: str, name: str, tensor: torch.Tensor, written: dict[str, int], verify: bool
    ) -> httpclient.InferInput:
        slot = self._slots.get((slot_name, name))
        region = self._region_for(slot.region if slot else None, tensor.nbytes)
        if slot is None or slot.region is not region:
            slot = self._slots[(slot_name, name)] = _Slot(region)
        same = slot.same(tensor)
        if (verify or not same) and not slot.holds(tensor):
            self.repaired += same  # the region was altered behind this transport's back
            written[name] = slot.store(tensor)
        item = httpclient.InferInput(name, list(tensor.shape), TORCH_TO_TRITON[tensor.dtype])
        item.set_shared_memory(region.name, tensor.nbytes)
        return item

    def infer(
        self,
        model_name: str,
        tensors: Mapping[str, torch.Tensor],
        model_version: str = "",
        slot: str = "call",
        sequence: SequenceStep | None = None,
    ) -> torch.Tensor:
        """Send one step and return ``noise_pred`` (shaped and typed like ``hidden_states``)."""
        if not self._finalizer.alive:
            raise RuntimeError("the shared-memory transport is closed")
        with self._lock:
            written: dict[str, int] = {}
            verify = self._generation_starts(slot, tensors["timestep"])
            inputs = [self._input(slot, name, t.contiguous(), written, verify) for name, t in tensors.items()]
            latents = tensors["hidden_states"]
            output = self._output = self._region_for(self._output, latents.nbytes)
            requested = httpclient.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
            requested.set_shared_memory(output.name, latents.nbytes)
            self.written.append(written)
            call = dict(model_version=model_version, outputs=[requested], **sequence_arguments(sequence, self._headers))
            try:
                result = self._client.infer(model_name, inputs, **call)
            except InferenceServerException as exc:
                if "unable to find shared memory region" not in str(exc.message()).lower():
                    raise
                # The server lost the registrations (it restarted, or they were unregistered): once more.
                self._regions.register_again()
                self.reregistered += 1
                result = self._client.infer(model_name, inputs, **call)
            reply = result.get_output(OUTPUT_NAME)
            if reply is None or reply.get("datatype") != TORCH_TO_TRITON[latents.dtype]:
                raise RuntimeError(f"{model_name}: unexpected {OUTPUT_NAME} in the reply: {reply}")
            return output.read(latents.dtype, [int(d) for d in reply["shape"]])

    def close(self) -> None:
        """Unregister and unlink every region (idempotent)."""
        with self._lock:
            self._slots.clear()
            self._output = None
            self._finalizer()

    def __enter__(self) -> ShmTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
