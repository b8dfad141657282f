"""A bounded load test: concurrent clients, mixed requests, no cross-talk allowed.

Builds a fixed set of requests that differ in resolution, batch size, per-sample timesteps and
guidance, answers each alone first (its reference), then sends them all again from several
concurrent clients so that the dynamic batcher merges them, and checks every response against its
own reference. Loopback only; stops after the fixed number of requests.

    python -m flux_triton.loadtest                      # the small CI run, on its own server
    python -m flux_triton.loadtest --clients 16 --requests 600   # `make load`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ipaddress
import random
import time
from dataclasses import dataclass, field

import torch
import tritonclient.http as httpclient

from client.wire import infer_step
from flux_triton import reference
from flux_triton.contract import DitSignature
from flux_triton.model_store import REPO_ROOT
from flux_triton.server import TritonServer

RESOLUTIONS = ((64, 64), (64, 96), (128, 64))
TEXT_TOKENS = (8, 16)
BATCH_SIZES = (1, 1, 2, 3)


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


def make_requests(signature: DitSignature, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct requests of mixed shapes; each sample has its own timestep and guidance."""
    rng = random.Random(seed)
    requests = []
    for index in range(count):
        height, width = rng.choice(RESOLUTIONS)
        batch = rng.choice(BATCH_SIZES)
        step = reference.random_step(
            signature, batch=batch, height=height, width=width, text_tokens=rng.choice(TEXT_TOKENS), seed=seed + index
        )
        wire = step.wire()
        wire["timestep"] = torch.tensor([[rng.uniform(0.0, 1000.0)] for _ in range(batch)])
        if signature.guidance_embeds:
            wire["guidance"] = torch.tensor([[rng.uniform(1.0, 8.0)] for _ in range(batch)])
        requests.append(wire)
    return requests


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
        requests = make_requests(signature_of(client, model, guidance), count, seed)
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Bounded load test with cross-talk checks (loopback only).")
    parser.add_argument("--url", help="a running server, host:port on loopback (default: start one here)")
    parser.add_argument("--model", default="dit_transformer", help="public model to load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--no-guidance", action="store_true", help="the model has no guidance embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.url:
        report = run_load(args.url, args.model, args.clients, args.requests, not args.no_guidance, args.seed)
    else:
        with TritonServer(REPO_ROOT / "model_repository", args=["--exit-timeout-secs=5"]) as server:
            report = run_load(server.url, args.model, args.clients, args.requests, not args.no_guidance, args.seed)
    print(report.summary())
    for line in report.errors[:10]:
        print(line)
    if report.errors or report.mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
