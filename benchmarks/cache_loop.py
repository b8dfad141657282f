"""The served image: whole 28-step generations of full-size FLUX.1-dev (random bf16 weights, saved and loaded like
real ones; 1024x1024, 512 text tokens), driven by ``FluxPipeline(output_type="latent")`` through
``RemoteFluxTransformer`` against a real tritonserver, per step cache (diffusers' hooks, per generation session) and
with and without CUDA graphs, and on one GPU or across several (``--parallel``: one step's sequence over the GPUs).
One server per graphs and parallel setting, holding one ``dit_transformer`` per cache (cuDNN attention, regional
compile, optionally FP8 with static scales and fast accumulation), each warm before READY; across GPUs, each model's
ranks hold a whole copy of the weights on every GPU, so narrow ``--caches`` to what the GPUs' memory holds.
Baselines in the same run: diffusers' eager pipeline in process (``--eager``) and the same speed-ups in process
(``--in-process``).

Per config: wall time per image (median, min, max of the timed generations), the first generation after READY,
the steps that ran a full forward (served step latency above half the median uncached step), the final latents'
rel. L2 against the uncached served run, the server's time per request by model and phase (Triton's statistics; the
generations' END requests included), each served step's time in the client outside the served call (the pipeline's
loop and the stand-in's conversions; median in the table), and whether the graphed run equals the ungraphed one
bitwise. With
``--restart`` the last server is started once more over the same compile cache (``compile_cache_dir``, a folder the
first start filled): its READY time and first generation beside the cold start's.

    python3 benchmarks/cache_loop.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --graphs off,on \
        --transport shm --eager --in-process --out served-image.json
    python3 benchmarks/cache_loop.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum --graphs on \
        --caches none,mag,mag-tuned --parallel none,ulysses2,ulysses4 --out served-image-parallel.json  # 4 GPUs
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import tritonclient.http as httpclient
from served_step import server_phases
from workload import prepare

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, copy_model, set_parameter
from flux_triton.deploy.placement import hold_prompts, place
from flux_triton.deploy.repository import write_repository as write_engine_repository
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model import store
from flux_triton.model.graphs import GraphedTransformer
from flux_triton.model.parallel import NO_PARALLEL, ParallelSettings
from flux_triton.model.presets import FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL, build_random
from flux_triton.model.speedups import Speedups, load_with_speedups
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import NO_CACHE, build_cache

# the caches measured, by label: a kind's defaults, or a tuned MagCache (fewer full forwards, larger error)
CACHES = {
    NO_CACHE: {"kind": NO_CACHE},
    "mag": {"kind": "mag"},
    "mag-tuned": {"kind": "mag", "threshold": 0.24, "max_skip_steps": 5, "retention_ratio": 0.1},
    "taylorseer": {"kind": "taylorseer"},
    "first_block": {"kind": "first_block"},
}


def speedups_of(args, graphs: bool) -> Speedups:
    return Speedups(args.attention, fp8=args.fp8, fp8_scales=args.fp8_scales, fp8_fast_accum=args.fp8_fast_accum,
                    compile=args.compile, cuda_graphs=graphs)  # fmt: skip


def write_repository(repository: Path, args, speedups: Speedups, parallel: ParallelSettings, with_engine: bool,
                     compile_cache: Path) -> None:  # fmt: skip
    """One dit_transformer per cache label, named ``dit_<label>``, its compile caches in ``compile_cache``, across
    GPUs as ``parallel`` says; ``with_engine``, flux_dit over ``args.engine`` (CUDA graphs as ``speedups``), serving
    MagCache's defaults where the caches measured include ``mag`` (its uncached steps then replay the hooked blocks'
    graphs, not whole-step ones, as a cached dit_transformer's do)."""
    for label in args.caches:
        name = f"dit_{label.replace('-', '_')}"
        config = copy_model(Locations.here().repository / DIT_TRANSFORMER, repository, name)
        parameters = {"model_dir": args.model, "cache": json.dumps(CACHES[label]), "compile_cache_dir": compile_cache}
        for key, value in {**parameters, **speedups.parameters()}.items():
            set_parameter(config, key, str(value))
        if parallel.enabled:
            place(config, parallel=parallel)  # one instance driving its ranks (KIND_MODEL)
    if args.engine and with_engine:
        write_engine_repository(args.engine.resolve(), repository, cache="mag" if "mag" in args.caches else NO_CACHE)
        set_parameter(repository / ENGINE / "config.pbtxt", "cuda_graphs", str(speedups.cuda_graphs).lower())
        hold_prompts(repository / ENGINE / "config.pbtxt", args.engine_holding == "on")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generation(
    transformer, prompt: dict, args, seed: int = 0, device: torch.device | None = None
) -> tuple[float, torch.Tensor, list[float]]:
    """One generation: its wall time, its latents and each step's wall time (ms, from the pipeline's step-end
    callback; the first step's includes the pipeline's preparations). ``device``: where the pipeline runs, as its
    text encoders' device would set it (default: the transformer's; a served model's stand-in: the host)."""
    from diffusers import FluxPipeline

    class Pipeline(FluxPipeline):  # diffusers takes a pipeline's device from its modules; here there may be none
        @property
        def _execution_device(self) -> torch.device:
            return device

    weight = next(transformer.parameters(), None) if hasattr(transformer, "parameters") else None
    device = device or (weight.device if weight is not None else torch.device("cpu"))
    pipe = Pipeline(loop.make_scheduler("dev"), None, None, None, None, None, transformer)
    # FluxPipeline's latents take the prompt's dtype: the model's (bfloat16 on a GPU), as its text encoders give it
    dtype = store.default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    prompt = {name: tensor.to(device, dtype) for name, tensor in prompt.items()}
    ends = []

    def step_ended(pipe, index, timestep, tensors):
        ends.append(time.perf_counter())
        return tensors

    synchronize()
    started = time.perf_counter()
    latents = pipe(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
                   output_type="latent", generator=torch.Generator().manual_seed(seed),
                   callback_on_step_end=step_ended, **prompt).images  # fmt: skip
    synchronize()
    steps_ms = [1e3 * (end - begin) for begin, end in zip([started, *ends], ends, strict=False)]
    return time.perf_counter() - started, latents.float().cpu(), steps_ms


