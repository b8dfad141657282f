"""The JSON sidecar written beside every engine in ``engines/``: what the engine is and how it was
built. Runners pick their loader from ``kind``; the repository generator sizes configs from it."""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from flux_triton.contract import DitSignature
from flux_triton.validation import Limits


@dataclass
class EngineSidecar:
    kind: str  # loader key: onnxruntime, tensorrt, aoti, aoti-fp8
    precision: str  # fp32, fp16, bf16, fp8
    engine_file: str  # relative to the sidecar's folder: a file, or a folder of packages (aoti)
    source_model: str  # model name under the model root
    signature: dict  # DitSignature fields (io dtype included)
    profile: dict  # ProfileConfig.describe()
    shapes: dict = field(default_factory=dict)  # {input: {min, opt, max}}
    onnx_file: str | None = None  # ONNX engines only
    onnx_sha256: str | None = None
    source_config: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)  # exporter, opset, rope dtype; aoti: profile, speed-ups, build times
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    created: str = ""
    device_type: str | None = None  # aoti: the device type the packages were compiled for (cpu, cuda)
    torch_version: str | None = None  # aoti: the torch that compiled the packages
    packages: dict = field(default_factory=dict)  # aoti: {block kind: {"file", "sha256"}}

    @property
    def dit_signature(self) -> DitSignature:
        return DitSignature(**self.signature)

    @property
    def limits(self) -> Limits:
        axes = self.profile["axes"]  # {axis: [min, opt, max]}
        return Limits(
            max_batch=axes["batch"][2],
            max_image_tokens=axes["image_tokens"][2],
            max_text_tokens=axes["text_tokens"][2],
            min_image_tokens=axes["image_tokens"][0],
            min_text_tokens=axes["text_tokens"][0],
        )

    @classmethod
    def for_build(
        cls, kind, precision: str, engine_file: str, model: str, signature: DitSignature, profile, config, **rest
    ):
        """A new engine's sidecar: the fields every kind records, from ``export.profiles.ProfileConfig``
        ``profile``, stamped now; ``rest`` holds the kind's own fields."""
        return cls(
            kind=kind,
            precision=precision,
            engine_file=engine_file,
            source_model=model,
            signature=asdict(signature),
            profile=profile.describe(),
            shapes=profile.describe_shapes(signature),
            source_config=dict(config),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **rest,
        )

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> EngineSidecar:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read engine sidecar {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise ValueError(f"engine sidecar {path} lacks {sorted(missing)}")
        return cls(**{key: value for key, value in data.items() if key in known})


def sha256_files(*paths: Path, chunk: int = 1 << 20) -> str:
    """One digest over the files in order (an ONNX graph and its external data, if any)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
