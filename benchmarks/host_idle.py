"""The host's CPU idle states, which a served step's chain of thread wake-ups pays for.

Between two steps of a served generation the client, tritonserver's HTTP, scheduler and instance threads and the
Python backend's stub each sleep for the ~95 ms of a step and are woken in turn. A CPU that went into a deep idle
state (or a virtual CPU that halted) takes longer to wake than the work it wakes for. ``shallow()`` holds
``/dev/cpu_dma_latency`` at 0 µs (the kernel's PM QoS interface, as tuned's latency-performance profile does) while it
is open, so that idle CPUs poll instead; it needs the right to write that file.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

LATENCY_FILE = Path("/dev/cpu_dma_latency")
CPUIDLE = Path("/sys/devices/system/cpu/cpuidle")


def describe() -> dict:
    """The idle driver and governor, CPU 0's idle states, whether the host is virtual, and whether ``shallow()`` can
    run here."""
    states = sorted((CPUIDLE.parent / "cpu0" / "cpuidle").glob("state*"))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpuidle_driver": _read(CPUIDLE / "current_driver"),
        "cpuidle_governor": _read(CPUIDLE / "current_governor"),
        "idle_states": [f"{_read(state / 'name')} ({_read(state / 'latency')} µs)" for state in states],
        "virtual": " hypervisor" in cpuinfo,
        "can_hold_latency": os.access(LATENCY_FILE, os.W_OK),
    }


@contextlib.contextmanager
def shallow() -> Iterator[None]:
    """CPUs kept out of idle states that take longer than 0 µs to leave, while inside."""
    descriptor = os.open(LATENCY_FILE, os.O_WRONLY)  # PermissionError: not this user's to set
    try:
        os.write(descriptor, struct.pack("i", 0))
        yield
    finally:
        os.close(descriptor)  # the request ends with the file


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
