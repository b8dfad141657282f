"""``flux_generate``'s core: a whole generation in one request (prompt strings or their embeddings in; latents,
and PNG images where the server has a VAE, out).

diffusers' own ``FluxPipeline`` runs on the server around a stand-in transformer (``pipeline.stand_in``) whose
steps go to the served transformer model (``dit_transformer``) in process, through Triton's BLS, exactly as a
client's steps would; prompt strings go to the served text encoders first and the latents to the served VAE last
(``flux_text_encoder``, ``flux_vae``: ``serving.encode_decode``), one copy for every instance. So the latents equal
a client-driven generation's bit for bit, the served model's speed-ups, step caches and sessions apply, and steps of
concurrent generations merge in its batcher. Or each instance runs the transformer itself (the ``in_process``
setting, ``in_process()``): the same steps without the hop between models, the loop's latents on its GPU and
never read back on the host until the end (so the host queues steps while the GPU runs earlier ones, as a local
pipeline does), but no merging across generations. Each cache context of the generation ("cond", "uncond") is one
sequence: its first step carries the prompt (and the chosen step cache), later steps only the latents, the timestep
and the ids; every sequence ends when the generation does, or fails. The request itself is checked first
(``serving.generation_request``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxPipeline

from flux_triton.contract import PROMPT_INPUTS, DitSignature, InputError, OutputError, Step
from flux_triton.contract.generation import LATENTS
from flux_triton.contract.protocol import SequenceStep
from flux_triton.pipeline import loop
from flux_triton.pipeline.stand_in import StandInTransformer
from flux_triton.serving.generation_request import Generation, Parts
from flux_triton.serving.service import DitService
from flux_triton.serving.settings import GenerateSettings

Infer = Callable[[dict[str, torch.Tensor], SequenceStep], torch.Tensor]  # a step's tensors -> noise_pred


STEPS_AHEAD = 4  # hides a tuned MagCache's runs of skipped steps (more host work than GPU work) behind a full step


class StepsAhead:
    """The host's lead over the GPU, bounded: once a step is queued, the host waits for the one ``limit`` steps before
    it, so progress reports and cancelling follow the GPU within ``limit`` steps. (One step ahead is enough for
    uncached steps, whose GPU time dwarfs the host's; a step cache's skipped steps are the other way round, and with
    one step ahead their host work no longer hides behind the full steps: benchmarks/README.md, runs BA-BC.)"""

    def __init__(self, limit: int = STEPS_AHEAD, event: Callable[[], torch.cuda.Event] = torch.cuda.Event):
        self.limit, self.event = limit, event
        self.pending: collections.deque[torch.cuda.Event] = collections.deque()

    def queued(self) -> None:
        """Mark the end of the step just queued on the current stream; wait for the step ``limit`` before it."""
        end = self.event()
        end.record()
        self.pending.append(end)
        if len(self.pending) > self.limit:
            self.pending.popleft().synchronize()


def in_process(service: DitService, steps_ahead: int = STEPS_AHEAD) -> Infer:
    """Steps run by ``service`` in this process (the ``in_process`` setting): as the served transformer runs them, its
    sessions and step cache included, without the hop to another model; its error raised as the step's. The steps
    are the pipeline's own (``ServedSteps`` on ``service.device``), so their values are not checked one by one. On a
    GPU the host queues steps while the GPU runs earlier ones, at most ``steps_ahead`` of them (``StepsAhead``)."""
    ahead = StepsAhead(steps_ahead)

    def infer(tensors: dict[str, torch.Tensor], sequence: SequenceStep) -> torch.Tensor:
        (result,) = service.run([(tensors, sequence)], trusted=True)
        if isinstance(result, Exception):
            raise result
        if result.is_cuda:
            ahead.queued()
        return result

    return infer


class ServedSteps(StandInTransformer):
    """The stand-in transformer of one generation: each step to ``infer``, each cache context one sequence; the
    pipeline's tensors on ``device`` (where ``infer`` runs the transformer itself; else the host)."""

    def __init__(self, signature: DitSignature, model_name: str, infer: Infer, cache: str,
                 device: torch.device | str = "cpu"):  # fmt: skip
        super().__init__(signature, model_name, device)
        self.infer, self.cache = infer, cache
        self.key = secrets.token_urlsafe(16)  # this generation's own session key
        self.sequences: dict[str, int] = {}

    def send(self, slot: str, step: Step) -> torch.Tensor:
        wire = step.wire()
        if slot not in self.sequences:
            self.sequences[slot] = secrets.randbits(63) or 1
            sequence = SequenceStep(self.sequences[slot], start=True, key=self.key, cache=self.cache)
        else:  # the served model holds the prompt since the START
            sequence = SequenceStep(self.sequences[slot], key=self.key)
            wire = {name: tensor for name, tensor in wire.items() if name not in PROMPT_INPUTS}
        return self.infer(wire, sequence)

    def end_generations(self) -> None:
        """END every sequence with a step of zero image tokens (no forward); a sequence the served model already
        freed (its step failed) answers the same."""
        closing = Step.closing(self.signature).wire()
        closing = {name: closing[name] for name in ("hidden_states", "timestep", "img_ids")}
        for sequence_id in self.sequences.values():
            with contextlib.suppress(InputError, RuntimeError):  # freed already, or the model is gone: none held
                self.infer(closing, SequenceStep(sequence_id, end=True, key=self.key))
        self.sequences.clear()


