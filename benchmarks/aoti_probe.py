"""Does an AOTInductor package (a 64x64 linear) load and run on this GPU? Each case runs in a child
process, so a crash in the loader is reported instead of ending the probe. The cases differ in the
C++ compiler inductor builds the package's wrapper with (``CXX``).

    python benchmarks/aoti_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

CASES = {"linear, CXX as set": {}, "linear, CXX=/usr/bin/g++": {"CXX": "/usr/bin/g++"}}


def run_case(folder: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(8, 64, device="cuda")
    exported = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / "linear.pt2"))
    describe(path, folder)
    runner = torch._inductor.aoti_load_package(path)
    print("max diff", (runner(x) - model(x)).abs().max().item())


def describe(package: str, folder: Path) -> None:
    """The shared libraries the package's wrapper needs (no libstdc++.so.6: it carries its own copy)."""
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder / "unpacked")
    for wrapper in (folder / "unpacked").rglob("*.wrapper.so"):
        needed = subprocess.run(["readelf", "-d", str(wrapper)], capture_output=True, text=True).stdout
        print("NEEDED:", [line.split("[")[-1].rstrip("]") for line in needed.splitlines() if "NEEDED" in line])


def main() -> None:
    if sys.argv[1:] == ["case"]:
        with tempfile.TemporaryDirectory() as folder:
            run_case(Path(folder))
        return
    for name, env in CASES.items():
        result = subprocess.run(
            [sys.executable, __file__, "case"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("NEEDED")]
        tail = (result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""])[-1]
        print(f"{name:<44} exit {result.returncode:>4}  {tail[:120]}", *lines, sep="\n    ", flush=True)


if __name__ == "__main__":
    main()
