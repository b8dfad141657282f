"""The small bounded load test (CI): concurrent mixed requests, merged by the dynamic batcher,
each answered with its own single-request result. `make load` runs the larger one."""

from __future__ import annotations

import pytest
import torch

from flux_triton import loadtest
from flux_triton.contract import DitSignature

pytestmark = pytest.mark.server

DEV = DitSignature(in_channels=4, pooled_dim=32, text_dim=32, guidance_embeds=True, dtype="FP32")


def test_concurrent_mixed_load_has_no_errors_and_no_cross_talk(public_dev):
    report = loadtest.run_load(public_dev.server.url, public_dev.model, clients=4, count=48, seed=3)
    print(report.summary())
    assert report.errors == []
    assert report.mismatches == []
    assert len(report.latencies_s) == report.requests == 48
    assert report.executions < report.requests, "the dynamic batcher merged nothing: cross-talk went untested"


def test_the_mix_would_expose_cross_talk():
    """Requests of one shape differ in inputs, timesteps and guidance, so a swapped or mixed-up
    response cannot pass for the right one."""
    requests = loadtest.make_requests(DEV, 48, seed=3)
    shapes = {tuple(r["hidden_states"].shape[1:]) + tuple(r["encoder_hidden_states"].shape[1:]) for r in requests}
    assert len(shapes) > 1 and len({r["hidden_states"].shape[0] for r in requests}) > 1
    for name in ("hidden_states", "timestep", "guidance"):
        firsts = [r[name][0] for r in requests]
        assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1 :]), name


@pytest.mark.parametrize("url", ["10.0.0.1:8000", "0.0.0.0:8000", "example.com:8000"])
def test_refuses_non_loopback_targets(url):
    with pytest.raises(ValueError, match="loopback"):
        loadtest.check_loopback(url)
