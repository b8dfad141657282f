"""``python -m flux_triton guard``: the guard's process, in front of a running tritonserver, and its launcher. It
imports neither torch nor the models. The admin key comes through its standard input (an inherited pipe) or a file
only its user can read, never from the command line, which every local user can see."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from flux_triton.deploy.guard import GuardSettings
from flux_triton.deploy.guard.grpc_side import grpc_server
from flux_triton.deploy.guard.http_side import HttpGuard, http_app, metrics_app
from flux_triton.deploy.guard.policy import Policy
from flux_triton.deploy.server import LOOPBACK, child_environment, die_with_parent

KINDS = ("http", "grpc", "metrics")


async def serve_guard(address: str, ports: tuple[int, int, int], backends: tuple[str, str, str],
                      settings: GuardSettings, admin_key: str | None) -> None:  # fmt: skip
    policy = Policy(admin_key, frozenset(settings.internal_models))
    http = HttpGuard(backends[0], settings, policy)
    runners = []
    for app, port in ((http_app(http), ports[0]), (metrics_app(backends[2]), ports[2])):
        # auto_decompress off: a compressed body is refused, never inflated
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await runner.setup()
        await web.TCPSite(runner, address, port).start()
        runners.append(runner)
    server = grpc_server(address, ports[1], backends[1], http)
    await server.start()
    print(f"guard: {address}:{ports[0]} (HTTP), {ports[1]} (gRPC), {ports[2]} (metrics) -> {', '.join(backends)}; "
          f"requests up to {settings.max_request_mib} MiB, {settings.max_buffered_mib} MiB of bodies at once",
          flush=True)  # fmt: skip
    try:
        await server.wait_for_termination()
    finally:
        for runner in runners:
            await runner.cleanup()
        await http.close()


def read_key(args: argparse.Namespace) -> str | None:
    if args.admin_key_stdin:
        return sys.stdin.readline().strip() or None
    if args.admin_key_file is not None:
        return args.admin_key_file.read_text().strip() or None
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m flux_triton guard``: the guard alone, in front of a running tritonserver."""
    parser = argparse.ArgumentParser(prog="python -m flux_triton guard", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=LOOPBACK, help="bind address (default: loopback only)")
    for kind, port in zip(KINDS, (8000, 8001, 8002), strict=True):
        parser.add_argument(f"--{kind}-port", type=int, default=port, help=f"public {kind} port")
        parser.add_argument(f"--{kind}-backend", required=True, help=f"tritonserver's {kind} HOST:PORT or unix:PATH")
    parser.add_argument("--admin-key-stdin", action="store_true", help="read the admin key from the first line of "
                        "standard input")  # fmt: skip
    parser.add_argument("--admin-key-file", type=Path, default=None, help="or from a file (neither: every "
                        "restricted API is refused)")  # fmt: skip
    GuardSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = GuardSettings.from_arguments(args)
    ports = tuple(getattr(args, f"{kind}_port") for kind in KINDS)
    backends = tuple(getattr(args, f"{kind}_backend") for kind in KINDS)
    asyncio.run(serve_guard(args.address, ports, backends, settings, read_key(args)))


@dataclass
class GuardProcess:
    """``python -m flux_triton guard`` as a child process, ended with its parent; the admin key goes through a pipe."""

    address: str
    ports: tuple[int, int, int]  # public HTTP, gRPC, metrics
    settings: GuardSettings
    admin_key: str | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Where to reach its HTTP port from this host."""
        return f"{self._host}:{self.ports[0]}"

    @property
    def grpc_url(self) -> str:
        return f"{self._host}:{self.ports[1]}"

    @property
    def _host(self) -> str:
        return LOOPBACK if self.address in ("0.0.0.0", "") else self.address

    def command(self, backends: tuple[str, str, str]) -> list[str]:
        command = [sys.executable, "-m", "flux_triton", "guard", "--address", self.address]
        for kind, port, backend in zip(KINDS, self.ports, backends, strict=True):
            command += [f"--{kind}-port={port}", f"--{kind}-backend={backend}"]
        if self.admin_key:
            command.append("--admin-key-stdin")
        return [*command, *self.settings.arguments()]

    def start(self, backends: tuple[str, str, str], timeout_s: float = 30.0) -> GuardProcess:
        """Start in front of tritonserver's HTTP, gRPC and metrics endpoints; return once it listens."""
        self.process = subprocess.Popen(self.command(backends), stdin=subprocess.PIPE, text=True,
                                        env=child_environment(), preexec_fn=die_with_parent)  # fmt: skip
        self.process.stdin.write(f"{self.admin_key or ''}\n")
        self.process.stdin.close()
        host, port = self.url.rsplit(":", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running():
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the guard did not listen on {self.url} within {timeout_s:.0f} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running():
            self.process.terminate()
            self.process.wait(timeout=30)
