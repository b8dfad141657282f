"""A served model profiled in place (``serving.profiling``): with ``FLUX_TRITON_PROFILE_DIR`` set, the step models
log each execute and trace the first ones with torch.profiler. One real server with ``dit_transformer`` and
``flux_dit`` (over the tiny ONNX Runtime engine)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import DEV, launch

from flux_triton.client.wire import infer_step
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, PREPROCESS
from flux_triton.deploy.repository import write_repository
from flux_triton.locations import MODEL_ROOT_ENV, Locations
from flux_triton.pipeline import call
from flux_triton.pipeline.inputs import random_step
from flux_triton.serving.profiling import (
    LOG_NAME,
    PROFILE_DIR_ENV,
    PROFILE_TRACES_ENV,
    ExecuteProfiler,
    traced_executes,
)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, model_root, onnx_engines):
    """The server, and the folder its models profile into (executes 1 and 2 traced)."""
    folder = tmp_path_factory.mktemp("profiled")
    repository = folder / "model_repository"
    write_repository(onnx_engines["tiny-flux-dev"], repository)
    shutil.copytree(Locations.here().repository / DIT_TRANSFORMER, repository / DIT_TRANSFORMER)
    env = {MODEL_ROOT_ENV: str(model_root), PROFILE_DIR_ENV: str(folder / "profile"), PROFILE_TRACES_ENV: "1-2"}
    server = launch(repository, folder, env).start()
    yield server, folder / "profile"
    server.stop()


def test_each_execute_is_logged_and_the_first_ones_traced(profiled, http_client, tiny_dev):
    server, profile = profiled
    client = http_client(server)
    steps = [random_step(DEV, seed=seed) for seed in range(3)]
    for step in steps:  # the answers stay right while profiled
        assert torch.equal(infer_step(client, DIT_TRANSFORMER, step.wire()), call.reference_call(tiny_dev, step))
    for step in steps[:2]:
        infer_step(client, ENSEMBLE, step.wire())

    lines = [json.loads(line) for line in (profile / LOG_NAME).read_text().splitlines()]
    by_model = {model: [line for line in lines if line["model"] == model] for model in (DIT_TRANSFORMER, PREPROCESS,
                                                                                          ENGINE)}  # fmt: skip
    assert [line["execute"] for line in by_model[DIT_TRANSFORMER]] == [0, 1, 2]
    assert [line["execute"] for line in by_model[PREPROCESS]] == [0, 1]
    engine = [line["execute"] for line in by_model[ENGINE]]  # its config's model_warmup requests come first
    assert engine == list(range(len(engine))) and len(engine) >= 2
    assert all(line["requests"] == 1 and line["wall_ms"] > 0 for line in lines)
    assert ["trace" in line for line in by_model[DIT_TRANSFORMER]] == [False, True, True]  # the executes named
    for line in by_model[DIT_TRANSFORMER][1:]:
        events = json.loads((profile / line["trace"]).read_text())["traceEvents"]
        names = {event.get("name", "") for event in events}
        assert any(name.startswith("aten::") for name in names), sorted(names)[:20]  # the forward's ops are in it


def test_the_traced_executes_are_named_by_count_or_range():
    assert traced_executes("8") == range(8)
    assert traced_executes("6-9") == range(6, 10)
    with pytest.raises(ValueError, match="FLUX_TRITON_PROFILE_TRACES: expected N or A-B"):
        traced_executes("six")


def test_a_folder_that_cannot_be_written_is_a_warning_and_the_model_serves_on(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(PROFILE_DIR_ENV, str(blocked / "profile"))  # a folder under a file cannot be made
    with pytest.warns(UserWarning, match=f"{PROFILE_DIR_ENV} .*: cannot be written .*dit_transformer is not profiled"):
        profiler = ExecuteProfiler(DIT_TRANSFORMER, torch.device("cpu"))
    with profiler.execute(1):  # an execute runs as without profiling
        answer = 42
    assert answer == 42 and profiler.folder is None and list(tmp_path.iterdir()) == [blocked]
