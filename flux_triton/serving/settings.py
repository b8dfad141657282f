"""One schema per Triton model of this project: its config parameters as a frozen dataclass.

Each schema has one reader (``from_config``: a model config's string parameters, its ``max_batch_size`` and the
documented environment overrides), one writer (``parameters``: what repository generation and placement write)
and one ``validate`` that refuses a bad value or a bad combination with a message naming the setting. A field
whose default is itself a dataclass (``Speedups``) stands for its fields, each a parameter of its own.
``tests/test_settings.py`` keeps the shipped configs and these schemas equal.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

from flux_triton.contract import DitSignature, Limits
from flux_triton.contract.protocol import SessionSettings
from flux_triton.model.parallel import NO_PARALLEL, ParallelSettings
from flux_triton.model.speedups import Speedups, check_composition, flag

DTYPES = ("auto", "bfloat16", "float32", "float16")
MODEL_DIR_ENV = "FLUX_DIT_MODEL_DIR"  # overrides dit_transformer's model_dir (a container's weights)
# Triton's own parameters of a model's config (the Python backend's), which no schema of ours holds.
TRITON_PARAMETERS = {"FORCE_CPU_ONLY_INPUT_TENSORS"}
COMPILE_CACHE_ENV = "FLUX_COMPILE_CACHE_DIR"  # overrides dit_transformer's compile_cache_dir (a persistent volume)
# What a model warms up before READY when it compiles, captures CUDA graphs or runs on a GPU: (height, width,
# batch, text tokens), FluxPipeline's default image and prompt length.
DEFAULT_WARMUP = ((1024, 1024, 1, 512),)


def parse_shapes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """``warmup_shapes``: ``HxWxB[xT],...`` (T: text tokens, default 512), ``auto`` or ``none`` (no shapes)."""
    if text in ("auto", "none", ""):
        return ()
    shapes = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) not in (3, 4) or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(f"warmup_shapes parameter: expected HEIGHTxWIDTHxBATCH[xTEXT_TOKENS],... or auto or none, "
                             f"got {item.strip()!r}")  # fmt: skip
        height, width, batch, *text_tokens = (int(part) for part in parts)
        shapes.append((height, width, batch, text_tokens[0] if text_tokens else DEFAULT_WARMUP[0][3]))
    return tuple(shapes)


def _parse(name: str, raw: str, kind: type):
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name} parameter: expected true or false, got {raw!r}")
        return flag(raw)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} parameter: expected {kind.__name__}, got {raw!r}") from None


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class ModelSettings:
    """The reader, writer and checks every schema shares (a mixin of frozen dataclasses)."""

    ENVIRONMENT: ClassVar[Mapping[str, str]] = {}  # field -> the environment variable that overrides it
    BATCH: ClassVar[str | None] = None  # the field that is the config's max_batch_size, not a parameter

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value or combination, naming the setting (``ValueError``)."""

    @classmethod
    def from_config(cls, config: Mapping, environment: bool = True):
        """The settings of a Triton model config (``config.pbtxt`` as JSON, or Triton's served config)."""
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        if environment:
            parameters |= {name: os.environ[variable] for name, variable in cls.ENVIRONMENT.items()
                           if os.environ.get(variable)}  # fmt: skip
        if cls.BATCH and config.get("max_batch_size"):
            parameters[cls.BATCH] = str(config["max_batch_size"])
        return cls.from_parameters(parameters)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]):
        values = {}
        for setting in fields(cls):
            default = _default(setting)
            if dataclasses.is_dataclass(default):
                group = {f.name: parameters[f.name] for f in fields(default) if parameters.get(f.name, "") != ""}
                values[setting.name] = type(default)(
                    **{name: _parse(name, raw, type(getattr(default, name))) for name, raw in group.items()}
                )
            elif parameters.get(setting.name, "") != "":
                values[setting.name] = _parse(setting.name, parameters[setting.name], type(default))
        return cls(**values)

    def parameters(self) -> dict[str, str]:
        """The config parameters that ``from_config`` reads back as these settings (the batch size aside)."""
        found = {}
        for setting in fields(self):
            value = getattr(self, setting.name)
            if dataclasses.is_dataclass(value):
                found |= {f.name: _text(getattr(value, f.name)) for f in fields(value)}
            elif setting.name != self.BATCH:
                found[setting.name] = _text(value)
        return found