def timed(transformer, prompt: dict, args, calls=None, device: torch.device | None = None) -> dict:
    """One generation (the first: after READY, or after building), then ``args.runs`` timed ones."""
    first_s, _, _ = generation(transformer, prompt, args, device=device)
    start = len(calls) if calls is not None else 0
    runs = [generation(transformer, prompt, args, device=device) for _ in range(args.runs)]
    times = [wall for wall, _, _ in runs]
    row = {"first_s": first_s, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
           "latents": runs[-1][1], "step_wall_ms": runs[-1][2]}  # fmt: skip
    if calls is not None:
        row["step_latencies_ms"] = [1e3 * t for t in calls[start:][-args.steps :]]
        # each step's time in the client outside the served call: the pipeline's loop and the stand-in's conversions
        row["client_ms_per_step"] = [wall - sent for wall, sent in zip(row["step_wall_ms"], row["step_latencies_ms"],
                                                                         strict=True)]  # fmt: skip
    return row


def in_process(models: Path, prompt: dict, args, speedups: Speedups | None, label: str) -> dict:
    """The pipeline with the model in this process: diffusers eager (``speedups`` None) or the served speed-ups."""
    started = time.perf_counter()
    if speedups is None:
        transformer = build_random()
    else:
        model_dir = store.resolve_model_dir(args.model, models)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke run
        transformer = load_with_speedups(model_dir, store.default_dtype(device), device, speedups,
                                          build_cache(CACHES[label]))  # fmt: skip
        if isinstance(transformer, GraphedTransformer):  # the pipeline needs the module (its device, hooks)
            module = transformer.transformer
            transformer.transformer, module.forward = module.forward, transformer
            transformer = module
    ready_s = time.perf_counter() - started
    row = {"config": f"in process {'eager' if speedups is None else 'same speed-ups'} {label}", "ready_s": ready_s,
           **timed(transformer, prompt, args)}  # fmt: skip
    del transformer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def load_threads() -> int:
    """Models loaded at once: each holds its bf16 weights (22 GiB) while it quantizes them."""
    if not torch.cuda.is_available():
        return 2
    return 2 if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30 else 1


