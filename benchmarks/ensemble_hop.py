"""The ensemble's hop, on the CPU: ``flux_dit`` (``dit_preprocess`` -> ``dit_engine``, ONNX Runtime) against
``dit_transformer`` in one tritonserver, each against its own step in process, at FLUX.1-dev's full-size inputs and
outputs (64 latent channels, 512 T5 tokens of 4096, 768 pooled) with next to no compute: one thin block of each kind.
What each served step costs beyond its forward is then the wire, Triton's copies and the Python-backend hops, at the
sizes a GPU host moves; the server's per-model phases show where it goes.

    python benchmarks/ensemble_hop.py --out benchmarks/results/cpu-ensemble-hop.json

``--holding off,on`` (the default) serves it twice, ``dit_engine`` holding each sequence's prompt or not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import tritonclient.http as httpclient
from served_step import measure_served
from workload import THIN_BLOCKS, save_thin

from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, set_parameter
from flux_triton.deploy.placement import hold_prompts
from flux_triton.deploy.repository import write_repository
from flux_triton.deploy.server import TritonServer
from flux_triton.engines.build import build_engine
from flux_triton.engines.kinds import load_engine
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.model.presets import full_size_step
from flux_triton.serving.merging import run_engine_batched
from flux_triton.serving.preprocess import preprocess
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings

MODEL = "flux-dev-thin-io"
THIN_IO = {**THIN_BLOCKS, "num_layers": 1, "num_single_layers": 1}  # one thin block of each kind
CPU = torch.device("cpu")


def in_process_steps(root: Path, sidecar: Path, wire: dict) -> dict:
    """Each served model's step run in this process by the same serving code."""
    service = DitService(TransformerSettings(model_dir=MODEL), root, CPU)
    prepared = service.prepare(wire)
    engine_sidecar, engine = load_engine(sidecar, CPU, root)
    signature, limits = engine_sidecar.dit_signature, engine_sidecar.limits
    return {
        DIT_TRANSFORMER: lambda: service.execute([prepared])[0],
        ENSEMBLE: lambda: run_engine_batched(engine, [preprocess(wire, signature, limits)])[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1024x1024-b1")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--transports", default="shm,http", help="client transports to measure (client/transport.py)")
    parser.add_argument(
        "--holding",
        default="off,on",
        help="dit_engine holding each sequence's prompt (off: "
        "dit_preprocess passes it on every step), a server each; off measures flux_dit with sessions",
    )
    parser.add_argument("--out", type=Path, default=Path("ensemble-hop.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ensemble-hop-"))
    root = work / "models"
    save_thin(root, MODEL, THIN_IO)
    sidecar = build_engine("onnxruntime", MODEL, engines_dir=work / "engines", model_root=root, verify=False)
    wire = {name: tensor.float() for name, tensor in full_size_step(args.shape, device="cpu").wire().items()}
    local = in_process_steps(root, sidecar, wire)

    repository = work / "model_repository"
    write_repository(sidecar, repository)
    shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    set_parameter(repository / DIT_TRANSFORMER / "config.pbtxt", "model_dir", MODEL)
    results: dict = {"device": "cpu", "threads": torch.get_num_threads(), "shape": args.shape, "served": {}}
    results["request_mib"] = sum(t.numel() * t.element_size() for t in wire.values()) / 2**20
    for holding in args.holding.split(","):
        hold_prompts(repository / ENGINE / "config.pbtxt", holding == "on")
        server = TritonServer(
            repository,
            env={MODEL_ROOT_ENV: str(root)},
            log_path=work / f"tritonserver-holding-{holding}.log",
            cache=work / "triton",
            args=["--exit-timeout-secs=5", "--backend-config=python,shm-default-byte-size=67108864"],
        )
        with server, httpclient.InferenceServerClient(server.url, network_timeout=600) as client:
            for transport in args.transports.split(","):
                for model in (DIT_TRANSFORMER, ENSEMBLE):
                    for sessions in (False, True):
                        if holding == "off" and not (model == ENSEMBLE and sessions):
                            continue  # the same as with holding on
                        row = measure_served(client, transport, model, wire, local[model], args, sessions=sessions)
                        held = " (engine holds prompts)" if model == ENSEMBLE and sessions and holding == "on" else ""
                        results["served"][f"{model} {transport}{'+sessions' if sessions else ''}{held}"] = row
    args.out.write_text(json.dumps(results, indent=2))
    print_summary(results)


def print_summary(results: dict) -> None:
    print(f"\ncpu ({results['threads']} threads) {results['shape']}, {results['request_mib']:.1f} MiB per request")
    print(f"{'row':<56} {'served ms':>10} {'in process':>10} {'overhead':>9}   server phases (ms per request)")
    for name, row in results["served"].items():
        served, local = row["served"], row["in_process"]
        phases = "; ".join(
            f"{model} {p['success']:.2f} (in {p['compute_input']:.2f}, out {p['compute_output']:.2f})"
            for model, p in row["server_ms_per_request"].items()
        )
        times = f"{served['median_ms']:>10.2f} {local['median_ms']:>10.2f} {row['overhead_ms']:>9.2f}"
        print(f"{name:<56} {times}   {phases}")


if __name__ == "__main__":
    main()
