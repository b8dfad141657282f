"""Launch the ``tritonserver`` that PyPI's ``nvidia-pytriton`` wheel bundles (2.51, Python backend).

The wheel ships the server, the Python backend and one backend stub per Python version; the stub
matching this interpreter is copied beside the backend in a private folder, and the server is
started from inside this virtualenv so that the stub imports its packages. In NVIDIA's Triton
container use its own ``tritonserver`` instead (README).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flux_triton.contract.protocol import ADMIN_KEY_ENV
from flux_triton.deploy.sockets import http_call

LOOPBACK = "127.0.0.1"
TRITON_HOME_ENV = "TRITONSERVER_HOME"
PR_SET_PDEATHSIG = 1
PORTS = ("http_port", "grpc_port", "metrics_port")
PORT_ATTEMPTS = 3


def triton_home() -> Path:
    """The tritonserver tree: ``$TRITONSERVER_HOME`` (e.g. ``/opt/tritonserver`` in NVIDIA's
    container, or an unpacked copy of the bundled one), else the one in ``nvidia-pytriton``."""
    if os.environ.get(TRITON_HOME_ENV):
        home = Path(os.environ[TRITON_HOME_ENV])
    else:
        import pytriton

        home = Path(pytriton.__file__).parent / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(
            f"no tritonserver binary under {home}; install nvidia-pytriton or set {TRITON_HOME_ENV}"
        )
    return home


def backend_directory(cache: Path) -> Path:
    """The backends folder. The bundled tree ships one Python-backend stub per Python version:
    the one for this interpreter is copied beside the backend in a private folder."""
    home = triton_home()
    stubs = home / "python_backend_stubs"
    if not stubs.is_dir():
        return home / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python_dir = cache / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [*(home / "backends" / "python").iterdir(), stubs / version / "triton_python_backend_stub"]
    for source in sources:
        target = python_dir / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    return python_dir.parent


def library_dirs(home: Path, cache: Path) -> list[str]:
    """The server's shared libraries (the wheel keeps them beside the package, an unpacked copy in ``lib/``)
    and a folder with only this Python's ``libpython``, which the stub embeds. Python's whole library folder
    (``/usr/lib/x86_64-linux-gnu`` for a distribution's Python) would put every library in it ahead of the ones
    torch links through its RUNPATH, in every model process: a system cuDNN or cuBLAS instead of torch's."""
    dirs = [str(d) for d in (home / "lib", home.parents[1] / "nvidia_pytriton.libs") if d.is_dir()]
    name = sysconfig.get_config_var("INSTSONAME")
    source = Path(sysconfig.get_config_var("LIBDIR") or "") / (name or "")
    if name and source.is_file():
        folder = cache / "libpython"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / name).exists():
            with contextlib.suppress(FileExistsError):  # another server starting at the same time
                (folder / name).symlink_to(source)
        dirs.append(str(folder.resolve()))
    return dirs


def child_environment() -> dict[str, str]:
    """This process's environment for a child, less the admin key: a child that needs it gets it through a pipe."""
    return {name: value for name, value in os.environ.items() if name != ADMIN_KEY_ENV}


def server_environment(extra: dict[str, str] | None = None, cache: Path = Path(".triton")) -> dict[str, str]:
    """The environment of tritonserver and its stubs (``child_environment``, with the server's libraries)."""
    env = child_environment()
    libs = library_dirs(triton_home(), cache)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when the process that started it ends (Linux), so that a killed
    ``serve`` leaves no tritonserver or guard behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_HANDED_OUT: set[int] = set()  # ports free_port gave this process: servers started at once never share one
_HANDING_OUT = threading.Lock()


def free_port(address: str = LOOPBACK) -> int:
    """A port free now that this process has not been given before (from any thread)."""
    with _HANDING_OUT:
        while True:
            with socket.socket() as sock:
                sock.bind((address, 0))
                port = sock.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


BACKEND_REGIONS = "triton_python_backend_shm_region_"  # the Python backend's IPC regions in /dev/shm


