"""Whether the served models really answer, and healing those that do not.

Triton's ready endpoints stay 200 when a Python-backend stub has died (killed, out of memory): the model
then fails every request. A probe is a real inference of the smallest valid request on every model of
the repository, internal ones included, checked for a finite answer of the right shape; each model is probed on
its own connection with its own timeout, so a hung model fails its own probe only. The supervisor probes on an
interval, reloads each model whose probe failed (a timed-out model only if it ran nothing meanwhile: a busy model
is not hung) and restarts a server or guard that exited, logging why.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from flux_triton.contract import OUTPUT_NAME, TORCH_TO_WIRE, DitSignature, Limits, Step, from_numpy, to_numpy
from flux_triton.contract.protocol import GUIDANCE_REQUIRED, admin_headers, grpc_endpoint
from flux_triton.contract.served import signature_from_config
from flux_triton.contract.specs import engine_tensor_name
from flux_triton.deploy import pbtxt
from flux_triton.deploy.pbtxt import DIT_TRANSFORMER, ENGINE, ENSEMBLE, GENERATE, GENERATE_STREAM, PREPROCESS
from flux_triton.deploy.placement import TRANSFORMER_DIMS
from flux_triton.deploy.server import TritonServer
from flux_triton.deploy.sockets import http_call
from flux_triton.serving.settings import GenerateSettings, PreprocessSettings

if TYPE_CHECKING:
    from flux_triton.deploy.guard.process import GuardProcess

# this project's models, probed in this order (the decoupled flux_generate_stream over gRPC's stream)
MODELS = (DIT_TRANSFORMER, ENSEMBLE, PREPROCESS, ENGINE, pbtxt.TEXT_ENCODER, pbtxt.VAE, GENERATE, GENERATE_STREAM)
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Probe:
    model: str
    tensors: dict[str, torch.Tensor | list[bytes]]  # a list of bytes: a BYTES input
    output: str
    shape: tuple[int, ...]

    def with_guidance(self) -> Probe:
        return replace(self, tensors={**self.tensors, "guidance": torch.full([1, 1], 3.5)})


def _ensemble_settings(client: httpclient.InferenceServerClient, headers: dict | None) -> tuple[DitSignature, Limits]:
    """The engine's signature and profile limits, as generated into dit_preprocess's parameters."""
    settings = PreprocessSettings.from_config(client.get_model_config(PREPROCESS, headers=headers))
    return settings.signature, settings.limits


def make_probe(client: httpclient.InferenceServerClient, model: str, headers: dict[str, str] | None = None) -> Probe:
    """The probe of one of this project's models (``headers``: the admin key, which the internal models need
    behind the guard); ``dit_transformer``'s without guidance (``run_probe`` adds it if the model asks)."""
    if model in (GENERATE, GENERATE_STREAM):
        return _generate_probe(client, model, headers)
    if model in (pbtxt.TEXT_ENCODER, pbtxt.VAE):
        return _components_probe(client, model, headers)
    if model == DIT_TRANSFORMER:
        config = client.get_model_config(model, headers=headers)
        signature, limits = signature_from_config(config, guidance_embeds=False), Limits()
    else:
        signature, limits = _ensemble_settings(client, headers)
    step = Step.probe(signature, limits.min_image_tokens, limits.min_text_tokens)
    tensors = step.engine_tensors(signature) if model == ENGINE else step.wire()
    output = engine_tensor_name("hidden_states") if model == PREPROCESS else OUTPUT_NAME
    return Probe(model, tensors, output, tuple(step.hidden_states.shape))


def _steps_signature(client: httpclient.InferenceServerClient, model: str, headers: dict[str, str] | None):
    """The signature of the transformer whose steps the generation model ``model`` runs."""
    config = client.get_model_config(model, headers=headers)
    settings = GenerateSettings.from_config(config, environment=False)
    if not settings.in_process:
        target = client.get_model_config(settings.transformer_model, headers=headers)
        return signature_from_config(target, guidance_embeds=False)
    dims = {tensor["name"]: int(tensor["dims"][-1]) for tensor in (*config["input"], *config["output"])}
    found = {field: dims[name] for name, field in TRANSFORMER_DIMS.items()}
    if min(found.values()) < 1:  # its transformer runs in process: its config carries the dims
        raise ValueError(f"{model} runs its transformer in process but its config lacks the transformer's dims; "
                         f"write them with python -m flux_triton place {model} --in-process")  # fmt: skip
    return DitSignature(**found, guidance_embeds=False, dtype="FP32")


