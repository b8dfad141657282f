"""Static FP8 activation scales (``model.fp8_scales``), on the CPU (``torch._scaled_mm`` runs there too): the
calibration takes each block linear's largest input, the file round-trips with its metadata, a file made for
another model (or damaged) is refused by name, and a served model with the scales computes what the FP8 model with
those scales computes, close to the fp32 step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
from helpers import embeds, fp8_on_cpu, generate, load_tiny
from safetensors import safe_open
from safetensors.torch import save_file

from flux_triton.contract import DitSignature
from flux_triton.model import store
from flux_triton.model.fp8 import FP8_MAX, Float8Linear, block_linears, quantize_blocks
from flux_triton.model.fp8_scales import SCALES_FILE, Calibration, ScalesError, calibrate, load_scales, save_scales
from flux_triton.model.speedups import Speedups, apply_speedups
from flux_triton.pipeline import call, inputs
from flux_triton.pipeline.caching import build_cache
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings

SMALL = Calibration(shapes=((64, 64, 1), (128, 64, 2)), timesteps=(1000.0, 300.0), seeds=(0,), text_tokens=8)


@pytest.fixture
def dev_folder(tmp_path, model_root):
    """A copy of tiny-flux-dev's folder under its own model root (scales files are written into it)."""
    shutil.copytree(store.resolve_model_dir("tiny-flux-dev", model_root), tmp_path / "tiny-flux-dev")
    return tmp_path / "tiny-flux-dev"


@pytest.fixture(scope="module")
def dev_scales(model_root):
    return calibrate(load_tiny(model_root, "tiny-flux-dev"), SMALL)


def test_each_scale_is_the_largest_input_of_its_linear_over_the_calibration(model_root, dev_scales):
    transformer = load_tiny(model_root, "tiny-flux-dev")
    linears = block_linears(transformer)
    assert set(dev_scales) == set(linears) and len(linears) == 17  # 12 in the double block, 5 in the single one
    seen = dict.fromkeys(linears, 0.0)

    def largest_input(name):
        def hook(_module, args, _output):
            seen[name] = max(seen[name], args[0].abs().max().item())

        return hook

    for name, module in linears.items():
        module.register_forward_hook(largest_input(name))
    signature = DitSignature.from_config(transformer.config, torch.float32)
    for height, width, batch in SMALL.shapes:
        for timestep in SMALL.timesteps:
            call.reference_call(transformer, inputs.random_step(signature, batch, height, width, 8, timestep, seed=0))
    for name, scale in dev_scales.items():
        assert scale.item() == pytest.approx(seen[name] / FP8_MAX, rel=1e-6), name


def test_a_scales_file_round_trips_with_its_model_and_calibration(model_root, dev_folder, dev_scales):
    transformer = load_tiny(model_root, "tiny-flux-dev")
    path = save_scales(dev_folder / SCALES_FILE, dev_scales, transformer.config, SMALL)
    with safe_open(path, framework="pt") as saved:
        metadata = saved.metadata()
    assert metadata["format"] == "flux-triton-fp8-activation-scales" and metadata["version"] == "1"
    assert json.loads(metadata["calibration"])["timesteps"] == [1000.0, 300.0]
    assert load_scales(path, transformer) == {name: scale.item() for name, scale in dev_scales.items()}


def test_a_scales_file_for_another_model_or_damaged_is_refused(model_root, dev_folder, dev_scales, tmp_path):
    dev = load_tiny(model_root, "tiny-flux-dev")
    schnell = load_tiny(model_root, "tiny-flux-schnell")
    path = save_scales(dev_folder / SCALES_FILE, dev_scales, dev.config, SMALL)
    with pytest.raises(ScalesError, match="was calibrated for another model"):
        load_scales(path, schnell)
    fewer = dict(list(dev_scales.items())[1:])
    with pytest.raises(ScalesError, match=r"does not match the model's block linears: 1 missing \['transformer_b"):
        load_scales(save_scales(tmp_path / "fewer.safetensors", fewer, dev.config, SMALL), dev)
    zero = {**dev_scales, "transformer_blocks.0.attn.to_q": torch.tensor(0.0)}
    with pytest.raises(ScalesError, match=r"not positive and finite: \['transformer_blocks.0.attn.to_q'\]"):
        load_scales(save_scales(tmp_path / "zero.safetensors", zero, dev.config, SMALL), dev)
    save_file({"x": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ScalesError, match="is not an FP8 scales file of version 1"):
        load_scales(tmp_path / "other.safetensors", dev)
    with pytest.raises(ScalesError, match=r"no file .*python -m flux_triton calibrate"):
        load_scales(tmp_path / "absent.safetensors", dev)


@fp8_on_cpu
def test_static_scales_quantize_like_the_dynamic_ones_and_a_wrong_scale_shows(model_root, dev_scales):
    """Static FP8 is close to fp32, as dynamic FP8 is; scales 100x too small (saturating) are far off."""
    signature = DitSignature.from_config(load_tiny(model_root, "tiny-flux-dev").config, torch.float32)
    step = inputs.random_step(signature, batch=2, height=64, width=64, text_tokens=8, timestep=700.0, seed=5)
    exact = call.reference_call(load_tiny(model_root, "tiny-flux-dev"), step)
    errors = {}
    for label, scales in {"dynamic": None, "static": dev_scales,
                          "saturating": {n: s / 100 for n, s in dev_scales.items()}}.items():  # fmt: skip
        model = load_tiny(model_root, "tiny-flux-dev")
        assert quantize_blocks(model, scales) == 17
        assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 17
        errors[label] = inputs.rel_l2(call.reference_call(model, step), exact)
    assert errors["static"] < 1e-2 and errors["dynamic"] < 1e-2, errors  # both ~3e-3
    assert errors["saturating"] > 5 * errors["static"], errors


def test_quantizing_frees_every_bf16_linear_before_the_cache_is_emptied(model_root, monkeypatch):
    """The device gets a replaced linear's memory back when the cache is emptied only if nothing refers to the linear
    any more; otherwise a served FP8 model keeps its bf16 weights' memory reserved beside its FP8 ones."""
    model = load_tiny(model_root, "tiny-flux-dev")
    originals = [weakref.ref(linear) for linear in block_linears(model).values()]
    alive_when_emptied = []
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: alive_when_emptied.append(sum(r() is not None for r in originals))
    )
    assert quantize_blocks(model) == len(originals) == 17
    assert alive_when_emptied == [0]


