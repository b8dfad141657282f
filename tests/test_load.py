"""The bounded load test (``python -m flux_triton load``, CI size): concurrent mixed requests, merged
by the dynamic batcher, each answered with its own single-request result. `make load` runs a larger one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import DEV

from flux_triton.pipeline.inputs import mixed_steps


def load(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "flux_triton", "load", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.server
def test_concurrent_mixed_load_has_no_errors_and_no_cross_talk(public_dev, tmp_path):
    url, model = public_dev.server.url, public_dev.model
    done = load("--url", url, "--model", model, "--clients", "4", "--requests", "48", "--seed", "3", "--json",
                str(tmp_path / "report.json"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    print(done.stdout)
    assert report["errors"] == [] and report["mismatches"] == []
    assert len(report["latencies_s"]) == report["requests"] == 48
    assert report["executions"] < report["requests"], "the dynamic batcher merged nothing: cross-talk went untested"
    assert "48 requests" in done.stdout and "0 errors, 0 mismatches" in done.stdout


def test_the_mix_would_expose_cross_talk():
    """Requests of one shape differ in inputs, timesteps and guidance, so a swapped or mixed-up
    response cannot pass for the right one."""
    requests = [step.wire() for step in mixed_steps(DEV, 48, seed=3)]
    shapes = {tuple(r["hidden_states"].shape[1:]) + tuple(r["encoder_hidden_states"].shape[1:]) for r in requests}
    assert len(shapes) > 1 and len({r["hidden_states"].shape[0] for r in requests}) > 1
    for name in ("hidden_states", "timestep", "guidance"):
        firsts = [r[name][0] for r in requests]
        assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :]), name


@pytest.mark.parametrize("url", ["10.0.0.1:8000", "0.0.0.0:8000", "example.com:8000"])
def test_refuses_non_loopback_targets(url):
    done = load("--url", url, timeout=120)
    assert done.returncode != 0 and "load tests run against loopback addresses only" in done.stderr, done.stderr
