"""Launch the ``tritonserver`` that PyPI's ``nvidia-pytriton`` wheel bundles (2.51, Python backend).

The wheel ships the server, the Python backend and one backend stub per Python version; the stub
matching this interpreter is copied beside the backend in a private folder, and the server is
started from inside this virtualenv so that the stub imports its packages. In NVIDIA's Triton
container use its own ``tritonserver`` instead (README).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flux_triton.client.connection import ADMIN_HEADER, admin_headers

LOOPBACK = "127.0.0.1"
# The APIs a supervised server restricts to requests carrying the admin key.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging")
TRITON_HOME_ENV = "TRITONSERVER_HOME"


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


def server_environment(extra: dict[str, str] | None = None, cache: Path = Path(".triton")) -> dict[str, str]:
    env = dict(os.environ)
    libs = library_dirs(triton_home(), cache)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def free_port(address: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


BACKEND_REGIONS = "triton_python_backend_shm_region_*"  # the Python backend's IPC regions in /dev/shm


def remove_orphan_regions(min_age_s: float = 10.0, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink the Python backend's IPC regions that no stub maps any more: a killed stub leaves its region
    behind, still mapped by the server until it exits (2.51). Only this user's regions older than
    ``min_age_s`` (a new instance's region is mapped by its stub a moment after the server creates it)."""
    in_use = set()
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if not (process / "cmdline").read_bytes().split(b"\0")[0].endswith(b"triton_python_backend_stub"):
                continue
            in_use.update(line.rsplit("/", 1)[-1] for line in (process / "maps").read_text().splitlines())
        except OSError:  # gone, or another user's
            continue
    removed = []
    for region in shm_dir.glob(BACKEND_REGIONS):
        try:
            stat = region.stat()
            if region.name in in_use or stat.st_uid != os.getuid() or time.time() - stat.st_mtime < min_age_s:
                continue
            region.unlink()
            removed.append(region.name)
        except OSError:
            continue
    return removed


class ModelLoadError(RuntimeError):
    """A model of the repository failed to load; the message says which and why."""


@dataclass
class TritonServer:
    """A running ``tritonserver``; bound to loopback unless ``address`` says otherwise."""

    model_repository: Path
    address: str = LOOPBACK
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None  # None: the server's output goes where this process's does
    cache: Path = Path(".triton")
    admin_key: str | None = None  # set: model control in explicit mode, its API only with this key
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.endpoints[0]

    @property
    def endpoints(self) -> tuple[str, str, str]:
        """Where to reach its HTTP, gRPC and metrics ports."""
        host = LOOPBACK if self.address in ("0.0.0.0", "") else self.address
        return f"{host}:{self.http_port}", f"{host}:{self.grpc_port}", f"{host}:{self.metrics_port}"

    def command(self) -> list[str]:
        return [
            str(triton_home() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory(self.cache)}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=false",
            *self._control_args(),
            *self.args,
        ]

    def _control_args(self) -> list[str]:
        """With an admin key: every model loaded at start, and the repository (index, load, unload),
        shared-memory and logging APIs restricted to requests that carry the key, over HTTP and gRPC."""
        if not self.admin_key:
            return []
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        return [
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
        ]

    def _repository_request(self, path: str, timeout_s: float):
        headers = admin_headers(self.admin_key) or {}
        request = urllib.request.Request(f"http://{self.url}/v2/repository/{path}", b"{}", headers, method="POST")
        return urllib.request.urlopen(request, timeout=timeout_s)

    def reload(self, model: str, timeout_s: float = 600.0) -> None:
        """Unload ``model``, then load it again: new instances, new Python-backend stubs (a load alone
        is a no-op for a model whose files did not change). Needs the admin key."""
        for action in ("unload", "load"):
            with self._repository_request(f"models/{model}/{action}", timeout_s):
                pass

    def start(self, timeout_s: float = 180.0, wait_for: str = "ready") -> TritonServer:
        """Start the server and wait until it is ``ready`` (every model loaded) or only ``live``
        (up and answering, e.g. to ask ``model_states`` why a model did not load)."""
        if wait_for not in ("ready", "live"):
            raise ValueError(f"wait_for: expected 'ready' or 'live', got {wait_for!r}")
        for name in ("http_port", "grpc_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port(LOOPBACK))
        log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(), env=server_environment(self.env, self.cache), stdout=log, stderr=log
        )
        try:
            self.wait_ready(timeout_s, wait_for)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float, wait_for: str = "ready") -> None:
        """Wait for the health state; a model that failed to load ends the wait at once, with its reason."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}; log: {self.log_path}")
            if self._health(wait_for):
                return
            if wait_for == "ready" and (failed := self.load_failures()):
                raise ModelLoadError(f"tritonserver is not ready: {failed}; log: {self.log_path}")
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not {wait_for} after {timeout_s:.0f} s; log: {self.log_path}")

    def is_ready(self) -> bool:
        return self._health("ready")

    def _health(self, state: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/{state}", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def model_states(self) -> dict[str, tuple[str, str]]:
        """Each model of the repository index: ``(state, reason)``, the reason being a load error."""
        try:
            with self._repository_request("index", 5) as response:
                index = json.load(response)
        except OSError:
            return {}
        return {entry["name"]: (entry.get("state", ""), entry.get("reason", "")) for entry in index}

    def load_failures(self) -> str:
        """Why models failed to load (``name: reason; ...``), or ``""``."""
        states = self.model_states().items()
        return "; ".join(f"{name}: {reason}" for name, (state, reason) in states if state == "UNAVAILABLE" and reason)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