def _default(setting: dataclasses.Field):
    return setting.default_factory() if setting.default is dataclasses.MISSING else setting.default


@dataclass(frozen=True)
class TransformerSettings(ModelSettings):
    """``dit_transformer``'s settings (``model_repository/dit_transformer/config.pbtxt`` lists them all)."""

    ENVIRONMENT: ClassVar[Mapping[str, str]] = {"model_dir": MODEL_DIR_ENV, "compile_cache_dir": COMPILE_CACHE_ENV}
    BATCH: ClassVar[str | None] = "max_batch"

    model_dir: str = "tiny-flux-dev"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    max_batch: int = 16
    max_image_tokens: int = 16384
    max_text_tokens: int = 512
    max_sessions: int = SessionSettings.max_sessions  # live generation sessions (serving.sessions)
    max_sessions_per_client: int = SessionSettings.max_per_client
    session_idle_s: float = SessionSettings.idle_timeout_s
    cache: str = "none"  # a step cache sessions may choose (pipeline.caching): none, a kind, or its JSON
    speedups: Speedups = field(default_factory=Speedups)  # its fields are parameters of their own
    parallel: str = NO_PARALLEL  # context parallelism across GPUs (model.parallel): none, ulysses, ring or usp
    parallel_degree: int = 1  # its ranks, one per GPU (GPUs 0..N-1 of the visible ones)
    parallel_timeout_s: float = ParallelSettings.timeout_s
    # steps run before READY (parse_shapes): auto warms DEFAULT_WARMUP where the model compiles, captures CUDA graphs
    # or runs on a GPU, and nothing on a plain CPU model
    warmup_shapes: str = "auto"
    compile_cache_dir: str = ""  # torch.compile's caches, kept across restarts (model.compile_cache); "": torch's

    def validate(self) -> None:
        parse_shapes(self.warmup_shapes)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype parameter: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch", "max_image_tokens", "max_text_tokens", "max_sessions_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} parameter: expected 1 or more, got {getattr(self, name)}")
        # the parallel settings refuse an unknown kind or a bad degree
        check_composition(self.speedups, _check_cache(self.cache) is not None, self.parallel_settings)

    @property
    def parallel_settings(self) -> ParallelSettings:
        return ParallelSettings(self.parallel, self.parallel_degree, self.parallel_timeout_s)

    def warmup(self, device_type: str) -> tuple[tuple[int, int, int, int], ...]:
        """The shapes to warm up before READY on a ``device_type`` ("cuda", "cpu") model."""
        if self.warmup_shapes != "auto":
            return parse_shapes(self.warmup_shapes)
        compiled = self.speedups.compile != "none" or self.speedups.cuda_graphs
        return DEFAULT_WARMUP if compiled or device_type == "cuda" else ()

    @property
    def session_settings(self) -> SessionSettings:
        return SessionSettings(self.max_sessions, self.max_sessions_per_client, self.session_idle_s)


