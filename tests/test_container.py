"""The container image's build context, checked without building it (no registry access here): the base image is
pinned, every path the Dockerfile copies exists and reaches the build context, weights and engines never do, the
dependency step installs exactly the locked serving set, and the commands the image runs are accepted by the
project's own launcher."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import CHECKOUT

from flux_triton.deploy.commands import health_parser, serve_parser
from flux_triton.deploy.server import TRITON_HOME_ENV
from flux_triton.locations import ENGINES_DIR_ENV, HOME_ENV, MODEL_ROOT_ENV

DOCKERFILE = CHECKOUT / "Dockerfile"
BASE_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pt2", ".ckpt", ".plan", ".onnx", ".gguf")


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined and comments dropped."""
    found, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, arguments = current.strip().partition(" ")
        found.append((keyword.upper(), " ".join(arguments.split())))
        current = ""
    return found


def exec_form(arguments: str) -> list[str]:
    import json

    return json.loads(arguments)


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore's patterns as ``(negated, regex)``, in order (the last match decides)."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").lstrip("/"))
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: a pattern matches the path or a folder above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def context_files(root: Path, patterns) -> list[str]:
    """The files Docker sends as the build context of ``root``."""
    reincluded = [regex.pattern for negated, regex in patterns if negated]
    sent = []
    for folder, dirs, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in list(dirs):
            path = name if relative == "." else f"{relative}/{name}"
            # Skip a left-out folder unless a negated pattern may bring back something beneath it.
            if ignored(path, patterns) and not any(pattern.startswith(re.escape(path)) for pattern in reincluded):
                dirs.remove(name)
        for name in files:
            path = name if relative == "." else f"{relative}/{name}"
            if not ignored(path, patterns):
                sent.append(path)
    return sent


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def patterns():
    return ignore_patterns((CHECKOUT / ".dockerignore").read_text())


def test_the_base_image_is_a_pinned_triton_release_stated_in_the_docs(dockerfile):
    (base,) = [arguments for keyword, arguments in dockerfile if keyword == "FROM"]
    assert BASE_IMAGE.fullmatch(base), f"FROM {base}: expected NVIDIA's Triton image at a pinned yy.mm release"
    assert base in (CHECKOUT / "docs" / "deploy.md").read_text()
    assert "ARG" not in [keyword for keyword, _ in dockerfile[: dockerfile.index(("FROM", base))]]  # no override


def test_every_copied_path_exists_and_reaches_the_build_context(dockerfile, patterns):
    sent = set(context_files(CHECKOUT, patterns))
    copies = [arguments.split()[:-1] for keyword, arguments in dockerfile if keyword in ("COPY", "ADD")]
    assert copies and all(keyword != "ADD" for keyword, _ in dockerfile)
    for sources in copies:
        for source in sources:
            assert not source.startswith("--"), f"COPY {source}: the checks do not know this flag"
            path = CHECKOUT / source
            assert path.exists(), f"COPY {source}: not in the checkout"
            prefix = source.rstrip("/")
            reached = [f for f in sent if f == prefix or f.startswith(prefix + "/")]
            assert reached, f"COPY {source}: left out of the build context by .dockerignore"
    # Every Triton model file and every module of the package goes in.
    for tracked in [*CHECKOUT.glob("flux_triton/**/*.py"), *CHECKOUT.glob("model_repository/*/config.pbtxt")]:
        assert "__pycache__" in tracked.parts or str(tracked.relative_to(CHECKOUT)) in sent
    # hatchling reads the readme the project names, so it must be copied with pyproject.toml.
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    assert any(project["readme"] in sources for sources in copies)


