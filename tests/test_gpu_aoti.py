"""GPU checks of the AOTI engines (skipped without CUDA): the full-size FLUX.1-dev blocks compiled
ahead of time, bf16 and FP8, against an fp32 reference of the same weights, next to eager bf16's
own error, and replayed from a CUDA graph bitwise at 512x512 (at 1024x1024 the capture fails inside the AOTI
runner, so ``dit_engine`` refuses ``cuda_graphs``: docs/engines.md). The engines come from ``$FLUX_GPU_ENGINES``
(``make engine`` for the random model ``flux-dev-random``) or are compiled here (about 1.5 min each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flux_triton.engines import aoti
from flux_triton.engines.aoti_engine import prebuilt_or_build, speedups_for
from flux_triton.model.graphs import GraphedTransformer
from flux_triton.model.presets import RANDOM_MODEL
from flux_triton.model.speedups import apply_speedups
from flux_triton.pipeline.call import reference_call
from flux_triton.pipeline.inputs import rel_l2

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("kind", "allowed"), [("aoti", 1.02), ("aoti-fp8", 1.25)])  # bf16 first: FP8 is in place
def test_aoti_engines_are_as_accurate_as_eager(full_size, kind, allowed):
    model = full_size.model
    apply_speedups(model, speedups_for(kind, model.device))
    engines = os.environ.get("FLUX_GPU_ENGINES")
    engine_dir, packages = prebuilt_or_build(kind, model, Path(engines) if engines else None, RANDOM_MODEL)
    aoti.attach(model, engine_dir, packages)
    error = rel_l2(reference_call(model, full_size.step), full_size.expected)
    assert error <= allowed * full_size.eager_error, f"{kind}: {error:.3e} vs eager {full_size.eager_error:.3e}"
    graphed = GraphedTransformer(model)  # replays of the same AOTI kernels
    for _ in range(4):
        assert torch.equal(reference_call(graphed, full_size.step), reference_call(model, full_size.step))
    assert len(graphed.graphs) == 1
