"""The served step on one GPU: full-size FLUX.1-dev (random weights, saved and loaded like real
ones) through ``dit_transformer`` in the real tritonserver, client -> server -> client, next to
the same step run in process by the same service code, in one invocation.

    benchmarks/pack_for_gpu.sh   # here: the server tree and wheels for a host without network
    python benchmarks/served_step.py --out served.json   # there
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import tritonclient.http as httpclient

from benchmarks.gpu_bench import build_model, step_for
from client.transport import make_transport
from client.wire import infer_step
from flux_triton import model_store
from flux_triton.server import TritonServer, set_parameter
from flux_triton.service import DitService, ServeSettings
from flux_triton.speedups import Speedups

REPOSITORY = model_store.REPO_ROOT / "model_repository"
MODEL = "flux-dev-random"


def host_times(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def measure_in_process(settings: ServeSettings, root: Path, wire: dict, args, results: dict) -> torch.Tensor:
    """The same service code as the server's, in this process; returns the first noise_pred."""
    started = time.perf_counter()
    service = DitService(settings, root, torch.device("cuda"))
    prepared = service.prepare(wire)
    first = service.execute([prepared])[0].cpu()
    results["in_process_ready_s"] = time.perf_counter() - started

    def step():
        service.execute([prepared])[0].float().sum().item()  # waits for the GPU, as a response would

    results["in_process"] = summary(host_times(step, args.warmup, args.iters))
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x1024-b1")
    parser.add_argument("--attention-backend", default="_native_cudnn")
    parser.add_argument("--compile", default="regional")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--transports", default="http,shm", help="client transports to measure (client/transport.py)")
    parser.add_argument("--out", type=Path, default=Path("served.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="served-"))
    results: dict = {"gpu": torch.cuda.get_device_name(), "shape": args.shape, "served": {}}

    started = time.perf_counter()
    model = build_model()
    model.save_pretrained(work / "models" / MODEL / "transformer")  # a diffusers pipeline layout
    del model
    torch.cuda.empty_cache()
    results["save_s"] = time.perf_counter() - started

    speedups = Speedups(attention_backend=args.attention_backend, compile=args.compile)
    wire = {name: tensor.contiguous() for name, tensor in step_for(args.shape).wire().items()}
    first = measure_in_process(ServeSettings(model_dir=MODEL, speedups=speedups), work / "models", wire, args, results)
    torch.cuda.empty_cache()  # the server process loads its own copy next

    repository = work / "model_repository"
    shutil.copytree(REPOSITORY / "dit_transformer", repository / "dit_transformer")
    config = repository / "dit_transformer" / "config.pbtxt"
    set_parameter(config, "model_dir", MODEL)
    set_parameter(config, "attention_backend", args.attention_backend)
    set_parameter(config, "compile", args.compile)
    server = TritonServer(
        repository,
        env={model_store.MODEL_ROOT_ENV: str(work / "models")},
        log_path=work / "tritonserver.log",
        cache=work / "triton",
        args=["--exit-timeout-secs=5", "--backend-config=python,shm-default-byte-size=67108864"],
    )
    started = time.perf_counter()
    with server:
        results["server_ready_s"] = time.perf_counter() - started
        with httpclient.InferenceServerClient(server.url, network_timeout=600) as client:
            served = infer_step(client, "dit_transformer", wire)
            results["served_vs_in_process_max_abs"] = (served.float() - first.float()).abs().max().item()
            for transport in args.transports.split(","):
                results["served"][transport] = measure_served(make_transport(transport, client), wire, args)
    results["request_mib"] = sum(t.numel() * t.element_size() for t in wire.values()) / 2**20
    base = results["in_process"]["median_ms"]
    print(json.dumps(results, indent=2))
    print(
        f"\n{results['gpu']} {args.shape}: in process {base:.1f} ms; server ready in {results['server_ready_s']:.0f} s"
    )
    for transport, row in results["served"].items():
        row["overhead_ms"] = row["median_ms"] - base
        row["overhead_pct"] = 100 * row["overhead_ms"] / base
        overhead = f"{row['overhead_ms']:.1f} ms ({row['overhead_pct']:.1f}%)"
        print(f"  served over {transport:<4} {row['median_ms']:.1f} ms: overhead {overhead}")
    args.out.write_text(json.dumps(results, indent=2))


def measure_served(transport, wire: dict, args) -> dict:
    """A generation's steps: new latents and timestep every step, the same prompt embeddings."""
    steps = []
    for index in range(args.warmup + args.iters):
        step = dict(wire)
        step["hidden_states"] = torch.randn_like(wire["hidden_states"].float()).to(wire["hidden_states"].dtype)
        step["timestep"] = torch.full_like(wire["timestep"], 1000.0 - 30 * index)
        steps.append(step)
    calls = iter(steps)
    try:
        return summary(host_times(lambda: transport.infer("dit_transformer", next(calls)), args.warmup, args.iters))
    finally:
        transport.close()


if __name__ == "__main__":
    main()