def _generate_probe(client: httpclient.InferenceServerClient, model: str, headers: dict[str, str] | None) -> Probe:
    """One step of a 16x16 generation from a one-token zero prompt, sized by the transformer ``model`` uses."""
    signature = _steps_signature(client, model, headers)
    tensors = {
        "prompt_embeds": torch.zeros(1, 1, signature.text_dim),
        "pooled_prompt_embeds": torch.zeros(1, signature.pooled_dim),
        "height": torch.tensor([16], dtype=torch.int32),
        "width": torch.tensor([16], dtype=torch.int32),
        "num_inference_steps": torch.tensor([1], dtype=torch.int32),
    }
    return Probe(model, tensors, "latents", (1, 1, signature.in_channels))


def _components_probe(client: httpclient.InferenceServerClient, model: str, headers: dict[str, str] | None) -> Probe:
    """The text encoders: one one-letter prompt at one text token; the VAE: the latents of a 16x16 image. Sized by
    the transformer flux_generate uses (or dit_transformer, where flux_generate is not loaded)."""
    try:
        signature = _steps_signature(client, GENERATE, headers)
    except InferenceServerException:  # flux_generate is not loaded
        signature = signature_from_config(
            client.get_model_config(DIT_TRANSFORMER, headers=headers), guidance_embeds=False
        )
    if model == pbtxt.TEXT_ENCODER:
        tensors = {"prompt": [b"a"], "max_sequence_length": torch.tensor([1], dtype=torch.int32)}
        return Probe(model, tensors, "prompt_embeds", (1, 1, signature.text_dim))
    size = torch.tensor([16], dtype=torch.int32)
    return Probe(model, {"latents": torch.zeros(1, 1, signature.in_channels), "height": size, "width": size},
                 "images", (1,))  # fmt: skip


def _input_arrays(probe: Probe) -> list[tuple[str, numpy.ndarray, str]]:
    """Each input as (name, host array, Triton dtype): a list of bytes as a BYTES tensor."""
    return [
        (name, numpy.array(value, dtype=numpy.object_), "BYTES")
        if isinstance(value, list)
        else (name, to_numpy(value), TORCH_TO_WIRE[value.dtype])
        for name, value in probe.tensors.items()
    ]


def _infer(client: httpclient.InferenceServerClient, probe: Probe, headers: dict[str, str] | None) -> numpy.ndarray:
    inputs = []
    for name, array, dtype in _input_arrays(probe):
        inputs.append(httpclient.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array, binary_data=True)
    output = httpclient.InferRequestedOutput(probe.output, binary_data=True)
    # a copy of the headers: tritonclient adds its own to the dict it is given
    return client.infer(probe.model, inputs, outputs=[output], headers=dict(headers or {})).as_numpy(probe.output)


def _stream_infer(grpc_url: str, probe: Probe, headers: dict[str, str] | None, timeout_s: float) -> numpy.ndarray:
    """A decoupled model's answer to ``probe`` over gRPC's stream (its responses before the last carry only
    progress, which the probe does not ask for)."""
    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(lambda result, error: answers.put((result, error)), headers=headers)
        inputs = []
        for name, array, dtype in _input_arrays(probe):
            inputs.append(grpcclient.InferInput(name, list(array.shape), dtype))
            inputs[-1].set_data_from_numpy(array)
        client.async_stream_infer(probe.model, inputs, outputs=[grpcclient.InferRequestedOutput(probe.output)])
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"timed out after {timeout_s:g} s") from None
            if error is not None:
                raise error
            if (answer := result.as_numpy(probe.output)) is not None:
                return answer
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def run_probe(
    client: httpclient.InferenceServerClient,
    probe: Probe,
    headers: dict[str, str] | None = None,
    grpc_url: str = "",
    timeout_s: float = PROBE_TIMEOUT_S,
) -> str | None:
    """``None`` if the model answered the probe with a finite tensor (or non-empty strings) of the right shape, else
    why not (the decoupled model over ``grpc_url``)."""
    try:
        if probe.model == GENERATE_STREAM:
            answer = _stream_infer(grpc_url, probe, headers, timeout_s)
        else:
            answer = _infer(client, probe, headers)
    except InferenceServerException as exc:
        if GUIDANCE_REQUIRED not in str(exc.message()) or "guidance" in probe.tensors:
            raise
        answer = _infer(client, probe.with_guidance(), headers)  # a guidance model
    if answer.dtype == numpy.object_:
        finite = all(len(item) > 0 for item in answer.reshape(-1))
    else:
        finite = bool(torch.isfinite(from_numpy(answer).float()).all())
    if tuple(answer.shape) != probe.shape or not finite:
        return f"answered {list(answer.shape)} (finite: {finite})"
    return None


