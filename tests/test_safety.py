"""The project's launchers bind tritonserver to loopback unless told otherwise (checked on the
sockets the real server listens on), and never take another process's port for the server's own."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flux_triton.contract.protocol import ADMIN_KEY_ENV
from flux_triton.deploy import server as launcher
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


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _tcp_listeners() -> set[str]:
    """Inodes of every listening TCP socket (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                found.add(fields[9])
    return found


def _connects_as_nobody(path: str) -> bool:
    """Whether an unprivileged user (uid 65534) can connect to the Unix socket ``path`` (a forked child that
    drops to that user and tries)."""
    child = os.fork()
    if child == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            socket.socket(socket.AF_UNIX).connect(path)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(child, 0)[1] == 0


def test_serve_keeps_its_backend_and_key_from_other_local_users(tmp_path):
    """``python -m flux_triton serve`` (what ``make serve`` runs, an empty repository here): only the guard listens,
    on loopback; tritonserver listens on no TCP port, only on Unix sockets in a folder that only this user can
    enter; the admin key is on no command line, in no child's environment and in no log; killed outright, the
    command takes its children with it."""
    key = "key-that-must-not-leak-" + os.urandom(8).hex()
    ports = [free_port() for _ in range(3)]
    (tmp_path / "empty_repository").mkdir()
    command = [sys.executable, "-m", "flux_triton", "serve", "--model-repository", str(tmp_path / "empty_repository")]
    command += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env={**os.environ, ADMIN_KEY_ENV: key}, stdout=output, stderr=output)
    try:
        _wait_listening(ports)
        assert all(only_loopback(port) for port in ports), [listening(port) for port in ports]
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        (server,) = [pid for pid in children if b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert not _socket_inodes(int(server)) & _tcp_listeners()
        argv = Path(f"/proc/{server}/cmdline").read_bytes().decode().split("\0")
        (socket_path,) = [arg.split("unix:", 1)[1] for arg in argv if arg.startswith("--http-address=unix:")]
        folder = Path(socket_path).parent
        assert folder.stat().st_uid == os.getuid() and folder.stat().st_mode & 0o077 == 0
        if os.geteuid() == 0:  # another user to try it with
            assert not _connects_as_nobody(socket_path)
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                assert key.encode() not in (entry / "cmdline").read_bytes(), entry
        for pid in children:
            assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
            time.sleep(0.2)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert key not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


def test_other_addresses_only_when_asked(tmp_path):
    server = TritonServer(tmp_path, address="0.0.0.0", http_port=1, grpc_port=2, metrics_port=3)
    assert {"--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(server.command())
    assert server.url == "127.0.0.1:1"  # the tests and tools still talk to it over loopback


class _EmptyAnswers(http.server.BaseHTTPRequestHandler):
    """Answers every GET 200 with no body, as Triton's metrics service does."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def taken_port():
    """A loopback port held by another HTTP service that answers every health check 200."""
    holder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyAnswers)
    threading.Thread(target=holder.serve_forever, daemon=True).start()
    yield holder.server_address[1]
    holder.shutdown()
    holder.server_close()


def test_a_server_whose_port_another_process_holds_is_not_ready(tmp_path, taken_port):
    """The other service answers the health checks while this server fails to bind and exits: that is not READY."""
    server = TritonServer(tmp_path, http_port=taken_port, log_path=tmp_path / "log", cache=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="tritonserver exited with code 1"):
        server.start(timeout_s=60)
    assert "already in use" in (tmp_path / "log").read_text()


def test_ports_the_launcher_chose_are_chosen_again_when_one_was_taken(tmp_path, taken_port, monkeypatch):
    """Another process took a port between the launcher's choice and the server's bind (two servers started at
    once, or a client's connection): the launcher starts the server again on new ports."""
    offered = iter([taken_port])
    monkeypatch.setattr(launcher, "free_port", lambda address: next(offered, None) or free_port(address))
    server = TritonServer(tmp_path, log_path=tmp_path / "log", cache=tmp_path / "cache")
    with server:
        assert taken_port not in (server.http_port, server.grpc_port, server.metrics_port)
        status, body = launcher.http_call(server.url, "GET", "/v2")
        assert status == 200 and json.loads(body)["name"] == server.server_id


def test_an_id_given_among_the_arguments_is_the_one_ready_checks_for(tmp_path):
    """``serve --id=NAME`` passes it on to tritonserver, which takes the last ``--id``: READY must look for it."""
    server = TritonServer(tmp_path, args=["--id=replica-7"], log_path=tmp_path / "log", cache=tmp_path / "cache")
    assert server.server_id == "replica-7" and server.command()[-1] == "--id=replica-7"
    with server:
        status, body = launcher.http_call(server.url, "GET", "/v2")
        assert status == 200 and json.loads(body)["name"] == "replica-7"
