"""Ready means warm: the steps a model runs before READY (``warmup_shapes``; a failed one keeps the model
unavailable: ``tests/test_model_dir.py``) and torch.compile's caches kept across restarts (``compile_cache_dir``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import tritonclient.http as httpclient
from helpers import DEV, start_server

from flux_triton.client.wire import infer_step
from flux_triton.model.compile_cache import INDUCTOR_CACHE_ENV, compile_key, use_compile_cache
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline import call
from flux_triton.pipeline.inputs import random_step, rel_l2
from flux_triton.serving.settings import DEFAULT_WARMUP, TransformerSettings

# One server process's life, in a fresh interpreter: load with regional compile and a compile cache folder, warm up
# as initialize does, then one request; the compile counters after the warm-up and after the request.
_RESTART = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from flux_triton.contract.protocol import STATELESS
from flux_triton.model.speedups import Speedups
from flux_triton.pipeline.inputs import random_step
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import TransformerSettings
settings = TransformerSettings(model_dir="tiny-flux-dev", speedups=Speedups(compile="regional"),
                               compile_cache_dir=sys.argv[2], warmup_shapes="64x48x1x8")
service = DitService(settings, Path(sys.argv[1]), torch.device("cpu"))
service.warm_up(settings.warmup("cpu"))
warm = dict(counters["inductor"])
service.run([(random_step(service.signature, 1, 64, 48, 8, 700.0, seed=1).wire(), STATELESS)])
print(json.dumps({"folder": str(service.compile_cache), "warm": warm, "after": dict(counters["inductor"])}))
"""


def test_warmup_shapes_are_parsed_and_auto_warms_what_compiles_or_runs_on_a_gpu():
    assert TransformerSettings(warmup_shapes="64x48x2,128x64x1x8").warmup("cpu") == ((64, 48, 2, 512), (128, 64, 1, 8))
    assert TransformerSettings().warmup("cpu") == ()  # the shipped CPU model: nothing to warm
    assert TransformerSettings().warmup("cuda") == DEFAULT_WARMUP == ((1024, 1024, 1, 512),)
    assert TransformerSettings(speedups=Speedups(compile="regional")).warmup("cpu") == DEFAULT_WARMUP
    assert TransformerSettings(warmup_shapes="none").warmup("cuda") == ()
    with pytest.raises(ValueError, match=r"warmup_shapes parameter: expected HEIGHTxWIDTHxBATCH.*got '64x48'"):
        TransformerSettings(warmup_shapes="64x48")


@pytest.mark.build
def test_a_restarted_model_compiles_nothing_it_compiled_before(model_root, tmp_path):
    """Two process lives over one cache folder: the first compiles during its warm-up (so its first request
    compiles nothing), the second finds every graph in the cache."""
    folder = tmp_path / "compile-cache"
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _RESTART, str(model_root), str(folder)], capture_output=True,
                              text=True, timeout=600, check=True)  # fmt: skip
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["warm"] == first["after"] and second["warm"] == second["after"], "a request after warm-up compiled"
    assert first["warm"].get("fxgraph_cache_miss", 0) > 0 and first["warm"].get("fxgraph_cache_hit", 0) == 0
    assert second["warm"].get("fxgraph_cache_hit", 0) > 0 and second["warm"].get("fxgraph_cache_miss", 0) == 0
    assert first["folder"] == second["folder"] and os.path.dirname(first["folder"]) == str(folder)


def test_the_cache_key_covers_the_model_settings_and_versions_and_a_bad_folder_is_a_warning(tmp_path, tiny_dev):
    cpu = torch.device("cpu")
    key = compile_key(tiny_dev.config, torch.float32, Speedups(compile="regional"), cpu)
    assert key["torch"] == torch.__version__ and key["device"] == "cpu"
    others = [
        compile_key({**tiny_dev.config, "num_layers": 2}, torch.float32, Speedups(compile="regional"), cpu),
        compile_key(tiny_dev.config, torch.bfloat16, Speedups(compile="regional"), cpu),
        compile_key(tiny_dev.config, torch.float32, Speedups(compile="regional", fuse_qkv=True), cpu),
    ]
    before = os.environ.get(INDUCTOR_CACHE_ENV)
    try:
        folders = {use_compile_cache(tmp_path, k) for k in [key, *others]}
        assert len(folders) == 4 and json.loads((tmp_path / folders.pop().name / "key.json").read_text())
        blocked = tmp_path / "a-file"
        blocked.write_text("")
        current = os.environ[INDUCTOR_CACHE_ENV]
        with pytest.warns(UserWarning, match=f"compile_cache_dir {blocked}: cannot be written"):
            assert use_compile_cache(blocked, key) is None
        assert os.environ[INDUCTOR_CACHE_ENV] == current  # the last good folder (or torch's default) stays
    finally:
        os.environ.pop(INDUCTOR_CACHE_ENV, None) if before is None else os.environ.update({INDUCTOR_CACHE_ENV: before})


@pytest.mark.server
def test_a_served_model_compiles_on_the_cpu_inside_its_triton_stub(tmp_path, model_root, tiny_dev):
    """Triton's stub embeds Python in the C locale, whose default text encoding is ASCII, and the inductor reads its
    own UTF-8 templates with the default: the model sets UTF-8 first, so a regional compile loads, warms up before
    READY and answers the eager call's step within compile's rounding."""
    parameters = {"compile": "regional", "warmup_shapes": "64x48x1x8"}
    server = start_server(tmp_path, model_root, ["dit_transformer"], parameters={"dit_transformer": parameters})
    try:
        step = random_step(DEV, 1, 64, 48, 8, 700.0, seed=1)
        with httpclient.InferenceServerClient(server.url) as client:
            answer = infer_step(client, "dit_transformer", step.wire())
    finally:
        server.stop()
    assert rel_l2(answer, call.reference_call(tiny_dev, step)) < 1e-5
