"""One whole generation at a time, five ways with the same speed-ups, in one run: ``FluxPipeline`` with the
transformer in this process (the baseline), ``FluxPipeline`` here with ``RemoteFluxTransformer`` over shared memory
(the client-driven loop), ``flux_generate`` sending each step to ``dit_transformer`` (BLS), ``flux_generate``
placed ``--in-process`` (each instance runs the transformer itself), and the ``loop`` way: that model's own code
(``serving.generate`` over a ``DitService``) called in this process, without Triton, which tells Triton's share of
the in-process way from the serving code's. Prompt embeddings in, latents out, one server with both generation
models. Full-size FLUX.1-dev with random bf16 weights (cuDNN attention, regional compile, CUDA graphs, optionally FP8
with static scales and fast accumulation). Each way: s/image, the first after READY, its final latents against the
first way's; the client loop's median served call and the median step in process beside it. ``--cache`` (a label of
``cache_loop.CACHES``) runs every way with that step cache. ``--trace`` has the server trace every request
(``triton_trace.py``) and reports where the served ways' requests spent their time. ``--queue-delays 100,0`` runs the
client loop once per dynamic-batcher delay (µs), each against its own copy of ``dit_transformer``.
``--client-variants`` runs the client loop once per variant of the client's host (``CLIENT_VARIANTS``).
``--steps-ahead 1,4,28`` runs the ``loop`` way once per bound on the host's lead over the GPU (``StepsAhead``).

    python3 benchmarks/whole_generation.py --fp8 --fp8-scales fp8_scales.safetensors --fp8-fast-accum \\
        --out whole-generation.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import re
import statistics
import time
from pathlib import Path

import host_idle
import torch
import triton_trace
from cache_loop import CACHES, in_process, load_threads, timed
from workload import prepare

from flux_triton.client import RemoteFluxTransformer, RemoteSettings, generate
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, GENERATE, copy_model, set_parameter
from flux_triton.deploy.placement import transformer_in_process
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.presets import FULL_SIZE_TEXT_TOKENS, RANDOM_MODEL
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline import loop
from flux_triton.pipeline.caching import NO_CACHE, build_cache, describe_cache
from flux_triton.serving import generate as served
from flux_triton.serving.generation_request import Generation, Parts
from flux_triton.serving.service import warm_service
from flux_triton.serving.settings import GenerateSettings, TransformerSettings

IN_PROCESS_MODEL = "flux_generate_in_process"  # flux_generate's copy placed --in-process


def speedups_of(args) -> Speedups:
    """The served speed-ups (on a GPU), the same in process; none on the CPU (a smoke run)."""
    if not torch.cuda.is_available():
        return Speedups()
    return Speedups(args.attention, fp8=args.fp8, fp8_scales=args.fp8_scales, fp8_fast_accum=args.fp8_fast_accum,
                    compile="regional", cuda_graphs=True)  # fmt: skip


def cache_setting(args) -> str:
    """``--cache``'s spec as the models' ``cache`` parameter and a generation's choice ("": none)."""
    config = build_cache(CACHES[args.cache])
    return json.dumps(describe_cache(config)) if config is not None else ""


# How the client's process runs its pipeline: (its label, what holds around the loop, the pipeline's device)
CLIENT_VARIANTS = {
    "host": ("", contextlib.nullcontext, None),  # the pipeline on the host, as with no other modules
    # the host's CPUs kept out of idle states that are slow to leave (host_idle.py)
    "idle-held": (", idle latency held", host_idle.shallow, None),
    # the pipeline's host work (the scheduler's step on the latents) without waking torch's thread pool
    "one-thread": (", one intra-op thread", loop.one_intra_op_thread, None),
    # latents on the GPU, as a pipeline whose text encoders run there has them
    "gpu": (", pipeline on the GPU", contextlib.nullcontext, torch.device("cuda")),
}


def transformer_names(args) -> dict[str, int]:
    """The served ``dit_transformer`` copies, each with its dynamic-batcher delay (µs): the first is the model."""
    delays = [int(delay) for delay in args.queue_delays.split(",")]
    return {DIT_TRANSFORMER if n == 0 else f"{DIT_TRANSFORMER}_delay{delay}": delay for n, delay in enumerate(delays)}


