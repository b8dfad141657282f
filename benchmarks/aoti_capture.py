"""Whether one CUDA graph per shape can be captured over the AOTI engine's blocks, and replayed bitwise.

The full-size FLUX.1-dev transformer (random bf16 weights, built on the GPU) with the ``aoti`` engine attached
(compiled here, or ``--engines DIR`` of ``make engine``), called through ``model.graphs.GraphedTransformer``:
per run (a capture mode and shapes in order) one child process, since a failed capture leaves the CUDA
generator in capture state. Per shape: whether the capture succeeded, whether the replays equal the ordinary
call bitwise, the error, and CUDA's own error log (``CUDA_LOG_FILE``: the driver call the capture refused).

    python3 benchmarks/aoti_capture.py --out aoti-capture.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from flux_triton.engines import aoti
from flux_triton.engines.aoti_engine import prebuilt_or_build, speedups_for
from flux_triton.model.graphs import WARMUP_CALLS, GraphedTransformer
from flux_triton.model.presets import RANDOM_MODEL, build_random
from flux_triton.model.presets import full_size_step as step_for
from flux_triton.model.speedups import apply_speedups
from flux_triton.pipeline.call import reference_call

RUNS = "thread_local:1024x1024-b1+512x512-b1,thread_local:512x512-b1+1024x1024-b1,relaxed:1024x1024-b1+512x512-b1"
REPLAYS = 3


def aoti_ready_model():
    """The random model with the speed-ups the ``aoti`` engine is compiled with and runs with."""
    model = build_random()
    apply_speedups(model, speedups_for("aoti", model.device))
    return model


def child(run: str, engine_dir: Path, packages: dict[str, str]) -> None:
    """One run: its rows as JSON lines on stdout; stops at the first failure (the process is unusable after)."""
    mode, shapes = run.split(":")
    model = aoti_ready_model()
    aoti.attach(model, engine_dir, packages)
    graphed = GraphedTransformer(model, capture_mode=mode)
    for shape in shapes.split("+"):
        row = {"run": run, "mode": mode, "shape": shape}
        step = step_for(shape, seed=1)
        try:
            expected = reference_call(model, step)
            outputs = [reference_call(graphed, step) for _ in range(WARMUP_CALLS + 1 + REPLAYS)]
            row.update(graphs=len(graphed.graphs), bitwise=all(torch.equal(out, expected) for out in outputs))
        except Exception as error:  # the error is the result
            row.update(graphs=len(graphed.graphs), error=f"{type(error).__name__}: {error}"[-1500:])
        print(json.dumps(row), flush=True)
        if "error" in row:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=RUNS, help="MODE:SHAPE+SHAPE,...; capture modes of torch.cuda.graph")
    parser.add_argument("--engines", type=Path, default=None, help=f"prebuilt engines of make engine ({RANDOM_MODEL})")
    parser.add_argument("--out", type=Path, default=Path("aoti-capture.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--packages", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.engine_dir, json.loads(args.packages))

    engine_dir, packages = prebuilt_or_build("aoti", aoti_ready_model(), args.engines, RANDOM_MODEL)
    torch.cuda.empty_cache()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    env = {**os.environ, "CUDA_LOG_FILE": "stderr", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    for run in args.runs.split(","):
        command = [sys.executable, __file__, "--child", run, "--engine-dir", str(engine_dir)]
        done = subprocess.run([*command, "--packages", json.dumps(packages)], env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        cuda_log = [line for line in done.stderr.splitlines() if "[CUDA]" in line]
        results["rows"] += [{**row, "cuda_log": cuda_log} for row in rows]
        if not rows:
            results["rows"].append({"run": run, "error": done.stderr[-3000:]})
        args.out.write_text(json.dumps(results, indent=2))
        print(f"== {run}: exit {done.returncode}\n" + "\n".join(cuda_log[-20:]), flush=True)
    print(f"\n{results['gpu']}, torch {results['torch']}")
    for row in results["rows"]:
        outcome = f"bitwise={row['bitwise']}" if "bitwise" in row else row["error"][-300:]
        print(f"{row['run']:<48} {row.get('shape', ''):<14} graphs={row.get('graphs', '-')} {outcome}")


if __name__ == "__main__":
    main()