def test_weights_engines_and_environments_never_reach_the_build_context(patterns):
    for path in [
        "models/tiny-flux-dev/diffusion_pytorch_model.safetensors",
        "models/FLUX.1-dev/transformer/config.json",
        "engines/flux-dev-bf16.plan",
        "engines/tiny-flux-dev-fp32-onnxruntime.json",
        "model_repository/dit_engine/1/flux-dev-bf16.plan",
        "model_repository/dit_transformer/1/weights.safetensors",
        ".venv/bin/python",
        ".git/HEAD",
        "out/model_repository-tensorrt/dit_engine/config.pbtxt",
        "flux_triton/__pycache__/locations.cpython-311.pyc",
    ]:
        assert ignored(path, patterns), f"{path} would be sent to the image build"
    sent = context_files(CHECKOUT, patterns)
    assert not [path for path in sent if path.endswith(WEIGHT_SUFFIXES)]
    assert len(sent) < 200, "the build context holds more than the package and its models"


def _environment(dockerfile) -> dict[str, str]:
    env = {}
    for keyword, arguments in dockerfile:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))
    return env


def test_weights_and_engines_come_from_volumes_named_by_the_package_settings(dockerfile):
    env = _environment(dockerfile)
    volumes = [v for keyword, arguments in dockerfile if keyword == "VOLUME" for v in exec_form(arguments)]
    assert env[MODEL_ROOT_ENV] in volumes and env[ENGINES_DIR_ENV] in volumes
    assert env[HOME_ENV] == "/opt/flux-triton" and env[TRITON_HOME_ENV] == "/opt/tritonserver"
    assert [arguments for keyword, arguments in dockerfile if keyword == "USER"] == ["triton-server"]


def test_the_image_runs_the_launcher_with_arguments_it_accepts(dockerfile):
    (entrypoint,) = [exec_form(a) for keyword, a in dockerfile if keyword == "ENTRYPOINT"]
    (command,) = [exec_form(a) for keyword, a in dockerfile if keyword == "CMD"]
    assert entrypoint == ["python3", "-m", "flux_triton", "serve"]
    args, extra = serve_parser().parse_known_args(command)
    assert extra == [], f"arguments serve does not know would go to tritonserver: {extra}"
    assert args.address == "0.0.0.0" and (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    served = str(args.model_repository)
    assert any(
        keyword == "RUN" and f"cp -r model_repository/dit_transformer {served}/" in a for keyword, a in dockerfile
    )
    exposed = [int(port) for keyword, a in dockerfile if keyword == "EXPOSE" for port in a.split()]
    assert exposed == [8000, 8001, 8002]
    (healthcheck,) = [a for keyword, a in dockerfile if keyword == "HEALTHCHECK"]
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[:4] == ["python3", "-m", "flux_triton", "health"]
    assert health_parser().parse_args(probe[4:]).url == f"127.0.0.1:{args.http_port}"


def test_the_dependency_step_installs_the_locked_serving_set(dockerfile, tmp_path):
    uv = shutil.which("uv") or str(CHECKOUT / ".tools" / "bin" / "uv")
    if not Path(uv).is_file():
        pytest.skip("no uv (make setup installs it)")
    (arg,) = [a for keyword, a in dockerfile if keyword == "ARG" and a.startswith("UV_VERSION=")]
    makefile = (CHECKOUT / "Makefile").read_text()
    assert f"UV_VERSION := {arg.split('=', 1)[1]}" in makefile, "the image and make pin the same uv"
    (run,) = [a for keyword, a in dockerfile if keyword == "RUN" and "uv export" in a]
    export = shlex.split(run.split("&&")[0])
    output = tmp_path / "requirements.txt"
    export[export.index("--output-file") + 1] = str(output)
    subprocess.run([uv, *export[1:]], cwd=CHECKOUT, check=True, capture_output=True, env={**os.environ,
                   "UV_OFFLINE": "1"})  # fmt: skip
    pinned = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", output.read_text(), re.MULTILINE))
    lock = tomllib.loads((CHECKOUT / "uv.lock").read_text())
    locked = {package["name"]: package["version"] for package in lock["package"] if "version" in package}
    for name in ("torch", "diffusers", "tritonclient", "onnxruntime", "grpcio", "aiohttp"):
        assert pinned[name] == locked[name], name
    for left_out in ("nvidia-pytriton", "pytest", "ruff", "flux-triton"):
        assert left_out not in pinned, f"{left_out} would be installed in the image"
    assert "--require-hashes" in run and "--system" in run
