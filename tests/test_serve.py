"""``make serve`` on a fresh clone: the committed repository (only what git tracks), the default
engine built by ``python -m flux_triton engine``, and every model ready under ``python -m flux_triton serve``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from helpers import CHECKOUT, DEV
from tritonclient.utils import InferenceServerException

from flux_triton.client import RemoteSettings, generate, generate_images
from flux_triton.client.wire import infer_step
from flux_triton.contract.protocol import ADMIN_HEADER, ADMIN_KEY_ENV
from flux_triton.deploy.server import free_port
from flux_triton.locations import ENGINES_DIR_ENV, MODEL_ROOT_ENV
from flux_triton.pipeline.inputs import random_step

pytestmark = pytest.mark.server
MODELS = {"dit_transformer", "flux_dit", "dit_preprocess", "dit_engine", "flux_text_encoder", "flux_vae",
          "flux_generate", "flux_generate_stream"}  # fmt: skip


def tracked_repository(target: Path) -> Path:
    """``model_repository/`` as a fresh clone has it: the files git tracks, nothing generated."""
    listed = subprocess.run(["git", "ls-files", "model_repository"], cwd=CHECKOUT, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip("not a git checkout")
    for name in listed.stdout.split():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CHECKOUT / name, target / name)
    return target / "model_repository"


def test_every_model_of_a_fresh_clone_is_served(tmp_path, model_root):
    repository = tracked_repository(tmp_path)
    env = {**os.environ, MODEL_ROOT_ENV: str(model_root), ENGINES_DIR_ENV: str(tmp_path / "engines")}
    env[ADMIN_KEY_ENV] = "test-key"  # the repository index is behind the admin key under the supervisor
    command = [sys.executable, "-m", "flux_triton"]
    built = subprocess.run([*command, "engine", "--if-missing", "--no-repo", "--no-verify"], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr
    ports = [free_port() for _ in range(3)]
    serve = [*command, "serve", "--model-repository", str(repository), "--exit-timeout-secs=5"]
    serve += [f"--{kind}-port={port}" for kind, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(serve, cwd=CHECKOUT, env=env, stdout=log, stderr=log)
    try:
        with httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}") as client:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if client.is_server_ready():
                        break
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
            listed = client.get_model_repository_index(headers={ADMIN_HEADER: "test-key"})
            index = {m["name"]: m.get("state") for m in listed}
            assert index == dict.fromkeys(MODELS, "READY"), (tmp_path / "serve.log").read_text()[-3000:]
            step = random_step(DEV, height=256, width=256)
            for model in ("dit_transformer", "flux_dit"):
                assert infer_step(client, model, step.wire()).shape == step.hidden_states.shape
            served = RemoteSettings(url=f"127.0.0.1:{ports[0]}")
            generated = generate(step.encoder_hidden_states, step.pooled_projections, height=64, width=64,
                                 num_inference_steps=2, settings=served)  # fmt: skip
            assert generated.shape == (1, 16, DEV.in_channels)
            images = generate_images("a red fox", height=64, width=48, num_inference_steps=2, settings=served)
            assert len(images) == 1 and images[0].size == (48, 64)
            for model in ("flux_text_encoder", "flux_vae"):  # internal: flux_generate calls them in process
                with pytest.raises(InferenceServerException, match="admin key"):
                    client.get_model_config(model)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
