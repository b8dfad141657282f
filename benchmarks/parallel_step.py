"""Several GPUs of one host: the served step with context parallelism (one instance across N GPUs: latency) and
the throughput of one instance per GPU (data parallel). Full-size FLUX.1-dev with random bf16 weights (saved and
loaded like real ones), ``dit_transformer`` with cuDNN attention and regional compile, through the real tritonserver
over HTTP (each request carries the whole step), placed by ``python -m flux_triton place``.

Latency: for each config (``1``: one GPU; ``ulysses2``, ``ring2``: across GPUs 0-1; ``:fp8`` for FP8 linears,
``:graphs`` for CUDA graphs) and shape, the client's wall time per request (median of ``--iters`` after
``--warmup``), and the 1024² b1 output's rel. L2 against an fp32 forward of the same weights on one GPU. Throughput
(``--throughput``): ``--clients`` concurrent clients against one instance on GPU 0, then one instance on each of
GPUs 0 and 1, per shape. In process (``--in-process``): the same step run by ``DitService`` here, after the server
has stopped.

    python3 benchmarks/parallel_step.py --out parallel.json
    python3 benchmarks/parallel_step.py --configs 1:fp8,ulysses2:fp8 --throughput --out parallel-fp8.json
    python3 benchmarks/parallel_step.py --configs 1,ulysses2 --in-process --out parallel-split.json
    python3 benchmarks/parallel_step.py --configs 1:graphs,ulysses2:graphs,ulysses2:fp8:graphs --out graphs.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import tritonclient.http as httpclient

from flux_triton.client.wire import infer_step
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, set_parameter
from flux_triton.deploy.placement import place
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model import store
from flux_triton.model.parallel import ParallelSettings
from flux_triton.model.presets import RANDOM_MODEL, full_size_step, random_model_root
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import rel_l2

ACCURACY_SHAPE = "1024x1024-b1"


def parse_config(text: str) -> tuple[ParallelSettings | None, Speedups]:
    """``1``, ``ulysses2``, ``ring4``..., optionally ``:fp8`` (FP8 linears) and ``:graphs`` (CUDA graphs)."""
    name, *flags = text.split(":")
    parallel = None if name == "1" else ParallelSettings.named(name)
    speedups = Speedups("_native_cudnn", fp8="fp8" in flags, compile="regional", cuda_graphs="graphs" in flags)
    return parallel, speedups


def server_for(work: Path, models: Path, label: str, speedups: Speedups, parallel=None, gpus=(0,)) -> TritonServer:
    repository = work / f"repository-{label}"
    shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    config = repository / DIT_TRANSFORMER / "config.pbtxt"
    settings = {"model_dir": RANDOM_MODEL, "max_sessions": "0", **speedups.parameters()}
    for key, value in settings.items():
        set_parameter(config, key, value)
    place(config, gpus=() if parallel else gpus, parallel=parallel)
    return TritonServer(repository, env={MODEL_ROOT_ENV: str(models)}, log_path=work / f"{label}.log",
                        cache=work / "triton", args=["--exit-timeout-secs=5"])  # fmt: skip


def fp32_reference(models: Path, step) -> torch.Tensor:
    model = store.load_transformer(store.resolve_model_dir(RANDOM_MODEL, models), torch.float32, "cuda")
    tensors = {name: tensor.cuda() for name, tensor in step.tensors().items()}
    floats = ("hidden_states", "pooled_projections", "encoder_hidden_states")
    step32 = step.replace(**{**tensors, **{name: tensors[name].float() for name in floats}})
    with torch.inference_mode():
        noise = reference_call(model, step32).cpu()
    del model
    torch.cuda.empty_cache()
    return noise


def latency(url: str, shapes: list[str], warmup: int, iters: int, reference: torch.Tensor) -> dict:
    rows = {}
    with httpclient.InferenceServerClient(url, network_timeout=1800) as client:
        for shape in shapes:
            wire = full_size_step(shape, seed=1, device="cpu").wire()
            for _ in range(warmup):
                output = infer_step(client, DIT_TRANSFORMER, wire)
            times = []
            for _ in range(iters):
                started = time.perf_counter()
                output = infer_step(client, DIT_TRANSFORMER, wire)
                times.append(1e3 * (time.perf_counter() - started))
            rows[shape] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
            if shape == ACCURACY_SHAPE:
                rows[shape]["rel_l2_vs_fp32"] = rel_l2(output, reference)
            print(f"  {shape:<14} {rows[shape]['median_ms']:8.1f} ms (min {min(times):.1f}, max {max(times):.1f})",
                  flush=True)  # fmt: skip
    return rows


def in_process(models: Path, speedups: Speedups, parallel, shapes: list[str], warmup: int, iters: int) -> dict:
    """The same step run by the serving code in this process (``DitService``, its ranks included), CUDA-event
    timed: what the served time adds is the request's way through Triton."""
    from flux_triton.serving.service import DitService
    from flux_triton.serving.settings import TransformerSettings

    settings = TransformerSettings(model_dir=RANDOM_MODEL, speedups=speedups,
                                   parallel=parallel.kind if parallel else "none",
                                   parallel_degree=parallel.degree if parallel else 1)  # fmt: skip
    service = DitService(settings, models, torch.device("cuda", 0))
    rows = {}
    try:
        for shape in shapes:
            step = full_size_step(shape, seed=1)
            times = []
            for index in range(warmup + iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                service.execute([step])
                end.record()
                end.synchronize()
                if index >= warmup:
                    times.append(start.elapsed_time(end))
            rows[shape] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
            print(f"  in process {shape:<14} {rows[shape]['median_ms']:8.1f} ms", flush=True)
    finally:
        service.close()
        del service
        torch.cuda.empty_cache()
    return rows


def throughput(url: str, shape: str, clients: int, requests: int) -> dict:
    wire = full_size_step(shape, seed=2, device="cpu").wire()
    batch = wire["hidden_states"].shape[0]

    def client_loop(count: int) -> None:
        with httpclient.InferenceServerClient(url, network_timeout=1800) as client:
            for _ in range(count):
                infer_step(client, DIT_TRANSFORMER, wire)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        # warm-up until a round is no slower than the one before: every instance has compiled for the shape (the
        # batcher hands an idle instance its first request only when the others are busy)
        previous = float("inf")
        for _ in range(8):
            round_started = time.perf_counter()
            list(pool.map(client_loop, [2] * clients))
            elapsed = time.perf_counter() - round_started
            if elapsed > 0.8 * previous:
                break
            previous = elapsed
        started = time.perf_counter()
        list(pool.map(client_loop, [requests // clients] * clients))
        wall = time.perf_counter() - started
    return {"images_per_s": batch * (requests // clients) * clients / wall, "wall_s": wall, "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1,ulysses2,ring2")
    parser.add_argument("--shapes", default="1024x1024-b1,512x512-b1,512x512-b8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--throughput", action="store_true", help="also one instance per GPU vs one instance")
    parser.add_argument("--in-process", action="store_true", help="also each config's step in this process")
    parser.add_argument("--throughput-shapes", default="1024x1024-b1,512x512-b8")
    parser.add_argument("--throughput-fp8", action="store_true", help="throughput with FP8 linears (default bf16)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="per throughput measurement")
    parser.add_argument("--out", type=Path, default=Path("parallel.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="parallel-step-"))
    models, _ = random_model_root(work)
    reference = fp32_reference(models, full_size_step(ACCURACY_SHAPE, seed=1, device="cpu"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    results = {"gpus": gpus, "latency": {}, "throughput": {}}
    for text in filter(None, args.configs.split(",")):
        parallel, speedups = parse_config(text)
        print(f"{text}:", flush=True)
        started = time.perf_counter()
        try:
            with server_for(work, models, text.replace(":", "-"), speedups, parallel).start(timeout_s=1800) as server:
                ready_s = time.perf_counter() - started
                rows = latency(server.url, args.shapes.split(","), args.warmup, args.iters, reference)
        except Exception as exc:  # one config failing (say, an attention backend without ring support) is a row
            print(f"  failed: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
            results["latency"][text] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results["latency"][text] = {"ready_s": ready_s, "shapes": rows}
        if args.in_process:
            shapes = args.shapes.split(",")
            rows = in_process(models, speedups, parallel, shapes, args.warmup, args.iters)
            results["latency"][text]["in_process"] = rows
        args.out.write_text(json.dumps(results, indent=2))
    if args.throughput:
        speedups = Speedups("_native_cudnn", fp8=args.throughput_fp8, compile="regional")
        for label, gpu_list in (("1 instance", (0,)), (f"{len(gpus)} instances", tuple(range(len(gpus))))):
            with server_for(work, models, label.replace(" ", "-"), speedups, gpus=gpu_list).start(
                timeout_s=1800
            ) as server:
                for shape in args.throughput_shapes.split(","):
                    row = throughput(server.url, shape, args.clients, args.requests)
                    results["throughput"].setdefault(label, {})[shape] = row
                    print(f"{label:<12} {shape:<14} {row['images_per_s']:6.2f} img/s", flush=True)
            args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{', '.join(gpus)}; served over HTTP, client wall time per request, median (min-max)")
    shapes = args.shapes.split(",")
    print(f"{'config':<14}" + "".join(f"{shape:>22}" for shape in shapes) + f"{'rel L2 vs fp32':>16}")
    for text, entry in results["latency"].items():
        if "error" in entry:
            print(f"{text:<14}{entry['error'][:100]}")
            continue
        cells = "".join(
            f"{r['median_ms']:>8.1f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})".rjust(22)
            for r in (entry["shapes"][s] for s in shapes)
        )
        l2 = entry["shapes"].get(ACCURACY_SHAPE, {}).get("rel_l2_vs_fp32")
        print(f"{text:<14}{cells}{'' if l2 is None else f'{l2:16.2e}'}")
    for label, rows in results["throughput"].items():
        print(f"{label:<14}" + "".join(f"{shape} {row['images_per_s']:.2f} img/s  " for shape, row in rows.items()))


if __name__ == "__main__":
    main()