@dataclass(frozen=True)
class PreprocessSettings(ModelSettings):
    """``dit_preprocess``'s settings: the engine's signature and profile limits (from its sidecar) and the
    generation sessions it keeps."""

    BATCH: ClassVar[str | None] = "max_batch"

    in_channels: int = 64
    pooled_dim: int = 768
    text_dim: int = 4096
    guidance_embeds: bool = True
    dtype: str = "BF16"  # the engine's float dtype, as Triton names it
    max_batch: int = 1
    max_image_tokens: int = 16384
    max_text_tokens: int = 512
    min_image_tokens: int = 1
    min_text_tokens: int = 1
    max_sessions: int = SessionSettings.max_sessions
    max_sessions_per_client: int = SessionSettings.max_per_client
    session_idle_s: float = SessionSettings.idle_timeout_s
    cache: str = "none"  # the engine's step cache, which a sequence may choose at its START
    # dit_engine holds each sequence's prompt (its hold_prompts): the prompt then goes to it only when it is new
    engine_holds_prompts: bool = False

    def validate(self) -> None:
        _check_cache(self.cache)
        if not 1 <= self.min_image_tokens <= self.max_image_tokens:
            raise ValueError(f"min_image_tokens {self.min_image_tokens} and max_image_tokens "
                             f"{self.max_image_tokens}: expected 1 <= min <= max")  # fmt: skip
        if not 1 <= self.min_text_tokens <= self.max_text_tokens:
            raise ValueError(f"min_text_tokens {self.min_text_tokens} and max_text_tokens "
                             f"{self.max_text_tokens}: expected 1 <= min <= max")  # fmt: skip

    @property
    def session_settings(self) -> SessionSettings:
        return SessionSettings(self.max_sessions, self.max_sessions_per_client, self.session_idle_s)

    @property
    def signature(self) -> DitSignature:
        return DitSignature(self.in_channels, self.pooled_dim, self.text_dim, self.guidance_embeds, self.dtype)

    @property
    def limits(self) -> Limits:
        return Limits(self.max_batch, self.max_image_tokens, self.max_text_tokens, self.min_image_tokens,
                      self.min_text_tokens)  # fmt: skip

    @classmethod
    def of_engine(cls, signature: DitSignature, limits: Limits, cache: str = "none",
                  engine_holds_prompts: bool = False) -> PreprocessSettings:  # fmt: skip
        """What ``make repo`` writes for an engine of ``signature`` and profile ``limits`` serving ``cache``
        (default sessions)."""
        return cls(signature.in_channels, signature.pooled_dim, signature.text_dim, signature.guidance_embeds,
                   signature.dtype, **dataclasses.asdict(limits), cache=cache,
                   engine_holds_prompts=engine_holds_prompts)  # fmt: skip


@dataclass(frozen=True)
class EngineSettings(ModelSettings):
    """``dit_engine``'s settings (the Python-backend runner's; a ``tensorrt_plan`` engine has none)."""

    engine: str = ""  # the engine's sidecar, relative to the engines folder
    cuda_graphs: bool = False  # each step shape captured in CUDA graphs (the AOTI kinds; per block with a cache)
    cache: str = "none"  # a step cache generations may choose (the AOTI kinds: diffusers' hooks around the engine)
    # each sequence's prompt held here, so that dit_preprocess sends it only when it is new (one instance only: a
    # sequence's steps must all reach the instance that holds its prompt)
    hold_prompts: bool = False
    # the cached sequences' and held prompts' bounds, dit_preprocess's own: a sequence it keeps keeps its state here
    max_sessions: int = SessionSettings.max_sessions
    max_sessions_per_client: int = SessionSettings.max_per_client
    session_idle_s: float = SessionSettings.idle_timeout_s

    @property
    def session_settings(self) -> SessionSettings:
        return SessionSettings(self.max_sessions, self.max_sessions_per_client, self.session_idle_s)

    @property
    def whole_step_graphs(self) -> bool:
        """Whether each step is one CUDA graph (with a cache, the service captures the hooked blocks instead)."""
        return self.cuda_graphs and _check_cache(self.cache) is None

    def validate(self) -> None:
        if not self.engine:
            raise ValueError("engine parameter: expected the engine's sidecar (make repo writes it)")
        _check_cache(self.cache)


@dataclass(frozen=True)
class EnsembleSettings(ModelSettings):
    """``flux_dit``'s parameters: what a client needs to know of the ensemble (``dit_preprocess`` keeps the
    sessions; the client reads ``max_sessions`` to use them)."""

    max_sessions: int = SessionSettings.max_sessions
    cache: str = "none"  # its engine's step cache (none: enable_cache is refused)


def instance_count(config: Mapping) -> int:
    """The instances Triton starts for a model config as Triton serves it, whose instance groups are normalized (a
    ``KIND_GPU`` group lists its GPUs: ``count`` instances on each)."""
    groups = config.get("instance_group") or [{"kind": "KIND_CPU", "count": 1}]
    return sum(int(group.get("count", 1)) * (len(group.get("gpus", [])) if group.get("kind") == "KIND_GPU" else 1)
               for group in groups)  # fmt: skip


def check_cache_instances(config: Mapping, cache: str) -> None:
    """Refuse a step cache served from more than one instance of the model (``ValueError`` naming both settings): a
    generation's cache state lives in the instance that ran its steps, and Triton hands each step to any instance, so
    a step reaching another one would silently run with another state."""
    if _check_cache(cache) is not None:
        _check_one_instance(config, f"cache {cache}", "a step cache keeps each generation's state")


