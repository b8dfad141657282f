"""Whether the served models really answer, and healing those that do not.

Triton's ready endpoints stay 200 when a Python-backend stub has died (killed, out of memory): the model
then fails every request. A probe is a real inference of the smallest valid request on every model of
the repository, internal ones included, checked for a finite answer of the right shape. The supervisor
probes on an interval, reloads each model whose probe failed (through the admin-restricted repository
API) and restarts a server that exited, logging why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import tritonclient.http as httpclient

from flux_triton.client.connection import RemoteSettings, admin_headers, signature_from_config, takes_guidance
from flux_triton.client.wire import from_numpy, infer_inputs
from flux_triton.contract import OUTPUT_NAME, DitSignature, Limits, Step
from flux_triton.contract.tensors import engine_tensor_name
from flux_triton.deploy.guard import GuardProcess
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, PREPROCESS
from flux_triton.deploy.server import TritonServer, remove_orphan_regions
from flux_triton.pipeline.inputs import text_ids
from flux_triton.serving.preprocess import preprocess_settings


@dataclass(frozen=True)
class Probe:
    model: str
    tensors: dict[str, torch.Tensor]
    output: str
    shape: tuple[int, ...]


def _step(signature: DitSignature, image_tokens: int, text_tokens: int) -> Step:
    dtype = signature.torch_dtype
    return Step(
        hidden_states=torch.zeros(1, image_tokens, signature.in_channels, dtype=dtype),
        timestep=torch.full([1], 500.0),
        guidance=torch.full([1], 3.5) if signature.guidance_embeds else None,
        pooled_projections=torch.zeros(1, signature.pooled_dim, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, text_tokens, signature.text_dim, dtype=dtype),
        txt_ids=text_ids(text_tokens),
        img_ids=torch.zeros(image_tokens, 3),
    )


def _ensemble_settings(client: httpclient.InferenceServerClient) -> tuple[DitSignature, Limits]:
    """The engine's signature and profile limits, as generated into dit_preprocess's parameters."""
    parameters = client.get_model_config(PREPROCESS).get("parameters", {})
    return preprocess_settings({key: value["string_value"] for key, value in parameters.items()})


def probes(client: httpclient.InferenceServerClient, headers: dict[str, str] | None = None) -> list[Probe]:
    """One probe per model of this project that the server has loaded (``headers``: the admin key, where
    the repository API is restricted)."""
    models = {entry["name"] for entry in client.get_model_repository_index(headers=headers)}
    found = []
    for model in (DIT_TRANSFORMER, ENSEMBLE, PREPROCESS, ENGINE):
        if model not in models:
            continue
        if model == DIT_TRANSFORMER:
            config = client.get_model_config(model)
            guidance = takes_guidance(client, RemoteSettings(model_name=model), config)
            signature, limits = signature_from_config(config, guidance), Limits()
        else:
            signature, limits = _ensemble_settings(client)
        step = _step(signature, limits.min_image_tokens, limits.min_text_tokens)
        tensors = step.engine_tensors(signature) if model == ENGINE else step.wire()
        output = engine_tensor_name("hidden_states") if model == PREPROCESS else OUTPUT_NAME
        found.append(Probe(model, tensors, output, tuple(step.hidden_states.shape)))
    return found


def run_probe(client: httpclient.InferenceServerClient, probe: Probe) -> str | None:
    """``None`` if the model answered the probe with a finite tensor of the right shape, else why not."""
    try:
        result = client.infer(
            probe.model,
            infer_inputs(probe.tensors),
            outputs=[httpclient.InferRequestedOutput(probe.output, binary_data=True)],
        )
        answer = from_numpy(result.as_numpy(probe.output))
    except Exception as exc:  # the server's error, or a connection that broke
        return f"{type(exc).__name__}: {exc}"
    finite = bool(torch.isfinite(answer.float()).all())
    if tuple(answer.shape) != probe.shape or not finite:
        return f"answered {list(answer.shape)} (finite: {finite})"
    return None


def check(url: str, headers: dict[str, str] | None = None, timeout_s: float = 120.0) -> dict[str, str | None]:
    """``{model: None or why its probe failed}`` for every model of this project on the server at ``url``."""
    with httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=timeout_s) as client:
        return {probe.model: run_probe(client, probe) for probe in probes(client, headers)}


@dataclass
class Supervisor:
    """Keeps ``server`` (and the ``guard`` in front of it) serving: probes every model every ``interval_s``
    (0: no probes, processes checked every second), reloads failed models, restarts an exited process."""

    server: TritonServer
    interval_s: float = 10.0
    log: Callable[[str], None] = print
    guard: GuardProcess | None = None

    def heal_once(self) -> dict[str, str]:
        """One round: what was wrong (``{model: reason}``), after fixing it."""
        if self.server.process is None or self.server.process.poll() is not None:
            code = None if self.server.process is None else self.server.process.returncode
            self.log(f"tritonserver exited (code {code}); restarting it")
            self.server.start()
            return {"tritonserver": f"exited with code {code}"}
        if self.guard is not None and not self.guard.running():
            code = self.guard.process.returncode
            self.log(f"the guard exited (code {code}); restarting it")
            self.guard.start(self.server.endpoints)
            return {"guard": f"exited with code {code}"}
        if removed := remove_orphan_regions():
            self.log(f"removed {len(removed)} Python-backend regions of dead stubs from /dev/shm")
        if self.interval_s <= 0:
            return {}
        failed = {
            model: why for model, why in check(self.server.url, admin_headers(self.server.admin_key)).items() if why
        }
        # An ensemble fails with its composing models and recovers with them: reload those first.
        for model in [model for model in failed if model != ENSEMBLE] or list(failed):
            started = time.monotonic()
            self.log(f"{model} failed its probe ({failed[model]}); reloading it")
            self.server.reload(model)
            self.log(f"{model} reloaded in {time.monotonic() - started:.1f} s")
        return failed

    def run(self) -> None:
        while True:
            time.sleep(self.interval_s if self.interval_s > 0 else 1.0)
            try:
                self.heal_once()
            except Exception as exc:  # keep supervising: the next round tries again
                self.log(f"supervisor round failed: {type(exc).__name__}: {exc}")
