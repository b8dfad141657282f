"""Triton Python-backend model ``dit_engine``: runs the compiled DiT engine its sidecar names.

The runner comes from the engine kind's table (``flux_triton.engines.kinds``) by the sidecar's ``kind``,
so this file does not change with the engine. Each request is checked against the engine side of the
contract and the engine's profile; requests that Triton's dynamic batcher lists together run as one
batch when their shapes and ids agree; every answer is checked finite; with a step cache, each cached
sequence's steps run in its own cache context, and with ``hold_prompts`` each sequence's prompt is held here
(``flux_triton.serving.engine_service``).
"""

from __future__ import annotations

import json
from pathlib import Path

from flux_triton.engines.kinds import check_step_cache, load_engine
from flux_triton.locations import Locations
from flux_triton.serving import triton
from flux_triton.serving.engine_service import EngineService
from flux_triton.serving.profiling import ExecuteProfiler
from flux_triton.serving.settings import EngineSettings, check_cache_instances, check_prompt_instances

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = EngineSettings.from_config(config)
        check_cache_instances(config, settings.cache)
        check_prompt_instances(config, settings.hold_prompts)
        self.input_names = [entry["name"] for entry in config["input"]]
        locations = Locations.of_repository(REPOSITORY)
        sidecar_path = locations.engine(settings.engine)
        self.device = device = triton.instance_device(args)
        sidecar, engine = load_engine(sidecar_path, device, locations.model_root, settings.whole_step_graphs)
        check_step_cache(sidecar.kind, settings.cache)
        self.service = EngineService(settings, sidecar, engine)
        self.profiler = ExecuteProfiler("dit_engine", device)
        cache = f", cache {settings.cache}" if self.service.cache is not None else ""
        triton.log_info(f"dit_engine: {sidecar.kind} {sidecar.precision} {sidecar_path} on {device}{cache}")

    def execute(self, requests):
        with self.profiler.execute(len(requests)):
            names, device = self.input_names, self.device
            batch = [(triton.request_tensors(r, names, device), triton.sequence_step(r)) for r in requests]
            kind = self.service.sidecar.kind
            return [triton.result_response(f"dit_engine ({kind})", result) for result in self.service.run(batch)]