def scheduler_for(settings: GenerateSettings, model_dir: Path, signature: DitSignature):
    """A fresh scheduler (one per generation: it counts its steps): the model folder's ``scheduler/`` where it has
    one and the setting is ``auto``, else FLUX.1-dev's (a model with guidance embeddings) or FLUX.1-schnell's."""
    config_path = model_dir.parent / "scheduler" / "scheduler_config.json"
    if settings.scheduler == "auto" and model_dir.name == "transformer" and config_path.is_file():
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(json.loads(config_path.read_text()))
    preset = settings.scheduler if settings.scheduler != "auto" else "dev" if signature.guidance_embeds else "schnell"
    return loop.make_scheduler(preset)


class _Pipeline(FluxPipeline):
    """``FluxPipeline`` on its stand-in transformer's device: diffusers takes a pipeline's device from its modules,
    and a stand-in is none."""

    @property
    def _execution_device(self) -> torch.device:
        return self.transformer.device


PROMPT_FIELDS = ("prompt", "negative_prompt", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                 "negative_pooled_prompt_embeds")  # fmt: skip
Progress = Callable[[int, int], None]  # (steps done, steps): after each step; raising stops the generation


def generate(
    generation: Generation,
    transformer: ServedSteps,
    scheduler,
    parts: Parts,
    max_sequence_length: int = 512,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, list[bytes] | None]:
    """``FluxPipeline``'s packed latents for ``generation`` and, where it asks for images, each image as a base64
    PNG (the VAE's decoding, as ``output_type="pil"``); its sequences end however it ends. Prompt strings are
    encoded first, as ``FluxPipeline`` would (the negative prompt only for true CFG)."""
    pipe = _Pipeline(scheduler, transformer=transformer, vae=None, text_encoder=None, tokenizer=None,
                     text_encoder_2=None, tokenizer_2=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    prompt = {name: getattr(generation, name) for name in PROMPT_FIELDS if getattr(generation, name) is not None}
    for text, prefix in (("prompt", ""), ("negative_prompt", "negative_")):
        strings = prompt.pop(text, None)
        if strings is not None and (not prefix or generation.true_cfg_scale > 1):
            encoded = parts.encode(strings, max_sequence_length)
            prompt[f"{prefix}prompt_embeds"], prompt[f"{prefix}pooled_prompt_embeds"] = encoded

    def step_end(_pipe, index: int, _timestep, tensors: dict) -> dict:
        progress(index + 1, generation.num_inference_steps)
        return tensors

    try:
        latents = pipe(
            **prompt,
            height=generation.height,
            width=generation.width,
            num_inference_steps=generation.num_inference_steps,
            guidance_scale=generation.guidance_scale,
            true_cfg_scale=generation.true_cfg_scale,
            generator=torch.Generator().manual_seed(generation.seed),
            output_type="latent",
            max_sequence_length=max_sequence_length,
            callback_on_step_end=step_end if progress is not None else None,
        ).images
    finally:
        transformer.end_generations()
    if not torch.isfinite(latents).all():  # the one value read back from a GPU loop (``in_process``)
        dtype = str(transformer.dtype).removeprefix("torch.")
        raise OutputError(f"{LATENTS}: NaN or Inf after {generation.num_inference_steps} steps; inputs this large "
                          f"overflow the transformer's {dtype} arithmetic")  # fmt: skip
    images = parts.decode(latents, generation.height, generation.width) if generation.images else None
    return latents, images
