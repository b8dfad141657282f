"""A bounded load test: concurrent clients, mixed requests, no cross-talk allowed.

Builds a fixed set of requests that differ in resolution, batch size, per-sample timesteps and
guidance, answers each alone first (its reference), then sends them all again from several
concurrent clients so that the dynamic batcher merges them, and checks every response against its
own reference. Loopback only; stops after the fixed number of requests.

    python -m flux_triton load                                 # a small run, on its own server
    python -m flux_triton load --clients 16 --requests 800     # `make load`
    python -m flux_triton load --url 127.0.0.1:8000 --model flux_dit --json report.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ipaddress
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import tritonclient.http as httpclient

from flux_triton.client.wire import infer_step
from flux_triton.contract import DitSignature
from flux_triton.deploy.server import TritonServer
from flux_triton.locations import Locations
from flux_triton.pipeline.inputs import mixed_steps


@dataclass
class LoadReport:
    requests: int
    samples: int
    errors: list[str] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    executions: int = 0  # model executions the server ran for these requests (merging when < requests)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")

    def summary(self) -> str:
        return (
            f"{self.requests} requests ({self.samples} samples) in {self.wall_s:.2f} s: "
            f"{self.requests / self.wall_s:.1f} req/s, {self.samples / self.wall_s:.1f} samples/s; "
            f"latency p50 {self.percentile(50) * 1e3:.1f} ms, p90 {self.percentile(90) * 1e3:.1f} ms, "
            f"p99 {self.percentile(99) * 1e3:.1f} ms; {self.executions} model executions; "
            f"{len(self.errors)} errors, {len(self.mismatches)} mismatches"
        )


def check_loopback(url: str) -> None:
    host = url.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load tests run against loopback addresses only, got {url}")


def signature_of(client: httpclient.InferenceServerClient, model: str, guidance: bool) -> DitSignature:
    """C, P and D from the served model's config (the contract's fixed dims)."""
    inputs = {entry["name"]: entry for entry in client.get_model_config(model)["input"]}
    dtype = inputs["hidden_states"]["data_type"].removeprefix("TYPE_")
    return DitSignature(
        in_channels=int(inputs["hidden_states"]["dims"][-1]),
        pooled_dim=int(inputs["pooled_projections"]["dims"][-1]),
        text_dim=int(inputs["encoder_hidden_states"]["dims"][-1]),
        guidance_embeds=guidance,
        dtype=dtype,
    )


def _executions(client: httpclient.InferenceServerClient, model: str) -> int:
    """Executions of the model that batches: an ensemble's last step (its engine)."""
    steps = client.get_model_config(model).get("ensemble_scheduling", {}).get("step", [])
    model = steps[-1]["model_name"] if steps else model
    return sum(stats["execution_count"] for stats in client.get_inference_statistics(model)["model_stats"])


def run_load(
    url: str, model: str, clients: int, count: int, guidance: bool = True, seed: int = 0, timeout_s: float = 120.0
) -> LoadReport:
    check_loopback(url)
    with httpclient.InferenceServerClient(url, network_timeout=timeout_s) as client:
        requests = [step.wire() for step in mixed_steps(signature_of(client, model, guidance), count, seed)]
        expected = [infer_step(client, model, wire) for wire in requests]  # each alone, one at a time
        before = _executions(client, model)
        report = LoadReport(requests=count, samples=sum(wire["hidden_states"].shape[0] for wire in requests))

        def worker(indices: list[int]) -> None:
            with httpclient.InferenceServerClient(url, network_timeout=timeout_s) as own:
                for index in indices:
                    start = time.perf_counter()
                    try:
                        result = infer_step(own, model, requests[index])
                    except Exception as exc:
                        report.errors.append(f"request {index}: {type(exc).__name__}: {exc}")
                        continue
                    report.latencies_s.append(time.perf_counter() - start)
                    same = result.shape == expected[index].shape and torch.allclose(
                        result, expected[index], rtol=1e-4, atol=1e-4
                    )
                    if not same:
                        report.mismatches.append(index)

        order = list(range(count))
        random.Random(seed + 1).shuffle(order)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(worker, order[i::clients]) for i in range(clients)]:
                future.result()
        report.wall_s = time.perf_counter() - start
        report.executions = _executions(client, model) - before
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_triton load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server, host:port on loopback (default: start one here)")
    parser.add_argument("--model", default="dit_transformer", help="public model to load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--no-guidance", action="store_true", help="the model has no guidance embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.url:
        report = run_load(args.url, args.model, args.clients, args.requests, not args.no_guidance, args.seed)
    else:
        log = Path(tempfile.mkdtemp(prefix="flux-triton-load-")) / "tritonserver.log"
        with TritonServer(Locations.here().repository, log_path=log, args=["--exit-timeout-secs=5"]) as server:
            report = run_load(server.url, args.model, args.clients, args.requests, not args.no_guidance, args.seed)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    for line in report.errors[:10]:
        print(line)
    if report.errors or report.mismatches:
        raise SystemExit(1)
