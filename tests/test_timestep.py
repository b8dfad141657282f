"""The raw timestep the client sends reproduces the pipeline's scaled timestep exactly."""

from __future__ import annotations

import pytest
import torch

from flux_triton.pipeline import inputs, loop
from flux_triton.pipeline.timestep import TimestepError, raw_timestep, server_scaling

# (preset, steps, (height, width)): the timesteps FluxPipeline makes for these runs.
SCHEDULES = [
    (preset, steps, size)
    for preset in ("dev", "schnell")
    for steps in (1, 4, 20, 28, 50)
    for size in ((64, 48), (512, 512), (1024, 1024), (1360, 768), (2048, 2048))
]


def _pipeline_timesteps() -> torch.Tensor:
    found = []
    for preset, steps, (height, width) in SCHEDULES:
        seq_len = inputs.image_ids(height, width).shape[0]
        found.append(loop.timesteps_for(loop.make_scheduler(preset), steps, seq_len))
    return torch.cat(found).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_flux_schedule_timestep_round_trips_exactly(dtype):
    timesteps = _pipeline_timesteps()
    assert timesteps.numel() > 1000
    scaled = timesteps.to(dtype) / 1000  # FluxPipeline: t.expand(B).to(latents.dtype) / 1000
    raw = raw_timestep(scaled, dtype)
    assert raw.shape == (timesteps.numel(), 1) and raw.dtype == torch.float32
    assert ((raw >= 0) & (raw <= 1000)).all()
    back = server_scaling(raw.reshape(-1), dtype)
    assert back.dtype == dtype
    assert torch.equal(back, scaled)
    assert torch.equal(raw_timestep(scaled, dtype, on_host=False), raw)  # a GPU pipeline's: the same values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_representable_timestep_round_trips(dtype):
    # Every timestep value the pipeline can hold in this dtype between 0 and 1000 (fp32: a dense sample).
    if dtype == torch.bfloat16:
        values = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        values = values[(values >= 0) & (values <= 1000)]
    else:
        values = torch.cat(
            [torch.linspace(0, 1000, 200_001), torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * 1000]
        )
    scaled = values.to(dtype) / 1000
    raw = raw_timestep(scaled, dtype)
    assert torch.equal(server_scaling(raw.reshape(-1), dtype), scaled)


def test_a_timestep_no_raw_value_reproduces_fails_loudly():
    with pytest.raises(TimestepError, match="no raw fp32 timestep"):
        raw_timestep(torch.tensor([2.0]), torch.float32)  # t / 1000 > 1: not from the pipeline
    with pytest.raises(TimestepError, match="NaN"):
        raw_timestep(torch.tensor([float("nan")]), torch.float32)


def test_a_pipeline_in_another_dtype_gets_the_nearest_value():
    scaled = torch.tensor([0.123456789, 0.5, 1.0])  # fp32 pipeline, bf16 server
    raw = raw_timestep(scaled, torch.bfloat16)
    expected = scaled.to(torch.bfloat16)
    got = server_scaling(raw.reshape(-1), torch.bfloat16)
    assert ((got.float() - expected.float()).abs() <= 2**-8 * expected.float()).all()
    assert torch.equal(raw_timestep(scaled, torch.bfloat16, on_host=False), raw)