def check_prompt_instances(config: Mapping, hold_prompts: bool) -> None:
    """Refuse ``hold_prompts`` on more than one instance (``ValueError`` naming both settings): a step reaching
    another instance than the one holding its sequence's prompt would find none."""
    if hold_prompts:
        _check_one_instance(config, "hold_prompts true", "holding prompts keeps each generation's prompt")


def _check_one_instance(config: Mapping, setting: str, why: str) -> None:
    instances = instance_count(config)
    if instances > 1:
        name = config.get("name", "this model")
        raise ValueError(f"{setting} and instance_group: {why} in one instance, but {name}'s instance_group starts "
                         f"{instances}; serve it from one instance (python -m flux_triton place {name} --gpus 0), or "
                         f"one server per GPU behind the replicas client")  # fmt: skip


def _check_cache(setting: str):
    """The cache a ``cache`` setting names (``None`` for none), or ``ValueError`` naming the setting."""
    from flux_triton.pipeline.caching import parse_cache_setting

    try:
        return parse_cache_setting(setting)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cache parameter: {exc}") from None


@dataclass(frozen=True)
class GenerateSettings(ModelSettings):
    """``flux_generate``'s settings: the served transformer its steps go to, the model folder whose config and
    scheduler it reads, and its request limits (``serving.generate``)."""

    ENVIRONMENT: ClassVar[Mapping[str, str]] = {"model_dir": MODEL_DIR_ENV}

    model_dir: str = "tiny-flux-dev"  # as dit_transformer's: the signature and the scheduler come from it
    transformer_model: str = "dit_transformer"  # the served model each step goes to, in process (BLS)
    # each instance runs the transformer itself, with dit_transformer's parameters in this config, instead of sending
    # the steps to transformer_model (python -m flux_triton place flux_generate --in-process)
    in_process: bool = False
    # the served models that encode prompt strings and decode images (serving.encode_decode); one not loaded: none
    text_encoder_model: str = "flux_text_encoder"
    vae_model: str = "flux_vae"
    scheduler: str = "auto"  # auto: the model folder's scheduler/, else by guidance: dev or schnell
    dtype: str = "auto"  # the transformer's: auto is bfloat16 where a GPU is visible, float32 otherwise
    cache: str = "none"  # the transformer's cache setting: the one a generation may choose (checked before it starts)
    max_steps: int = 100
    max_image_tokens: int = 16384
    max_text_tokens: int = 512

    def validate(self) -> None:
        _check_cache(self.cache)
        if self.scheduler not in ("auto", "dev", "schnell"):
            raise ValueError(f"scheduler parameter: expected auto, dev or schnell, got {self.scheduler!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype parameter: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_steps", "max_image_tokens", "max_text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} parameter: expected 1 or more, got {getattr(self, name)}")


@dataclass(frozen=True)
class ComponentsSettings(ModelSettings):
    """``flux_text_encoder``'s and ``flux_vae``'s settings: where the text encoders or the VAE load from, and their
    dtype (``serving.encode_decode``)."""

    ENVIRONMENT: ClassVar[Mapping[str, str]] = {"model_dir": MODEL_DIR_ENV}

    model_dir: str = "tiny-flux-dev"  # as dit_transformer's: components_dir auto is the pipeline folder holding it
    # the text encoders and VAE (model.components): auto, the pipeline folder holding model_dir; or a folder
    components_dir: str = "auto"
    dtype: str = "auto"  # auto is bfloat16 where a GPU is visible, float32 otherwise (the transformer's rule)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype parameter: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.components_dir in ("", "none"):
            raise ValueError("components_dir parameter: expected auto or a folder under the model root (a server "
                             "without text encoders or VAE leaves this model out)")  # fmt: skip


SCHEMAS = {"dit_transformer": TransformerSettings, "dit_preprocess": PreprocessSettings,
           "dit_engine": EngineSettings, "flux_dit": EnsembleSettings, "flux_generate": GenerateSettings,
           "flux_generate_stream": GenerateSettings,
           "flux_text_encoder": ComponentsSettings, "flux_vae": ComponentsSettings}  # fmt: skip