def _mapped_regions(pid: int) -> set[str]:
    """The Python backend's regions a process maps."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:  # gone, or another user's
        return set()
    return {line.rsplit("/", 1)[-1] for line in maps if f"/dev/shm/{BACKEND_REGIONS}" in line}


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def remove_orphan_regions(server_pid: int, min_age_s: float = 10.0, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink the Python backend's regions of the server ``server_pid`` that none of its stubs maps any more: a
    killed stub leaves its region behind, still mapped by the server until it exits (2.51). Only regions older
    than ``min_age_s`` (a new instance's region is mapped by its stub a moment after the server creates it)."""
    in_use = set().union(*(_mapped_regions(stub) for stub in _children(server_pid)))
    return _unlink(_mapped_regions(server_pid) - in_use, min_age_s, shm_dir)


def _unlink(names: set[str], min_age_s: float, shm_dir: Path) -> list[str]:
    removed = []
    for name in sorted(names):
        region = shm_dir / name
        try:
            if time.time() - region.stat().st_mtime < min_age_s:
                continue
            region.unlink()
            removed.append(name)
        except OSError:
            continue
    return removed


class ModelLoadError(RuntimeError):
    """A model of the repository failed to load; the message says which and why."""


@dataclass
class TritonServer:
    """A running ``tritonserver``: on loopback ports unless ``address`` says otherwise, or, with ``socket_dir`` (a
    folder only this user can enter), on Unix sockets in it that no other local user can reach or take over."""

    model_repository: Path
    address: str = LOOPBACK
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None  # None: the server's output goes where this process's does
    cache: Path = Path(".triton")
    model_control: bool = False  # explicit model control: every model loaded at start, reloads by its API
    socket_dir: Path | None = None
    server_id: str = field(default_factory=lambda: f"flux-triton-{secrets.token_hex(4)}")  # ``--id``: its metadata
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        given = [arg.removeprefix("--id=") for arg in self.args if arg.startswith("--id=")]
        if given:  # the server's own id, as tritonserver takes the last one: READY checks for it
            self.server_id = given[-1]

    @property
    def url(self) -> str:
        return self.endpoints[0]

    @property
    def endpoints(self) -> tuple[str, str, str]:
        """Where to reach its HTTP, gRPC and metrics endpoints: ``host:port``, or ``unix:PATH`` with ``socket_dir``."""
        if self.socket_dir is not None:
            return tuple(f"unix:{path}" for path in self._socket_paths())  # type: ignore[return-value]
        host = LOOPBACK if self.address in ("0.0.0.0", "") else self.address
        return f"{host}:{self.http_port}", f"{host}:{self.grpc_port}", f"{host}:{self.metrics_port}"

    def _socket_paths(self) -> tuple[Path, Path, Path]:
        # gRPC appends ":<port>" to a Unix address; HTTP and metrics (libevhtp) take the path as it is.
        return self.socket_dir / "http.sock", self.socket_dir / "grpc.sock:0", self.socket_dir / "metrics.sock"

    def _bind_args(self) -> list[str]:
        if self.socket_dir is None:
            ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
            return [arg for kind, port in ports.items() for arg in (f"--{kind}-address={self.address}",
                                                                     f"--{kind}-port={port}")]  # fmt: skip
        http, _, metrics = self._socket_paths()
        grpc = self.socket_dir / "grpc.sock"
        return [f"--http-address=unix:{http}", "--http-port=0", f"--grpc-address=unix:{grpc}", "--grpc-port=0",
                f"--metrics-address=unix:{metrics}", "--metrics-port=0"]  # fmt: skip

    def command(self) -> list[str]:
        control = ["--model-control-mode=explicit", "--load-model=*"] if self.model_control else []
        return [
            str(triton_home() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory(self.cache)}",
            f"--id={self.server_id}",
            *self._bind_args(),
            "--exit-on-error=false",
            *control,
            *self.args,
        ]

    def _repository_request(self, path: str, timeout_s: float) -> bytes:
        status, body = http_call(self.url, "POST", f"/v2/repository/{path}", b"{}", timeout_s=timeout_s)
        if status != 200:
            raise RuntimeError(f"tritonserver: /v2/repository/{path} answered {status}: {body[:300]!r}")
        return body

    def reload(self, model: str, timeout_s: float = 600.0) -> None:
        """Unload ``model``, then load it again: new instances, new Python-backend stubs (a load alone is a no-op
        for a model whose files did not change). With explicit model control; else the whole server restarts."""
        if not self.model_control:
            self.stop()
            self.start(timeout_s)
            return
        for action in ("unload", "load"):
            self._repository_request(f"models/{model}/{action}", timeout_s)

    def start(self, timeout_s: float = 180.0, wait_for: str = "ready") -> TritonServer:
        """Start the server and wait until it is ``ready`` (every model loaded) or only ``live``
        (up and answering, e.g. to ask ``model_states`` why a model did not load). Ports it chose itself are
        chosen again when another process took one before the server bound it."""
        if wait_for not in ("ready", "live"):
            raise ValueError(f"wait_for: expected 'ready' or 'live', got {wait_for!r}")
        chosen = [] if self.socket_dir is not None else [name for name in PORTS if not getattr(self, name)]
        for attempt in range(PORT_ATTEMPTS):
            for name in chosen:
                setattr(self, name, free_port(LOOPBACK))
            try:
                self._launch(timeout_s, wait_for)
                return self
            except RuntimeError:
                if not (chosen and attempt + 1 < PORT_ATTEMPTS and self._lost_a_port()):
                    raise
        raise AssertionError("unreachable")

    def _launch(self, timeout_s: float, wait_for: str) -> None:
        if self.socket_dir is not None:
            for path in self._socket_paths():  # a stale socket of an exited server would refuse the bind
                path.unlink(missing_ok=True)
        log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command(), env=server_environment(self.env, self.cache), stdout=log, stderr=log,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            if log is not None:
                log.close()  # the server writes through its own copy
        try:
            self.wait_ready(timeout_s, wait_for)
        except BaseException:
            self.stop()
            raise

    def _lost_a_port(self) -> bool:
        """Whether the server exited because a port it was given was taken meanwhile (its log says so)."""
        return self.log_path is not None and "already in use" in self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float, wait_for: str = "ready") -> None:
        """Wait for the health state; a model that failed to load ends the wait at once, with its reason."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}; log: {self.log_path}")
            if self._health(wait_for) and self._answers_as_itself():
                return
            if wait_for == "ready" and (failed := self.load_failures()):
                raise ModelLoadError(f"tritonserver is not ready: {failed}; log: {self.log_path}")
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not {wait_for} after {timeout_s:.0f} s; log: {self.log_path}")

    def is_ready(self) -> bool:
        return self._health("ready")

    def _health(self, state: str) -> bool:
        try:
            return http_call(self.url, "GET", f"/v2/health/{state}", timeout_s=2)[0] == 200
        except OSError:
            return False

    def _answers_as_itself(self) -> bool:
        """Whether its HTTP endpoint is this server's own: where another process holds the port, this server exits
        soon, and meanwhile the other answers (a Triton metrics service answers 200, empty, to every path)."""
        try:
            status, body = http_call(self.url, "GET", "/v2", timeout_s=2)
            return status == 200 and json.loads(body).get("name") == self.server_id
        except (OSError, ValueError):
            return False

    def model_states(self) -> dict[str, tuple[str, str]]:
        """Each model of the repository index: ``(state, reason)``, the reason being a load error."""
        try:
            index = json.loads(self._repository_request("index", 5))
        except (OSError, RuntimeError, ValueError):
            return {}
        return {entry["name"]: (entry.get("state", ""), entry.get("reason", "")) for entry in index}

    def load_failures(self) -> str:
        """Why models failed to load (``name: reason; ...``), or ``""``."""
        states = self.model_states().items()
        return "; ".join(f"{name}: {reason}" for name, (state, reason) in states if state == "UNAVAILABLE" and reason)

    def remove_orphan_regions(self, min_age_s: float = 10.0) -> list[str]:
        """Unlink the Python-backend regions of this server's dead stubs (``remove_orphan_regions``)."""
        if self.process is None or self.process.poll() is not None:
            return []
        return remove_orphan_regions(self.process.pid, min_age_s)

    def stop(self) -> None:
        """Stop the server; the regions of stubs that died before it are unlinked too (it leaves them)."""
        if self.process and self.process.poll() is None:
            regions = _mapped_regions(self.process.pid)
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            _unlink(regions, 0.0, Path("/dev/shm"))

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
