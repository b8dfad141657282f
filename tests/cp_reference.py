"""diffusers' own context-parallel forward of a step, the parity reference of the served one (tests/test_parallel.py):
``python tests/cp_reference.py RANK WORLD PORT ULYSSES RING BACKEND MODEL_DIR STEP OUT`` in WORLD processes
(ULYSSES x RING degrees, diffusers attention BACKEND), as the served ranks run: on GPUs 0..WORLD-1 over NCCL in bf16,
else on the CPU over gloo in fp32 with one thread each; rank 0 writes ``noise_pred`` to OUT. With ``CACHE STEPS SEED
SIZE`` after OUT, STEP holds a prompt's embeddings instead and every rank runs a dev-like ``FluxPipeline`` loop with
that step cache (diffusers' ``enable_cache``); rank 0 writes the final ``latents``. Nothing of flux_triton's
parallel code is used."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, FluxTransformer2DModel
from helpers import generate
from safetensors.torch import load_file, save_file

from flux_triton.contract import Step
from flux_triton.pipeline.caching import build_cache
from flux_triton.pipeline.call import reference_call


def main() -> None:
    rank, world, port, ulysses, ring, backend, model_dir, step_file, out, *loop = sys.argv[1:]
    rank, world = int(rank), int(world)
    gpu = torch.cuda.is_available()
    if gpu:  # rank r on GPU r, in bf16, as the served ranks
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # diffusers places rank r on r % device count: no accelerator
    device, dtype = (torch.device("cuda", rank), torch.bfloat16) if gpu else (torch.device("cpu"), torch.float32)
    dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))  # fmt: skip
    transformer = FluxTransformer2DModel.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
    if backend != "native":
        transformer.set_attention_backend(backend)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=int(ulysses), ring_degree=int(ring)))
    # copies: safetensors' tensors sit at any offset of the file's buffer, and on CPU a small matrix product over
    # misaligned input can round differently (the served model gets its inputs in aligned memory)
    tensors = {name: tensor.to(device).clone() for name, tensor in load_file(step_file).items()}
    if loop:
        cache, steps, seed, size = json.loads(loop[0]), *map(int, loop[1:])
        transformer.enable_cache(build_cache(cache))
        result = {"latents": generate(transformer, "dev", seed, size, num_inference_steps=steps, guidance_scale=3.5,
                                      **tensors)}  # fmt: skip
    else:
        result = {"noise_pred": reference_call(transformer, Step(**{"guidance": None, **tensors}))}
    if rank == 0:
        save_file({name: tensor.cpu().contiguous() for name, tensor in result.items()}, out)
    dist.barrier()
    os._exit(0)  # gloo's teardown at exit sometimes aborts ("terminate called without an active exception")


if __name__ == "__main__":
    main()
