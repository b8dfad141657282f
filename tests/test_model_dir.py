"""A dit_transformer whose model directory is missing, corrupt, unsafe or outside the model root, whose warm-up
fails, or whose step cache two instances would split, does not load (never READY), and the server says why
(repository index, launcher error); nothing outside the root is read and no pickle is ever unpickled."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
from helpers import REPOSITORY, copy_model, launch, start_server

from flux_triton.deploy.pbtxt import set_parameter
from flux_triton.deploy.server import ModelLoadError
from flux_triton.locations import MODEL_ROOT_ENV

pytestmark = pytest.mark.server


class _Exploit:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, model_root) -> dict:
    """One server over copies of dit_transformer, each pointed at a bad model directory."""
    tmp = tmp_path_factory.mktemp("broken")
    root, outside = tmp / "models", tmp / "outside"
    good = model_root / "tiny-flux-dev"
    shutil.copytree(good, outside / "tiny-flux-dev")
    shutil.copytree(good, root / "corrupt-config")
    (root / "corrupt-config" / "config.json").write_text('{"in_channels": 4, ')
    shutil.copytree(good, root / "corrupt-weights")
    weights = next((root / "corrupt-weights").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "pickle-only").mkdir()
    shutil.copy(good / "config.json", root / "pickle-only" / "config.json")
    marker = tmp / "unpickled"
    (root / "pickle-only" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    (root / "escape-link").symlink_to(outside / "tiny-flux-dev")
    shutil.copytree(good, root / "tiny-flux-dev")
    cases = {
        "missing": "no-such-model",
        "corrupt_config": "corrupt-config",
        "corrupt_weights": "corrupt-weights",
        "pickle_only": "pickle-only",
        "dotdot": "../outside/tiny-flux-dev",
        "absolute": str(outside / "tiny-flux-dev"),
        "symlink": "escape-link",
        "warmup": "tiny-flux-dev",  # a good model whose warm-up fails (past max_batch 16)
        "cached_instances": "tiny-flux-dev",  # a good model whose step cache two instances would split
    }
    parameters = {"warmup": {"warmup_shapes": "64x48x99x8"}, "cached_instances": {"cache": "mag"}}
    repository = tmp / "model_repository"
    for case, model_dir in cases.items():
        config = copy_model(repository, "dit_transformer", f"dit_{case}")
        set_parameter(config, "model_dir", model_dir)
        for key, value in parameters.get(case, {}).items():
            set_parameter(config, key, value)
        if case == "cached_instances":
            config.write_text(config.read_text() + "instance_group [{ kind: KIND_CPU, count: 2 }]\n")
    server = launch(repository, tmp, {MODEL_ROOT_ENV: str(root)}).start(wait_for="live")
    yield {"server": server, "marker": marker, "outside": outside}
    server.stop()


def reason(broken, case: str) -> str:
    """The load error of one model, once the server has finished trying to load it."""
    state, why = broken["server"].model_states()[f"dit_{case}"]
    assert state == "UNAVAILABLE", (state, why)
    assert not broken["server"].is_ready()
    return why


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no FluxTransformer2DModel config.json in"),
        ("corrupt_config", "corrupt config.json in"),
        ("corrupt_weights", "cannot load FluxTransformer2DModel from"),
        ("pickle_only", "only safetensors are loaded"),
        ("dotdot", "outside the model root"),
        ("absolute", "outside the model root"),
        ("symlink", "outside the model root"),
        ("warmup", "warm-up at 64x48, batch 99, 8 text tokens failed: InputError: hidden_states: B=99 exceeds"),
        ("cached_instances", "cache mag and instance_group: a step cache keeps each generation's state in one"),
    ],
)
def test_server_reports_why_a_model_directory_does_not_load(broken, case, expected):
    assert expected in reason(broken, case)


def test_pickle_weights_are_never_unpickled(broken):
    assert "only safetensors" in reason(broken, "pickle_only")
    assert not broken["marker"].exists()


def test_launcher_fails_fast_with_the_reason(tmp_path, model_root):
    with pytest.raises(ModelLoadError, match=r"dit_transformer: .*no FluxTransformer2DModel config.json in"):
        start_server(tmp_path, model_root, ["dit_transformer"], parameters={"dit_transformer": {"model_dir": "gone"}})


def test_a_damaged_engine_does_not_load_and_the_server_says_why(tmp_path, model_root):
    """flux_dit over an ONNX graph changed after its build: dit_engine refuses it, naming the file."""
    from helpers import launch

    from flux_triton.deploy.repository import write_repository
    from flux_triton.engines.build import build_engine
    from flux_triton.locations import Locations

    sidecar = build_engine("onnxruntime", "tiny-flux-dev", engines_dir=tmp_path / "engines", model_root=model_root,
                           verify=False)  # fmt: skip
    graph = tmp_path / "engines" / "tiny-flux-dev-fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:-64])  # truncated, as by an interrupted copy
    write_repository(sidecar, tmp_path / "model_repository", Locations(REPOSITORY.parent))
    server = launch(tmp_path / "model_repository", tmp_path, {MODEL_ROOT_ENV: str(model_root)})
    with pytest.raises(ModelLoadError, match=rf"dit_engine: .*{graph}.* does not match its recorded sha256"):
        server.start()
