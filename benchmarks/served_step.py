"""The served step on one GPU (or across GPUs with ``--parallel``): full-size FLUX.1-dev (random weights, saved
and loaded like real ones) through the real tritonserver, client -> server -> client, against the same step run in
process by the same serving code. The model served is ``dit_transformer``, or with ``--engine``
the ``flux_dit`` ensemble (``dit_preprocess`` -> ``dit_engine``) on a prebuilt engine of
``make engine`` for the random model (``flux-dev-random``, saved here first if the model root lacks it).

Served and in-process steps alternate, so clock drift affects both alike; the server's own
per-model times (Triton's statistics extension) show where the difference goes.

    python benchmarks/served_step.py --out served.json
    python benchmarks/served_step.py --engine engines/flux-dev-random-bf16.aoti.json --out served-aoti.json
    python benchmarks/served_step.py --parallel ulysses2 --cuda-graphs --out served-ulysses2.json   # 2 GPUs
    python benchmarks/served_step.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --cuda-graphs \
        --out served-fp8.json                                     # the fastest FP8 path of gpu_bench.py, served
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

from flux_triton.client.generations import Generations
from flux_triton.client.transport import make_transport
from flux_triton.client.wire import infer_step
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, set_parameter
from flux_triton.deploy.placement import place
from flux_triton.deploy.repository import write_repository
from flux_triton.deploy.server import TritonServer
from flux_triton.engines.kinds import load_engine
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model import store
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, calibrate, save_scales
from flux_triton.model.parallel import ParallelSettings
from flux_triton.model.presets import RANDOM_MODEL, build_random, full_size_step, random_model_root
from flux_triton.model.speedups import Speedups
from flux_triton.serving.merging import run_engine_batched
from flux_triton.serving.preprocess import preprocess
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings

PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def timed_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def speedups_of(args) -> Speedups:
    return Speedups(args.attention_backend, fp8=args.fp8, fp8_scales=args.fp8_scales,
                    fp8_fast_accum=args.fp8_fast_accum, compile=args.compile, cuda_graphs=args.cuda_graphs)  # fmt: skip


def ensure_scales(models: Path, name: str) -> float | None:
    """Static FP8 activation scales ``name`` beside the random model, calibrated here (``Calibration``'s
    defaults, as ``python -m flux_triton calibrate``) unless there; the seconds that took, ``None`` when there."""
    path = store.inside(store.resolve_model_dir(RANDOM_MODEL, models), name)
    if path.is_file():
        return None
    started = time.perf_counter()
    model, calibration = build_random(), Calibration()  # the saved model's weights: the same seed
    save_scales(path, calibrate(model, calibration), model.config, calibration)
    del model
    torch.cuda.empty_cache()
    return time.perf_counter() - started


def dit_transformer_step(args, models: Path, wire: dict):
    parallel = ParallelSettings.named(args.parallel)
    settings = TransformerSettings(model_dir=RANDOM_MODEL, speedups=speedups_of(args), parallel=parallel.kind,
                                   parallel_degree=parallel.degree)  # fmt: skip
    service = DitService(settings, models, torch.device("cuda"))
    prepared = service.prepare(wire)
    return lambda: service.execute([prepared])[0]


def engine_step(args, sidecar_path: Path, models: Path, wire: dict):
    """``dit_preprocess`` then ``dit_engine``, as the ensemble runs them."""
    sidecar, engine = load_engine(sidecar_path, torch.device("cuda"), models, cuda_graphs=args.cuda_graphs)
    signature, limits = sidecar.dit_signature, sidecar.limits
    return lambda: run_engine_batched(engine, [preprocess(wire, signature, limits)])[0]


def write_served_repository(args, repository: Path) -> str:
    """The model repository the server gets; returns the model name clients call."""
    if args.engine:
        write_repository(args.engine.resolve(), repository)
        set_parameter(repository / ENGINE / "config.pbtxt", "cuda_graphs", str(args.cuda_graphs).lower())
        return ENSEMBLE
    shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    set_parameter(config, "model_dir", RANDOM_MODEL)
    for name, value in speedups_of(args).parameters().items():
        set_parameter(config, name, value)
    parallel = ParallelSettings.named(args.parallel)
    if parallel.enabled:
        place(config, parallel=parallel)
    return DIT_TRANSFORMER


def generation_steps(wire: dict, count: int) -> list[dict]:
    """A generation's requests: new latents and timestep every step, the same prompt embeddings."""
    steps = []
    for index in range(count):
        step = dict(wire)
        step["hidden_states"] = torch.randn_like(wire["hidden_states"].float()).to(wire["hidden_states"].dtype)
        step["timestep"] = torch.full_like(wire["timestep"], 1000.0 - (30 * index) % 1000)  # any number of steps
        steps.append(step)
    return steps


