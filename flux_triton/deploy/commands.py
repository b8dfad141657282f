"""The commands ``make`` runs, as ``python -m flux_triton <command>``: build an engine, generate its
repository, serve a repository. Their defaults are the shipped configuration."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from flux_triton.engines.kinds import DEFAULT_KIND, KINDS, kind_named, sidecar_path
from flux_triton.engines.profiles import PROFILE_PRESETS, ProfileConfig, preset_for
from flux_triton.locations import Locations
from flux_triton.model import store


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = "; ".join(f"{name}: {kind.summary}" for name, kind in KINDS.items())
    parser.add_argument("--kind", choices=list(KINDS), default=DEFAULT_KIND, help=f"engine kind ({kinds})")
    parser.add_argument("--precision", default=None, help="default: the kind's")
    parser.add_argument("--model", default=store.DEFAULT_MODEL, help="model name under the model root")
    parser.add_argument("--engines-dir", type=Path, default=None, help="default: $FLUX_ENGINE_DIR or engines/")
    parser.add_argument("--cache", default="none", help="the step cache flux_dit serves: none, a preset name or a "
                        "JSON spec (the aoti kinds)")  # fmt: skip


def _sidecar(args: argparse.Namespace) -> tuple[str, Path]:
    """The chosen precision (the kind's default if none) and the engine's sidecar path."""
    precision = kind_named(args.kind).precision(args.precision).name
    return precision, sidecar_path(args.engines_dir or Locations.here().engines_dir, args.model, precision, args.kind)


def engine(argv: list[str] | None = None) -> None:
    """``make engine``: build an engine and its sidecar, then generate and check its repository."""
    parser = argparse.ArgumentParser(prog="python -m flux_triton engine", description=engine.__doc__)
    _engine_arguments(parser)
    parser.add_argument("--profile", choices=sorted(PROFILE_PRESETS), default=None, help="default: by model")
    parser.add_argument("--max-batch", type=int, default=None, help="override the profile's max batch")
    parser.add_argument("--max-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="max pixels")
    parser.add_argument("--text-tokens", type=int, nargs=3, default=None, metavar=("MIN", "OPT", "MAX"))
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset of the ONNX kinds (default 19)")
    parser.add_argument("--fp8-scales", default=None, help="PRECISION fp8: the static activation scales file in "
                        "the model's folder, calibrated when missing (default fp8_scales.safetensors); per-token: "
                        "dynamic scales (aoti-fp8 only)")  # fmt: skip
    parser.add_argument("--opt-packages", action=argparse.BooleanOptionalAction, default=None,
                        help="aoti kinds: also compile the profile's opt shape alone, a few percent faster at that "
                        "shape (default: on a GPU)")  # fmt: skip
    parser.add_argument("--no-verify", action="store_true", help="skip the engine vs diffusers check")
    parser.add_argument("--if-missing", action="store_true", help="build only if the engine's sidecar is missing")
    parser.add_argument("--no-repo", action="store_true", help="do not generate the flux_dit repository")
    args = parser.parse_args(argv)
    from flux_triton.engines.build import build_engine

    try:
        precision, path = _sidecar(args)
        if args.if_missing and path.is_file():
            print(f"{path} exists")
        else:
            options = {"opset": args.opset} if args.opset else {}
            if args.fp8_scales is not None:
                if precision != "fp8":
                    raise ValueError(f"--fp8-scales: static scales are for PRECISION fp8, not {precision}")
                options["fp8_scales"] = "" if args.fp8_scales == "per-token" else args.fp8_scales
            if args.opt_packages is not None:
                if not args.kind.startswith("aoti"):
                    raise ValueError(f"--opt-packages: opt-shape packages are for the aoti kinds, not {args.kind}")
                options["opt_packages"] = args.opt_packages
            build_engine(
                args.kind, args.model, precision, _profile(args), path.parent, verify=not args.no_verify, **options
            )
        if not args.no_repo:
            from flux_triton.deploy.repository import generate

            generate(path, cache=args.cache)
    except (RuntimeError, ValueError) as exc:  # a missing toolchain or device, bad arguments: say which
        sys.exit(f"make engine: {exc}")


def _profile(args: argparse.Namespace) -> ProfileConfig:
    profile = PROFILE_PRESETS[args.profile or preset_for(args.model)]
    overrides = {}
    if args.max_batch:
        overrides["batch"] = (profile.batch[0], min(profile.batch[1], args.max_batch), args.max_batch)
    if args.max_size:
        overrides["max_size"] = tuple(args.max_size)
    if args.text_tokens:
        overrides["text_tokens"] = tuple(args.text_tokens)
    return ProfileConfig(**{**asdict(profile), **overrides})


def repo(argv: list[str] | None = None) -> None:
    """``make repo``: generate and check the flux_dit repository for a built engine."""
    parser = argparse.ArgumentParser(prog="python -m flux_triton repo", description=repo.__doc__)
    _engine_arguments(parser)
    parser.add_argument("--engine", type=Path, default=None, help="a sidecar (instead of --kind/--model/--precision)")
    parser.add_argument("--output", type=Path, default=None, help="default: model_repository/ for the default kind, "
                        "out/model_repository-<kind>/ otherwise")  # fmt: skip
    args = parser.parse_args(argv)
    from flux_triton.deploy.repository import generate

    try:
        generate(args.engine or _sidecar(args)[1], args.output, args.cache)
    except ValueError as exc:
        sys.exit(f"make repo: {exc}")


def serve_parser() -> argparse.ArgumentParser:
    """``serve``'s arguments (the container image's command and the Kubernetes manifests are checked against it)."""
    from flux_triton.deploy.guard import GuardSettings
    from flux_triton.deploy.health import PROBE_TIMEOUT_S
    from flux_triton.deploy.server import LOOPBACK

    parser = argparse.ArgumentParser(prog="python -m flux_triton serve", description=serve.__doc__)
    parser.add_argument("--model-repository", type=Path, default=None, help="default: model_repository/")
    parser.add_argument("--address", default=LOOPBACK, help="bind address (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--heal-interval", type=float, default=10.0, help="seconds between probes; 0: no probes")
    parser.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT_S, help="seconds a model may take to "
                        "answer its probe before it counts as hung (if it ran nothing else meanwhile)")  # fmt: skip
    GuardSettings.add_arguments(parser.add_argument_group("the guard's limits (GuardSettings)"))
    parser.add_argument("--no-guard", action="store_true", help="expose tritonserver itself, without restricted "
                        "APIs and with model control off (trusted clients only)")  # fmt: skip
    return parser


def serve(argv: list[str] | None = None) -> None:
    """``make serve``: tritonserver over a model repository behind the guard (``python -m flux_triton guard``),
    bound to loopback unless told otherwise, kept serving: every model is probed with a real inference on an
    interval and reloaded if it fails, and an exited server or guard started again. tritonserver listens only on
    Unix sockets in a private folder, and the admin key reaches the guard through a pipe, never a command line.
    The children end with this process. Further arguments go to tritonserver."""
    import shutil
    import tempfile

    from flux_triton.contract.protocol import ADMIN_KEY_ENV
    from flux_triton.deploy.guard import GuardSettings
    from flux_triton.deploy.guard.process import GuardProcess
    from flux_triton.deploy.health import Supervisor
    from flux_triton.deploy.server import TritonServer

    args, extra = serve_parser().parse_known_args(argv)
    repository = (args.model_repository or Locations.here().repository).resolve()
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
    private = Path(tempfile.mkdtemp(prefix="flux-triton-"))  # mode 0700: this user's only
    guard, server = None, TritonServer(repository, args.address, *ports, args=extra)
    if not args.no_guard:
        guard = GuardProcess(args.address, ports, GuardSettings.from_arguments(args), admin_key)
        server = TritonServer(repository, args=extra, model_control=True, socket_dir=private)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the children on the way out
    try:
        server.start(timeout_s=3600)
        if guard:
            guard.start(server.endpoints)
        probes = f"every model probed every {args.heal_interval:g} s" if args.heal_interval > 0 else "no probes"
        print(f"serving {repository} at {args.address}:{args.http_port}; {probes}", flush=True)
        log = lambda line: print(f"[supervisor] {line}", flush=True)  # noqa: E731
        Supervisor(server, args.heal_interval, log, guard, admin_key, args.probe_timeout).run()
    finally:
        if guard:
            guard.stop()
        server.stop()
        shutil.rmtree(private, ignore_errors=True)


def health(argv: list[str] | None = None) -> None:
    """Probe every model of this project on a running server with a real inference (a liveness check:
    Triton's own ready endpoint stays 200 when a model's stub has died); exit 1 if one fails."""
    from flux_triton.contract.protocol import ADMIN_KEY_ENV, admin_headers
    from flux_triton.deploy.health import check

    args = health_parser().parse_args(argv)
    results = check(args.url, admin_headers(os.environ.get(ADMIN_KEY_ENV)), grpc_url=args.grpc_url)
    for model, why in results.items():
        print(f"{model:<16} {'ok' if why is None else why}")
    if not results or any(results.values()):
        sys.exit(1)


def health_parser() -> argparse.ArgumentParser:
    """``health``'s arguments (a container's liveness check runs it)."""
    parser = argparse.ArgumentParser(prog="python -m flux_triton health", description=health.__doc__)
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP endpoint")
    parser.add_argument("--grpc-url", default="127.0.0.1:8001", help="its gRPC endpoint (flux_generate_stream)")
    return parser