@dataclass(frozen=True)
class Outcome:
    """One model's probe: ``None`` or why it failed, and whether it failed by timing out."""

    why: str | None
    timed_out: bool = False


def probe_model(url: str, model: str, headers: dict[str, str] | None, timeout_s: float, grpc_url: str = "") -> Outcome:
    """Probe one model on its own connection, within ``timeout_s`` (``grpc_url``: the server's gRPC endpoint;
    "": ``url``'s host, port 8001)."""
    grpc_url = grpc_endpoint(url, grpc_url)
    try:
        with httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=timeout_s) as client:
            return Outcome(run_probe(client, make_probe(client, model, headers), headers, grpc_url, timeout_s))
    except Exception as exc:  # the server's error, a broken connection, or no answer in time
        timed_out = "timed out" in str(exc).lower() or isinstance(exc, TimeoutError)
        return Outcome(f"{type(exc).__name__}: {exc}", timed_out)


def served_models(url: str, headers: dict[str, str] | None = None) -> list[str]:
    """This project's models that the server at ``url`` has loaded (the index needs the admin key)."""
    with httpclient.InferenceServerClient(url, connection_timeout=10, network_timeout=30) as client:
        listed = {entry["name"] for entry in client.get_model_repository_index(headers=headers)}
    return [model for model in MODELS if model in listed]


def check(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = PROBE_TIMEOUT_S, grpc_url: str = ""
) -> dict[str, str | None]:
    """``{model: None or why its probe failed}`` for every model of this project on the server at ``url``."""
    models = served_models(url, headers)
    return {model: probe_model(url, model, headers, timeout_s, grpc_url).why for model in models}


def executions(url: str, headers: dict[str, str] | None) -> dict[str, int]:
    """How many executions each model has run (Triton's statistics; they need the admin key)."""
    status, body = http_call(url, "GET", "/v2/models/stats", headers=headers or {}, timeout_s=10)
    if status != 200:
        return {}
    return {entry["name"]: int(entry.get("execution_count", 0)) for entry in json.loads(body)["model_stats"]}


@dataclass
class Supervisor:
    """Keeps ``server`` (and the ``guard`` in front of it) serving: probes every model every ``interval_s``
    (0: no probes, processes checked every second) through the guard if there is one, reloads failed models,
    restarts an exited process."""

    server: TritonServer
    interval_s: float = 10.0
    log: Callable[[str], None] = print
    guard: GuardProcess | None = None
    admin_key: str | None = None
    probe_timeout_s: float = PROBE_TIMEOUT_S

    @property
    def url(self) -> str:
        return self.guard.url if self.guard is not None else self.server.url

    @property
    def grpc_url(self) -> str:
        return self.guard.grpc_url if self.guard is not None else self.server.endpoints[1]

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
        if removed := self.server.remove_orphan_regions():
            self.log(f"removed {len(removed)} Python-backend regions of dead stubs from /dev/shm")
        if self.interval_s <= 0:
            return {}
        return self._probe_and_reload()

    def _probe_and_reload(self) -> dict[str, str]:
        headers = admin_headers(self.admin_key)
        before = executions(self.url, headers)
        outcomes = {model: probe_model(self.url, model, headers, self.probe_timeout_s, self.grpc_url)
                    for model in served_models(self.url, headers)}  # fmt: skip
        after = executions(self.url, headers) if any(o.timed_out for o in outcomes.values()) else before
        failed = {}
        for model, outcome in outcomes.items():
            if outcome.why is None:
                continue
            if outcome.timed_out and after.get(model, 0) > before.get(model, 0):
                self.log(f"{model} did not answer its probe within {self.probe_timeout_s:g} s but ran other "
                         f"requests meanwhile: busy, not reloaded")  # fmt: skip
                continue
            failed[model] = outcome.why
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