def measure_served(client, transport_name: str, model_name: str, wire: dict, local_step, args, sessions=False) -> dict:
    """Served and in-process steps alternately; with the server's per-model times over the timed requests.
    ``sessions``: the steps are one generation session, the prompt sent with its first step only."""
    calls = iter(generation_steps(wire, args.warmup + args.iters))
    transport = make_transport(transport_name, client)
    generations, sent_bytes = Generations(), []

    def served():
        tensors, sequence = next(calls), None
        if sessions:
            tensors, sequence, _ = generations.step("cond", tensors)
        sent_bytes.append(sum(tensor.nbytes for tensor in tensors.values()))
        transport.infer(model_name, tensors, "", "cond", sequence)

    def local():
        local_step().float().sum().item()  # waits for the GPU, as a response would

    try:
        for _ in range(args.warmup):
            served(), local()
        before = client.get_inference_statistics()
        times = [(timed_ms(served), timed_ms(local)) for _ in range(args.iters)]
        row = {"served": summary([s for s, _ in times]), "in_process": summary([i for _, i in times])}
        row["server_ms_per_request"] = server_phases(before, client.get_inference_statistics())
    finally:
        transport.close()
    row["bytes_per_step"] = statistics.median(sent_bytes)
    row["overhead_ms"] = row["served"]["median_ms"] - row["in_process"]["median_ms"]
    row["overhead_pct"] = 100 * row["overhead_ms"] / row["in_process"]["median_ms"]
    return row


def server_phases(before: dict, after: dict) -> dict:
    """``{model: {phase: ms per request}}`` between two statistics snapshots; ``success`` is the
    server's whole time for a request, the other phases its parts."""
    earlier = {(m["name"], m["version"]): m["inference_stats"] for m in before["model_stats"]}
    phases = {}
    for model in after["model_stats"]:
        stats, old = model["inference_stats"], earlier.get((model["name"], model["version"]))
        count = stats["success"]["count"] - (old["success"]["count"] if old else 0)
        if count:
            phases[model["name"]] = {
                phase: (stats[phase]["ns"] - (old[phase]["ns"] if old else 0)) / count / 1e6 for phase in PHASES
            }
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x1024-b1")
    parser.add_argument("--attention-backend", default="_native_cudnn")
    parser.add_argument("--compile", default="regional")
    parser.add_argument("--fp8", action="store_true", help="FP8 block linears")
    parser.add_argument("--fp8-scales", default="", help=f"static activation scales ({SCALES_FILE}; calibrated "
                        "here if the model lacks them); default: per-token")  # fmt: skip
    parser.add_argument("--fp8-fast-accum", action="store_true", help="FP8 GEMMs with fast accumulation")
    parser.add_argument("--cuda-graphs", action="store_true", help="one CUDA graph per step shape")
    parser.add_argument("--parallel", default="none", help="dit_transformer across GPUs: ulysses2, ring2, ...")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--engine", type=Path, default=None, help="serve flux_dit on this engine sidecar")
    parser.add_argument("--transports", default="http,shm", help="client transports to measure (client/transport.py)")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE", help="for the server")
    parser.add_argument("--no-sessions", dest="sessions", action="store_false", help="skip the session runs")
    parser.add_argument("--out", type=Path, default=Path("served.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="served-"))
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "shape": args.shape,
        "served": {},
        "server_env": args.server_env,
    }

    models, save_s = random_model_root(work)
    if save_s is not None:
        results["save_s"] = save_s
    if args.fp8_scales:
        results["calibration_s"] = ensure_scales(models, args.fp8_scales)

    wire = full_size_step(args.shape).wire()
    started = time.perf_counter()
    local_step = (
        engine_step(args, args.engine, models, wire) if args.engine else dit_transformer_step(args, models, wire)
    )
    first = local_step().cpu()
    results["in_process_ready_s"] = time.perf_counter() - started

    repository = work / "model_repository"
    model_name = results["model"] = write_served_repository(args, repository)
    server = TritonServer(
        repository,
        env={MODEL_ROOT_ENV: str(models), **dict(item.split("=", 1) for item in args.server_env)},
        log_path=work / "tritonserver.log",
        cache=work / "triton",
        args=["--exit-timeout-secs=5", "--backend-config=python,shm-default-byte-size=67108864"],
    )
    started = time.perf_counter()
    with server:
        results["server_ready_s"] = time.perf_counter() - started
        with httpclient.InferenceServerClient(server.url, network_timeout=600) as client:
            started = time.perf_counter()
            served = infer_step(client, model_name, wire)
            results["first_request_s"] = time.perf_counter() - started
            results["served_vs_in_process_max_abs"] = (served.float() - first.float()).abs().max().item()
            for transport in args.transports.split(","):
                results["served"][transport] = measure_served(client, transport, model_name, wire, local_step, args)
                if model_name == DIT_TRANSFORMER and args.sessions:
                    row = measure_served(client, transport, model_name, wire, local_step, args, sessions=True)
                    results["served"][f"{transport}+sessions"] = row
    results["request_mib"] = sum(t.numel() * t.element_size() for t in wire.values()) / 2**20
    args.out.write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_summary(results: dict) -> None:
    ready, first = results["server_ready_s"], results["first_request_s"]
    print(
        f"\n{results['gpu']} {results['shape']} {results['model']}: ready in {ready:.0f} s, first request {first:.1f} s"
    )
    for transport, row in results["served"].items():
        served, local = row["served"]["median_ms"], row["in_process"]["median_ms"]
        overhead = f"{row['overhead_ms']:.1f} ms ({row['overhead_pct']:.1f}%)"
        sent = f"{row['bytes_per_step'] / 1e6:.2f} MB/step"
        print(f"  {transport:<13} {sent} served {served:.1f} ms, in process {local:.1f} ms: overhead {overhead}")
        for model, phases in row["server_ms_per_request"].items():
            print(f"    {model:<16} " + "  ".join(f"{phase} {ms:.2f}" for phase, ms in phases.items()))


if __name__ == "__main__":
    main()
