"""``python -m flux_triton.client`` end to end against a real server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from helpers import CHECKOUT
from safetensors.torch import load_file, save_file

from flux_triton.client.cli import main
from flux_triton.deploy.server import free_port
from flux_triton.pipeline import loop

pytestmark = pytest.mark.server


def test_cli_runs_a_loop_with_progress_and_matches_flux_pipeline(dev_server, tiny_dev, tmp_path):

    generator = torch.Generator().manual_seed(7)
    embeds = {"prompt_embeds": torch.randn(1, 8, 32, generator=generator), "pooled_prompt_embeds": torch.randn(1, 32)}
    save_file(embeds, tmp_path / "embeds.safetensors")
    output = tmp_path / "out" / "latents.safetensors"
    command = [
        sys.executable,
        "-m",
        "flux_triton.client",
        "--url",
        dev_server.url,
        "--embeds",
        str(tmp_path / "embeds.safetensors"),
    ]
    command += ["--steps", "5", "--guidance", "4.0", "--seed", "3", "--height", "64", "--width", "48"]
    done = subprocess.run(
        [*command, "--output", str(output)], cwd=CHECKOUT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "5/5" in done.stderr  # the pipeline's progress bar
    assert done.stdout.count("ms (server calls") == 5  # per-step latency
    served = load_file(output)["latents"]
    pipe = loop.flux_pipeline(tiny_dev, "dev")
    expected = pipe(
        **embeds,
        height=64,
        width=48,
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert torch.equal(served, expected)


def test_cli_random_smoke_run_with_true_cfg_batch_and_a_vae_png(dev_server, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from PIL import Image

    threads, step, scheduler_threads = torch.get_num_threads(), FlowMatchEulerDiscreteScheduler.step, []

    def counted_step(self, *args, **kwargs):
        scheduler_threads.append(torch.get_num_threads())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", counted_step)

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,  # the tiny DiT's in_channels // 4
        norm_num_groups=1,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    output = tmp_path / "smoke.safetensors"
    argv = ["--url", dev_server.url, "--random-embeds", "--text-tokens", "8", "--steps", "3", "--true-cfg", "4"]
    argv += ["--batch", "2", "--height", "32", "--width", "32", "--vae", str(tmp_path / "vae"), "--output", str(output)]
    assert main(argv) == 0
    latents = load_file(output)["latents"]
    assert latents.shape == (2, 16 * 16, 4)
    assert torch.isfinite(latents).all()
    for index in range(2):
        with Image.open(tmp_path / f"smoke-{index}.png") as image:
            assert image.size == (32, 32)
    out = capsys.readouterr().out
    assert out.count("ms (server calls") == 3
    assert len(re.findall(r"server calls [\d.]+, [\d.]+ ms", out)) == 3  # true CFG: two server calls a step
    # the loop's host work ran on one intra-op thread (loop.one_intra_op_thread); the process's count came back
    assert scheduler_threads == [1, 1, 1] and torch.get_num_threads() == threads


def test_cli_reports_an_unreachable_server(tmp_path, capsys):
    url = f"127.0.0.1:{free_port()}"
    assert main(["--url", url, "--random-embeds", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert f"error: Triton server at {url} is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