def served(work: Path, models: Path, prompt: dict, args, graphs: bool, parallel: str, with_engine: bool,
           restart=False) -> list[dict]:  # fmt: skip
    """Each model's rows of one server's run (``restart``: its second start, over the compile caches of its first)."""
    setting = f"graphs-{graphs}-{parallel}"
    repository = work / f"repository-{setting}"
    if not restart:
        write_repository(repository, args, speedups_of(args, graphs), ParallelSettings.named(parallel), with_engine,
                         work / f"compile-cache-{setting}")  # fmt: skip
    server_args = ["--exit-timeout-secs=5", f"--model-load-thread-count={load_threads()}",
                   "--backend-config=python,shm-default-byte-size=67108864"]  # fmt: skip
    log = work / f"{setting}{'-restart' if restart else ''}.log"
    server = TritonServer(repository, env={MODEL_ROOT_ENV: str(models)}, log_path=log, cache=work / "triton",
                          args=server_args)  # fmt: skip
    started = time.perf_counter()
    rows = []
    with server.start(timeout_s=900):
        ready_s = time.perf_counter() - started
        models_served = [(f"dit_{label.replace('-', '_')}", label) for label in args.caches]
        if args.engine and with_engine:
            models_served += [(ENSEMBLE, label) for label in (NO_CACHE, "mag") if label in args.caches]
        for name, label in models_served:
            with (
                RemoteFluxTransformer(url=server.url, model_name=name, transport=args.transport,
                                      network_timeout_s=900) as remote,
                httpclient.InferenceServerClient(server.url) as statistics_client,
            ):  # fmt: skip
                if build_cache(CACHES[label]) is not None:
                    remote.enable_cache(build_cache(CACHES[label]))
                before = statistics_client.get_inference_statistics()
                row = timed(remote, prompt, args, remote.latencies_s)
                # where a served step's time goes in the server, per model (flux_dit: each composing model)
                row["server_ms_per_request"] = server_phases(before, statistics_client.get_inference_statistics())
            print(f"{name} {label}: server ms per request " + "; ".join(
                f"{model} " + ", ".join(f"{phase} {ms:.2f}" for phase, ms in phases.items())
                for model, phases in row["server_ms_per_request"].items()), flush=True)  # fmt: skip
            model = "" if name.startswith("dit_") else f"{name} "
            across = f" {parallel}" if parallel != NO_PARALLEL else ""
            config = f"served {model}{label}{across}{' graphs' if graphs else ''}{' restart' if restart else ''}"
            rows.append({"config": config, "cache": label, "model": name, "graphs": graphs, "parallel": parallel,
                         "restart": restart, "server_ready_s": ready_s, **row})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", default="none,mag,mag-tuned,taylorseer", help=f"labels among {', '.join(CACHES)}")
    parser.add_argument("--graphs", default="off,on", help="off, on, or both")
    parser.add_argument("--parallel", default=NO_PARALLEL, help="none and/or dit_transformer across GPUs: ulysses2,...")
    parser.add_argument("--attention", default="_native_cudnn", help="attention backend")
    parser.add_argument("--compile", default="regional", choices=["none", "regional"])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--fp8-scales", default="", help="static activation scales beside the model (calibrated here)")
    parser.add_argument("--fp8-fast-accum", action="store_true")
    parser.add_argument("--transport", default="shm", choices=["http", "shm"])
    parser.add_argument("--eager", action="store_true", help="diffusers' eager pipeline in process, uncached")
    parser.add_argument("--in-process", action="store_true", help="the same speed-ups in process: none and mag")
    parser.add_argument("--restart", action="store_true", help="the last server started again, its compile cache kept")
    parser.add_argument("--engine", type=Path, help="an AOTI engine's sidecar: flux_dit over it, in the last server")
    parser.add_argument(
        "--engine-holding",
        default="on",
        choices=["on", "off"],
        help="dit_engine holding each generation's prompt (off: dit_preprocess sends it every step)",
    )
    parser.add_argument("--model", default=RANDOM_MODEL, help="a model folder name (the random full-size model)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=FULL_SIZE_TEXT_TOKENS)
    parser.add_argument("--runs", type=int, default=2, help="timed generations per config, after the first")
    parser.add_argument("--out", type=Path, default=Path("served-image.json"))
    args = parser.parse_args()
    args.caches = args.caches.split(",")
    work, models, prompt = prepare(args, "served-image-", seed=1)
    rows = []
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"gpu": gpu, "torch": torch.__version__, "size": args.size,
               "steps": args.steps, "fp8": args.fp8, "fp8_scales": args.fp8_scales,
               "fp8_fast_accum": args.fp8_fast_accum, "transport": args.transport,
               "engine_holding": args.engine_holding, "rows": rows}  # fmt: skip

    def save():
        compare(rows)
        plain = [{k: v for k, v in row.items() if k != "latents"} for row in rows]
        args.out.write_text(json.dumps({**results, "rows": plain}, indent=2))
        print_row(rows[-1])

    print(f"{gpu}, {args.size}² b1, {args.steps} steps, fp8={args.fp8} scales={args.fp8_scales or '-'} "
          f"fast={args.fp8_fast_accum}, served over {args.transport}")  # fmt: skip
    if args.eager:
        rows.append(in_process(models, prompt, args, None, NO_CACHE))
        save()
    # flux_dit (--engine) beside the last one-GPU server; --restart starts the last server again
    servers = [(graphs == "on", parallel) for parallel in args.parallel.split(",") for graphs in args.graphs.split(",")]
    last_one_gpu = max((i for i, (_, parallel) in enumerate(servers) if parallel == NO_PARALLEL), default=None)
    for position, (graphs, parallel) in enumerate(servers):
        for row in served(work, models, prompt, args, graphs, parallel, with_engine=position == last_one_gpu):
            rows.append(row)
            save()
    if args.restart:
        graphs, parallel = servers[-1]
        restarted = served(work, models, prompt, args, graphs, parallel, len(servers) - 1 == last_one_gpu, restart=True)
        for row in restarted:
            rows.append(row)
            save()
    if args.in_process:
        for label in (NO_CACHE, "mag"):
            rows.append(in_process(models, prompt, args, speedups_of(args, True), label))
            save()
    print(HEADER)
    for row in rows:
        print_row(row)