def write_repository(repository: Path, args, models: Path) -> None:
    """dit_transformer with the speed-ups (and ``--cache``; a copy per further queue delay), flux_generate sending it
    the steps, and a copy running them itself."""
    speedups = speedups_of(args)
    cache = {"cache": cache_setting(args)} if args.cache != NO_CACHE else {}
    source = Locations.here().repository
    for name, delay in transformer_names(args).items():
        transformer = copy_model(source / DIT_TRANSFORMER, repository, name)
        text = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {delay}",
                      transformer.read_text())  # fmt: skip
        transformer.write_text(text)
        for key, value in {"model_dir": args.model, **speedups.parameters(), **cache}.items():
            set_parameter(transformer, key, str(value))
    generation = copy_model(source / GENERATE, repository)
    for key, value in {"model_dir": args.model, **cache}.items():
        set_parameter(generation, key, value)
    copy = copy_model(source / GENERATE, repository, IN_PROCESS_MODEL)
    transformer_in_process(copy, [0] if torch.cuda.is_available() else [], models)


def timed_requests(run, runs: int) -> tuple[dict, torch.Tensor]:
    """The first whole-generation request (after READY), then ``runs`` timed ones; the times and the last one's
    latents."""
    started = time.perf_counter()
    latents = run()
    first_s, times = time.perf_counter() - started, []
    for _ in range(runs):
        started = time.perf_counter()
        latents = run()
        times.append(time.perf_counter() - started)
    row = {"first_s": first_s, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    return row, latents.float().cpu()


def loop_here(models: Path, prompt: dict, args) -> list[tuple[str, dict, torch.Tensor]]:
    """``flux_generate --in-process``'s code in this process: its warmed-up ``DitService`` with the served settings,
    each request parsed and run by ``serving.generate`` as the model's ``execute`` does, without Triton; once per
    bound on the host's lead over the GPU (``--steps-ahead``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = cache_setting(args)
    parameters = {"model_dir": args.model, "cache": cache, **speedups_of(args).parameters()}
    service = warm_service(TransformerSettings.from_parameters(parameters), models, device, "loop", print)
    generation_settings = GenerateSettings(model_dir=args.model, in_process=True, cache=cache or NO_CACHE)
    request = {**prompt, **{name: torch.tensor([args.size]) for name in ("height", "width")},
               "num_inference_steps": torch.tensor([args.steps])}  # fmt: skip
    signature, rows = service.signature, []

    def run(infer) -> torch.Tensor:
        generation = Generation.parse(request, cache, signature, generation_settings, Parts(), set())
        steps = served.ServedSteps(signature, "this process", infer, generation.cache, service.device)
        scheduler = served.scheduler_for(generation_settings, service.model_dir, signature)
        return served.generate(generation, steps, scheduler, Parts())[0].float().cpu()

    try:
        for ahead in map(int, args.steps_ahead.split(",")):
            infer = served.in_process(service, ahead)
            bound = f", {ahead} steps ahead" if ahead != served.STEPS_AHEAD else ""
            config = f"flux_generate's loop, no Triton{bound}"
            rows.append((config, *timed_requests(lambda i=infer: run(i), args.runs)))
    finally:
        service.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--runs", type=int, default=3, help="timed generations of each way, after one")
    parser.add_argument("--attention", default="_native_cudnn")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--fp8-scales", default="")
    parser.add_argument("--fp8-fast-accum", action="store_true")
    parser.add_argument("--model", default=RANDOM_MODEL)
    parser.add_argument("--text-tokens", type=int, default=FULL_SIZE_TEXT_TOKENS)
    parser.add_argument("--cache", default=NO_CACHE, choices=sorted(CACHES), help="every way's step cache")
    parser.add_argument("--ways", default="bls,in-process,client,loop,pipeline", help="which of the five, in order")
    parser.add_argument("--queue-delays", default="100", help="dit_transformer's batcher delays (µs) to compare")
    parser.add_argument("--client-variants", default="host", help=f"of {', '.join(CLIENT_VARIANTS)}")
    parser.add_argument("--steps-ahead", default=str(served.STEPS_AHEAD), help="the loop way's leads, in steps")
    parser.add_argument("--trace", action="store_true", help="trace every served request (triton_trace.py)")
    parser.add_argument("--out", type=Path, default=Path("whole-generation.json"))
    args = parser.parse_args()
    work, models, prompt = prepare(args, "whole-generation-", seed=2)
    repository = work / "repository"
    write_repository(repository, args, models)
    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "size": args.size,
               "steps": args.steps, "fp8": args.fp8, "cache": args.cache, "host": host_idle.describe(),
               "rows": []}  # fmt: skip

    reference = []  # the first way's latents: each way's max_abs_diff is against them

    windows = {}  # each served way's label: (the model its requests went to, the way's first and last ns)

    @contextlib.contextmanager
    def traced(config: str, model: str):
        started = time.monotonic_ns()
        yield
        windows[config] = (model, started, time.monotonic_ns())

    def record(config: str, row: dict, latents: torch.Tensor, steps_ms: list[float] | None = None) -> None:
        """``steps_ms``: each step's time of the last generation (the served call, or the step in process)."""
        reference.append(latents)
        row = {key: value for key, value in row.items() if key.endswith("_s")}
        row = {"config": config, **row, "max_abs_diff": (latents - reference[0]).abs().max().item()}
        if steps_ms:  # the first step also holds the pipeline's preparations
            row["step_ms"] = statistics.median(steps_ms[1:])
        results["rows"].append(row)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"{row['config']:<50} {row['median_s']:.3f} s (min {row['min_s']:.3f}, max {row['max_s']:.3f}), "
              f"first {row['first_s']:.3f} s, max |diff| {row['max_abs_diff']:.2e}", flush=True)  # fmt: skip

    ways, transformers = args.ways.split(","), transformer_names(args)
    # as `serve` starts it (no backend options), loading as many models at once as the GPU's memory allows
    server_args = ["--exit-timeout-secs=5", f"--model-load-thread-count={load_threads()}"]
    trace = work / "trace.json"
    server_args += triton_trace.server_args(trace) if args.trace else []  # tritonserver 2.51 traces no BLS request
    server = TritonServer(repository, env={MODEL_ROOT_ENV: str(models)}, log_path=work / "tritonserver.log",
                          cache=work / "triton", args=server_args)  # fmt: skip
    with server.start(timeout_s=900):
        for way, config, model in (("bls", "flux_generate, steps over BLS", GENERATE),
                                   ("in-process", "flux_generate --in-process", IN_PROCESS_MODEL)):  # fmt: skip
            settings = RemoteSettings(url=server.url, model_name=model, network_timeout_s=900)
            run = lambda s=settings: generate(**prompt, height=args.size, width=args.size,  # noqa: E731
                                              num_inference_steps=args.steps, settings=s,
                                              cache=build_cache(CACHES[args.cache]))  # fmt: skip
            if way in ways:
                with traced(config, model):
                    found = timed_requests(run, args.runs)
                record(config, *found)
        variants = [CLIENT_VARIANTS[name] for name in args.client_variants.split(",")]
        clients = itertools.product(transformers.items() if "client" in ways else (), variants)
        for (name, delay), (label, holding, device) in clients:
            settings = dict(url=server.url, model_name=name, transport="shm", network_timeout_s=900)
            config = "client loop, shared memory" + (f", delay {delay} µs" if len(transformers) > 1 else "") + label
            with RemoteFluxTransformer(**settings) as remote, holding():
                if args.cache != NO_CACHE:
                    remote.enable_cache(build_cache(CACHES[args.cache]))
                with traced(config, name):
                    row = timed(remote, prompt, args, remote.latencies_s, device)
            record(config, row, row["latents"], row["step_latencies_ms"])
    if args.trace:  # written as the server stopped; each way's first generation is left out
        first_requests = {model: args.steps for model in transformers}  # a first generation's: steps, else one
        results["trace"] = {config: triton_trace.summary(trace, model, window, first_requests.get(model, 1))
                            for config, (model, *window) in windows.items()}  # fmt: skip
        args.out.write_text(json.dumps(results, indent=2))
    if "loop" in ways:
        for found in loop_here(models, prompt, args):
            record(*found)
        gc.collect()  # its model and CUDA graphs go before the next way loads its own
        torch.cuda.empty_cache()
    if "pipeline" in ways:
        row = in_process(models, prompt, args, speedups_of(args), args.cache)
        record(row["config"], row, row["latents"], row["step_wall_ms"])
    baseline = results["rows"][-1]["median_s"]  # the last way: the pipeline in process, where it ran
    for config, phases in results.get("trace", {}).items():
        print(f"\n{config}, {windows[config][0]}'s requests traced by the server:\n{triton_trace.table(phases)}")
    print(f"\n{results['gpu']}, {args.size}², {args.steps} steps, fp8={args.fp8}, cache {args.cache}; median of "
          f"{args.runs}")  # fmt: skip
    print(f"{'config':<50} {'s / image':>9} {'vs in process':>13} {'first':>7} {'max |diff|':>10} {'step ms':>8}")
    for row in results["rows"]:
        step = f"{row['step_ms']:>8.1f}" if "step_ms" in row else ""
        print(f"{row['config']:<50} {row['median_s']:>9.3f} {row['median_s'] / baseline - 1:>+12.1%} "
              f"{row['first_s']:>7.2f} {row['max_abs_diff']:>10.2e} {step}")  # fmt: skip


if __name__ == "__main__":
    main()
