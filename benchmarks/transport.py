"""Serving overhead of one 1024x1024 step: HTTP binary data vs system shared memory.

A local tritonserver serves an echo model (``noise_pred = hidden_states``) with the full-size
FLUX contract (latents [1, 4096, 64], T5 embeddings [1, 512, 4096], pooled [1, 768]), written
into a temporary repository; the model costs next to nothing, so a round trip is the overhead.
Each transport runs steps the way ``FluxPipeline`` makes them (new latents and timestep each
step, the same embeddings) through ``RemoteFluxTransformer``, straight to the server and through the
guard that ``make serve`` puts in front of it.

    python benchmarks/transport.py --iters 30 --dtype BF16 FP32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flux_triton.client.remote import RemoteFluxTransformer
from flux_triton.client.transport import TRANSPORTS
from flux_triton.contract import INPUTS, OUTPUTS, DitSignature
from flux_triton.deploy.guard import GuardSettings
from flux_triton.deploy.guard.process import GuardProcess
from flux_triton.deploy.pbtxt import to_pbtxt
from flux_triton.deploy.server import LOOPBACK, TritonServer, free_port

MODEL = "dit_echo"
ADMIN_KEY = "transport-bench"
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512  # 1024x1024
ECHO = """
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            latents = pb_utils.get_input_tensor_by_name(request, "hidden_states")
            latents = torch.utils.dlpack.from_dlpack(latents.to_dlpack())
            output = pb_utils.Tensor.from_dlpack("noise_pred", torch.utils.dlpack.to_dlpack(latents.clone()))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
"""


def write_echo(repository: Path, dtype: str) -> None:
    signature = DitSignature(in_channels=64, pooled_dim=768, text_dim=4096, guidance_embeds=True, dtype=dtype)
    config = {
        "name": MODEL,
        "backend": "python",
        "max_batch_size": 1,
        "input": [signature.tensor_config(spec) for spec in INPUTS],
        "output": [signature.tensor_config(spec) for spec in OUTPUTS],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }
    folder = repository / MODEL
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config))
    (folder / "1" / "model.py").write_text(ECHO.lstrip())


def pipeline_steps(dtype: torch.dtype, count: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """The embeddings (the same objects every step) and ``count`` steps' latents and timesteps."""
    generator = torch.Generator().manual_seed(seed)
    fixed = {
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 4096, generator=generator).to(dtype),
        "pooled_projections": torch.randn(1, 768, generator=generator).to(dtype),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "img_ids": torch.rand(IMAGE_TOKENS, 3, generator=generator),
        "guidance": torch.full([1], 3.5),
    }
    steps = []
    for index in range(count):
        t = torch.tensor([1000.0 - index]).to(dtype) / 1000  # FluxPipeline's scaled timestep
        steps.append({"hidden_states": torch.randn(1, IMAGE_TOKENS, 64, generator=generator).to(dtype), "timestep": t})
    return fixed, steps


def measure(urls: dict[str, str], dtype: str, warmup: int, iters: int) -> list[dict]:
    """Each transport to each endpoint (``{"direct": url, "guard": url}``), one call each per step in
    alternating order, so that a busy host slows all alike."""
    torch_dtype = {"BF16": torch.bfloat16, "FP32": torch.float32}[dtype]
    fixed, steps = pipeline_steps(torch_dtype, warmup + iters)
    routes = [(transport, via) for via in urls for transport in TRANSPORTS]
    times: dict[tuple[str, str], list[float]] = {route: [] for route in routes}
    remotes = {
        (transport, via): RemoteFluxTransformer(
            url=urls[via], model_name=MODEL, transport=transport, guidance_embeds=True, admin_key=ADMIN_KEY
        )
        for transport, via in routes
    }
    try:
        for index, step in enumerate(steps):
            for name in routes if index % 2 else reversed(routes):
                started = time.perf_counter()
                (noise_pred,) = remotes[name](**fixed, **step, return_dict=False)
                if index >= warmup:
                    times[name].append((time.perf_counter() - started) * 1e3)
                if not torch.equal(noise_pred, step["hidden_states"]):
                    raise AssertionError(f"{name}: the echo did not come back intact")
        via = next(iter(urls))
        sent = {
            "http": sum(t.nbytes for t in remotes["http", via].step(**fixed, **steps[-1]).wire().values()),
            "shm": sum(remotes["shm", via].transport.written[-1].values()),
        }
    finally:
        for remote in remotes.values():
            remote.close()
    return [
        {
            "transport": transport,
            "via": via,
            "dtype": dtype,
            "median_ms": statistics.median(times[transport, via]),
            "min_ms": min(times[transport, via]),
            "max_ms": max(times[transport, via]),
            "iters": iters,
            "bytes_sent_per_step": sent[transport],
        }
        for transport, via in routes
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=["BF16", "FP32"], default=["BF16", "FP32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory(prefix="transport-bench-") as folder:
            repository = Path(folder) / "model_repository"
            write_echo(repository, dtype)
            server = TritonServer(
                repository,
                log_path=Path(folder) / "tritonserver.log",
                args=["--exit-timeout-secs=5"],
            )
            with server.start():
                ports = (free_port(), free_port(), free_port())
                guard = GuardProcess(LOOPBACK, ports, GuardSettings(), ADMIN_KEY)  # as make serve runs it
                guard.start(server.endpoints)
                try:
                    urls = {"direct": server.url, "guard": f"{LOOPBACK}:{guard.ports[0]}"}
                    rows += measure(urls, dtype, args.warmup, args.iters)
                finally:
                    guard.stop()
    print(f"{platform.node()} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"{'dtype':5}  {'transport':9}  {'via':6}  {'median ms':>9}  {'min ms':>7}  {'max ms':>7}  {'MB/step':>7}  n")
    for row in rows:
        print(
            f"{row['dtype']:5}  {row['transport']:9}  {row['via']:6}  {row['median_ms']:9.2f}  {row['min_ms']:7.2f}  "
            f"{row['max_ms']:7.2f}  {row['bytes_sent_per_step'] / 1e6:7.2f}  {row['iters']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