HEADER = (f"{'config':<40} {'ready':>6} {'s/image':>7} {'min':>6} {'max':>6} {'first':>6} {'fulls':>5} "
          f"{'full ms':>7} {'rel L2':>8} {'=nograph':>8} {'client ms':>9}")  # fmt: skip


def compare(rows: list[dict]) -> None:
    """Against the first served uncached run (one GPU's, where there is one): each row's rel. L2 and, served, its full
    forwards (steps slower than half the uncached step of its own parallel setting) and their median; a row with
    graphs, whether it equals its twin without bitwise."""
    uncached = [row for row in rows if row.get("model") == "dit_none"]
    if not uncached:
        return
    reference = next((row for row in uncached if row["parallel"] == NO_PARALLEL), uncached[0])
    for row in rows:
        row["rel_l2_vs_none"] = float((row["latents"] - reference["latents"]).norm() / reference["latents"].norm())
        if "step_latencies_ms" in row:
            alike = next((r for r in uncached if r["parallel"] == row["parallel"]), reference)
            full = [t for t in row["step_latencies_ms"] if t > 0.5 * statistics.median(alike["step_latencies_ms"])]
            row["full_forwards"], row["full_step_ms"] = len(full), statistics.median(full) if full else None
        twin = next((r for r in rows if r.get("model") == row.get("model") and r.get("cache") == row.get("cache")
                     and r.get("parallel") == row.get("parallel") and r.get("graphs") is False
                     and not r.get("restart")), None)  # fmt: skip
        if row.get("graphs") and twin is not None:
            row["bitwise_vs_no_graphs"] = bool(torch.equal(row["latents"], twin["latents"]))


def print_row(row: dict) -> None:
    full_ms = f"{row['full_step_ms']:.1f}" if row.get("full_step_ms") else ""
    client = f"{statistics.median(row['client_ms_per_step']):.1f}" if row.get("client_ms_per_step") else ""
    l2 = f"{row['rel_l2_vs_none']:8.2e}" if "rel_l2_vs_none" in row else ""
    ready = f"{row['server_ready_s']:6.1f}" if "server_ready_s" in row else f"{'':6}"
    print(f"{row['config']:<40.40} {ready} {row['median_s']:7.2f} {row['min_s']:6.2f} {row['max_s']:6.2f} "
          f"{row['first_s']:6.2f} {row.get('full_forwards', ''):>5} {full_ms:>7} {l2:>8} "
          f"{row.get('bitwise_vs_no_graphs', '')!s:>8} {client:>9}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
