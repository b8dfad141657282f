"""The package's layers, checked on every module's imports (``ast``, nothing imported):
``contract <- pipeline <- model <- serving / engines <- deploy <- tools``; the client uses only the
contract and the pipeline, and nothing but tools uses the client (what both ends of the wire share is
``contract.protocol``); the Triton model files only what runs inside a model; nothing imports tools,
tests or benchmarks."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from helpers import CHECKOUT

BASE = {"locations", "contract"}
# What each part of the package may import besides itself.
ALLOWED = {
    "locations": set(),
    "contract": set(),
    "pipeline": {"contract"},
    "model": BASE | {"pipeline"},
    "serving": BASE | {"pipeline", "model"},
    "engines": BASE | {"pipeline", "model"},
    "deploy": BASE | {"pipeline", "model", "serving", "engines"},
    "client": {"contract", "pipeline"},
    "tools": BASE | {"pipeline", "model", "serving", "engines", "deploy", "client"},
    "__init__": set(),
    "__main__": set(),  # dispatches by name (importlib), imports nothing
}
MODEL_FILES = BASE | {"pipeline", "model", "serving", "engines"}  # model_repository/*/1/model.py
OUTSIDE = ("tests", "benchmarks", "conftest", "helpers")  # no module of these may be imported


def imported(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def part(module: str) -> str | None:
    """The package part of ``flux_triton.<part>...``, else None."""
    pieces = module.split(".")
    return pieces[1] if pieces[0] == "flux_triton" and len(pieces) > 1 else None


def violations(package: Path, model_files: list[Path], others: list[Path]) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        own = relative.parts[0].removesuffix(".py")
        if own not in ALLOWED:
            found.append(f"{relative}: not in a known part of the package ({', '.join(ALLOWED)})")
            continue
        for module in imported(path):
            target = part(module)
            if target is not None and target != own and target not in ALLOWED[own]:
                found.append(f"{relative}: {own} imports {module}")
            if module.split(".")[0] in OUTSIDE:
                found.append(f"{relative}: imports {module}")
    for path in model_files:
        for module in imported(path):
            if part(module) is not None and part(module) not in MODEL_FILES:
                found.append(f"{path.name}: a Triton model file imports {module}")
    for path in others:
        for module in imported(path):
            top = module.split(".")[0]
            if top in ("benchmarks", "conftest") or top.startswith("test_") or part(module) == "tools":
                found.append(f"{path.relative_to(path.parents[1])}: imports {module}")
    return found


def tree(root: Path) -> tuple[Path, list[Path], list[Path]]:
    model_files = sorted((root / "model_repository").glob("*/1/model.py"))
    others = sorted([*(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py")])
    return root / "flux_triton", model_files, others


def test_every_import_runs_the_layers_one_way():
    assert violations(*tree(CHECKOUT)) == []


def test_a_wrong_way_import_is_caught(tmp_path):
    for folder in ("flux_triton", "model_repository", "tests", "benchmarks"):
        shutil.copytree(CHECKOUT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wrong = {
        "flux_triton/contract/step.py": "from flux_triton.deploy.server import TritonServer",
        "flux_triton/serving/merging.py": "from flux_triton.engines import kinds",
        "flux_triton/client/wire.py": "import flux_triton.model.store",
        "flux_triton/deploy/health.py": "from flux_triton.client.wire import infer_step",
        "flux_triton/model/store.py": "from flux_triton.tools import demo",
        "model_repository/dit_engine/1/model.py": "from flux_triton.deploy.pbtxt import ENGINE",
        "tests/test_gpu.py": "from test_repository import ort_sidecar",
        "benchmarks/served_step.py": "from benchmarks.gpu_bench import main",
    }
    for file, line in wrong.items():
        path = tmp_path / file
        path.write_text(path.read_text() + f"\n\ndef late():\n    {line}\n")
    found = "\n".join(violations(*tree(tmp_path)))
    assert "contract/step.py: contract imports flux_triton.deploy.server" in found
    assert "serving/merging.py: serving imports flux_triton.engines" in found
    assert "client/wire.py: client imports flux_triton.model.store" in found
    assert "deploy/health.py: deploy imports flux_triton.client.wire" in found
    assert "model/store.py: model imports flux_triton.tools" in found
    assert "model.py: a Triton model file imports flux_triton.deploy.pbtxt" in found
    assert "tests/test_gpu.py: imports test_repository" in found
    assert "benchmarks/served_step.py: imports benchmarks.gpu_bench" in found
