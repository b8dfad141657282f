"""Does an AOTInductor package load and run on this GPU? Each case runs in a child process, so a
crash in the loader is reported instead of ending the probe.

    python benchmarks/aoti_probe.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CASES = {
    "linear, default device_index": "linear:-1",
    "linear, device_index=0": "linear:0",
    "tiny FLUX blocks (export.aoti), device_index=0": "flux:0",
}


def run_case(case: str, folder: Path) -> None:
    kind, index = case.split(":")
    torch.manual_seed(0)
    if kind == "linear":
        model = torch.nn.Linear(64, 64).cuda()
        x = torch.randn(8, 64, device="cuda")
        exported = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(folder / "linear.pt2"))
        runner = torch._inductor.aoti_load_package(path, device_index=int(index))
        print("max diff", (runner(x) - model(x)).abs().max().item())
        return
    from export import aoti
    from flux_triton import model_store, reference
    from flux_triton.contract import DitSignature

    model = model_store.build_tiny("tiny-flux-dev").cuda().to(torch.bfloat16)
    signature = DitSignature.from_config(model.config, torch.bfloat16)
    step = reference.random_step(signature, batch=2, height=256, width=256, text_tokens=8, device="cuda")
    expected = reference.diffusers_call(model, step)
    record = aoti.build(model, folder, aoti.AotiProfile.preset("tiny"))
    aoti.attach(model, folder, record["packages"])
    print("max diff", (reference.diffusers_call(model, step) - expected).abs().max().item())


def main() -> None:
    if len(sys.argv) == 2:
        with tempfile.TemporaryDirectory() as folder:
            run_case(sys.argv[1], Path(folder))
        return
    for name, case in CASES.items():
        result = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=300)
        tail = (result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""])[-1]
        print(f"{name:<48} exit {result.returncode:>4}  {tail[:120]}", flush=True)


if __name__ == "__main__":
    main()
