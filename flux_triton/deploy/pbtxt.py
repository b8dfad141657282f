"""Triton model configs as text (``config.pbtxt``): read, write and edit them through Triton's own
``ModelConfig`` protobuf, which tritonclient ships."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

from google.protobuf import json_format, text_format

from flux_triton.contract.generation import GENERATE_MODEL, GENERATE_STREAM_MODEL, TEXT_ENCODER_MODEL, VAE_MODEL

# The Triton model names of the repository.
DIT_TRANSFORMER, ENSEMBLE, PREPROCESS, ENGINE = "dit_transformer", "flux_dit", "dit_preprocess", "dit_engine"
GENERATE, GENERATE_STREAM = GENERATE_MODEL, GENERATE_STREAM_MODEL
TEXT_ENCODER, VAE = TEXT_ENCODER_MODEL, VAE_MODEL


def model_config_pb2():
    """Triton's ``ModelConfig`` protobuf module, loaded by path because ``tritonclient.grpc``'s package
    import needs grpcio, which the HTTP client does not."""
    import tritonclient

    name = "flux_triton._model_config_pb2"
    if name not in sys.modules:
        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def to_pbtxt(config: dict, header: str = "") -> str:
    message = json_format.ParseDict(config, model_config_pb2().ModelConfig())
    return header + text_format.MessageToString(message)


def parse_pbtxt(path: Path):
    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())


def dtype_enum(name: str) -> int:
    return model_config_pb2().DataType.Value(name)


def copy_model(source: Path, repository: Path, name: str | None = None) -> Path:
    """The model folder ``source`` copied into ``repository`` as ``name`` (default: its own; another name is written
    into its config too), without Python caches; returns the copy's ``config.pbtxt``."""
    name = name or source.name
    shutil.copytree(source, repository / name, ignore=shutil.ignore_patterns("__pycache__"))
    config = repository / name / "config.pbtxt"
    if name != source.name:
        config.write_text(config.read_text().replace(f'name: "{source.name}"', f'name: "{name}"', 1))
    return config


def set_parameter(config: Path, key: str, value: str) -> None:
    """Set (or add) one string parameter of a config.pbtxt; ``value`` as it is meant (a JSON cache spec, say), its
    quotes and backslashes escaped here as the text format wants them."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    entry = f'parameters: {{ key: "{key}" value: {{ string_value: "{escaped}" }} }}'
    pattern = rf'parameters: {{ key: "{key}" value: {{ string_value: "(?:[^"\\]|\\.)*" }} }}'
    text, count = re.subn(pattern, lambda _: entry, config.read_text())
    config.write_text(text if count else f"{text.rstrip()}\n{entry}\n")
