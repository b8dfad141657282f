"""GPU checks of the AOTI engines (skipped without CUDA): the full-size FLUX.1-dev blocks compiled
ahead of time, bf16 and FP8, against an fp32 reference of the same weights, next to eager bf16's
own error. The engines come from ``$FLUX_GPU_ENGINES`` (``make engine`` for the random model, as
``benchmarks/h100_run.sh engines`` builds them) or are compiled here (about 1.5 min each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from export import aoti
from flux_triton import reference
from flux_triton.aoti_runner import speedups_for
from flux_triton.speedups import apply_speedups

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("kind", "allowed"), [("aoti", 1.02), ("aoti-fp8", 1.25)])  # bf16 first: FP8 is in place
def test_aoti_engines_are_as_accurate_as_eager(full_size, kind, allowed):
    from benchmarks.gpu_bench import aoti_engine

    model, step, expected, eager_error, rel_l2 = full_size
    apply_speedups(model, speedups_for(kind, model.device))
    engines = os.environ.get("FLUX_GPU_ENGINES")
    engine_dir, packages, _ = aoti_engine(kind, model, Path(engines) if engines else None)
    aoti.attach(model, engine_dir, packages)
    error = rel_l2(reference.diffusers_call(model, step), expected)
    assert error <= allowed * eager_error, f"{kind}: {error:.3e} vs eager {eager_error:.3e}"
