"""The project's launchers bind tritonserver to loopback unless told otherwise (checked on the
sockets the real server listens on)."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_triton.deploy.server import TritonServer, free_port

pytestmark = pytest.mark.server


def listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (IPv4 and IPv6)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(_address(address))
    return addresses


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


def only_loopback(port: int) -> bool:
    addresses = listening(port)
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)


def _wait_listening(ports: list[int], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(listening(port) for port in ports):
        time.sleep(0.25)


def test_launcher_class_binds_loopback_by_default(dev_server):
    for port in (dev_server.http_port, dev_server.grpc_port, dev_server.metrics_port):
        assert only_loopback(port), (port, listening(port))


def test_launch_script_binds_loopback_by_default(tmp_path):
    """`python -m flux_triton serve` (what `make serve` runs) with no --address."""
    ports = [free_port() for _ in range(3)]
    (tmp_path / "empty_repository").mkdir()
    command = [sys.executable, "-m", "flux_triton", "serve", "--model-repository", str(tmp_path / "empty_repository")]
    command += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(ports)
        assert all(only_loopback(port) for port in ports), [listening(port) for port in ports]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_other_addresses_only_when_asked(tmp_path):
    server = TritonServer(tmp_path, address="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3)
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(server.command())
    assert server.url == "127.0.0.1:1"  # the tests and tools still talk to it over loopback