@fp8_on_cpu
def test_the_service_loads_the_scales_beside_the_model_and_refuses_a_mismatch(model_root, dev_folder, dev_scales):
    dev = load_tiny(model_root, "tiny-flux-dev")
    save_scales(dev_folder / SCALES_FILE, dev_scales, dev.config, SMALL)
    settings = TransformerSettings(model_dir="tiny-flux-dev", speedups=Speedups(fp8=True, fp8_scales=SCALES_FILE))
    service = DitService(settings, dev_folder.parent, torch.device("cpu"))
    quantize_blocks(dev, {name: scale.item() for name, scale in dev_scales.items()})
    step = inputs.random_step(service.signature, batch=1, text_tokens=8, seed=6)
    assert torch.equal(service.forward(step), call.reference_call(dev, step))
    schnell_scales = calibrate(load_tiny(model_root, "tiny-flux-schnell"), SMALL)
    save_scales(dev_folder / SCALES_FILE, schnell_scales, load_tiny(model_root, "tiny-flux-schnell").config, SMALL)
    with pytest.raises(ScalesError, match="calibrated for another model"):
        DitService(settings, dev_folder.parent, torch.device("cpu"))
    outside = TransformerSettings(model_dir="tiny-flux-dev", speedups=Speedups(fp8=True, fp8_scales="../../scales"))
    with pytest.raises(store.ModelDirError, match="outside the model folder"):
        DitService(outside, dev_folder.parent, torch.device("cpu"))


def test_fp8_scales_need_fp8():
    with pytest.raises(ValueError, match=r"fp8_scales 'fp8_scales\.safetensors': static activation scales are for fp8"):
        TransformerSettings.from_config({"parameters": {"fp8_scales": {"string_value": SCALES_FILE}}})


def test_the_calibrate_command_writes_the_scales_into_the_model_folder(model_root, dev_folder):
    command = [sys.executable, "-m", "flux_triton", "calibrate", "tiny-flux-dev", "--root", str(dev_folder.parent),
               "--shapes", "64x64x1,128x64x2", "--timesteps", "1000,300"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "17 activation scales from 8 steps on cpu" in done.stdout  # 2 shapes, 2 timesteps, 2 seeds
    scales = load_scales(dev_folder / SCALES_FILE, load_tiny(model_root, "tiny-flux-dev"))
    with safe_open(dev_folder / SCALES_FILE, framework="pt") as saved:
        assert json.loads(saved.metadata()["calibration"])["shapes"] == [[64, 64, 1], [128, 64, 2]]
    assert len(scales) == 17


@fp8_on_cpu
@pytest.mark.parametrize("recipe", ["per-token", "static", "static+fast"])
@pytest.mark.parametrize("kind", ["first_block", "mag", "taylorseer"])
def test_every_fp8_recipe_composes_with_every_step_cache(model_root, dev_scales, recipe, kind):
    """The served speed-ups (FP8 per-token or with static scales, with or without fast accumulation, and a step cache)
    give the 28-step cached loop of diffusers' own hooks on the same FP8 model, bit for bit; the cache skips work."""
    scales = None if recipe == "per-token" else {name: scale.item() for name, scale in dev_scales.items()}
    fast = recipe.endswith("+fast")
    config = build_cache({"kind": kind, **({"threshold": 0.5} if kind == "first_block" else {})})
    kwargs = dict(num_inference_steps=28, guidance_scale=3.5, **embeds(8))
    served = load_tiny(model_root, "tiny-flux-dev")
    apply_speedups(served, Speedups(fp8=True, fp8_fast_accum=fast), config, fp8_scales=scales)
    local = load_tiny(model_root, "tiny-flux-dev")
    quantize_blocks(local, scales, fast)
    uncached = generate(local, "dev", seed=8, **kwargs)
    local.enable_cache(config)
    expected = generate(local, "dev", seed=8, **kwargs)
    assert torch.equal(generate(served, "dev", seed=8, **kwargs), expected)
    assert not torch.equal(expected, uncached)
