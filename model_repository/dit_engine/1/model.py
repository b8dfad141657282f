"""Triton Python-backend model ``dit_engine``: runs the compiled DiT engine its sidecar names.

The runner comes from the engine kind's table (``flux_triton.engines.kinds``) by the sidecar's ``kind``,
so this file does not change with the engine. Each request is checked against the engine side of the
contract and the engine's profile; requests that Triton's dynamic batcher lists together run as one
batch when their shapes and ids agree; every answer is checked finite.
"""

from __future__ import annotations

import json
from pathlib import Path

from flux_triton.engines.kinds import load_engine
from flux_triton.locations import Locations
from flux_triton.serving import triton
from flux_triton.serving.merging import run_engine_requests
from flux_triton.serving.settings import EngineSettings

REPOSITORY = Path(__file__).resolve().parents[2]  # this model's repository


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        settings = EngineSettings.from_config(config)
        self.input_names = [entry["name"] for entry in config["input"]]
        locations = Locations.of_repository(REPOSITORY)
        sidecar_path = locations.engine(settings.engine)
        device = triton.instance_device(args)
        self.sidecar, self.engine = load_engine(sidecar_path, device, locations.model_root, settings.cuda_graphs)
        triton.log_info(f"dit_engine: {self.sidecar.kind} {self.sidecar.precision} {sidecar_path} on {device}")

    def execute(self, requests):
        batch = [triton.request_tensors(request, self.input_names) for request in requests]
        signature, limits = self.sidecar.dit_signature, self.sidecar.limits
        results = run_engine_requests(self.engine, batch, signature, limits)
        return [triton.result_response(f"dit_engine ({self.sidecar.kind})", result) for result in results]
