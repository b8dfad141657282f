"""The JSON sidecar written beside every engine: what the engine is, what it was built from and for.

One format for every kind: ``artifacts`` lists the files that make the engine (an ONNX graph, a plan,
AOTI packages) with their sha256, ``device`` the device type and GPU an engine is bound to (``None`` for
a portable one), ``build`` the kind's own record (exporter, tool versions, compile times, measured
error). ``dit_engine`` picks its loader from ``kind``; ``make repo`` sizes the Triton configs from it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from flux_triton.contract import DitSignature, Limits


@dataclass
class EngineSidecar:
    kind: str  # a key of engines.kinds.KINDS
    precision: str  # a key of engines.precision.PRECISIONS
    engine_file: str  # relative to the sidecar's folder: a file, or a folder of packages
    source_model: str  # model name under the model root
    signature: dict  # DitSignature fields (io dtype included)
    profile: dict  # ProfileConfig.describe()
    shapes: dict = field(default_factory=dict)  # {input: {min, opt, max}}
    source_config: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # {role: {"file", "sha256"}}
    device: dict | None = None  # {"type", "gpu", "compute_capability"}: the device the engine is bound to
    build: dict = field(default_factory=dict)
    created: str = ""

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
    def for_build(cls, kind: str, precision: str, engine_file: str, model: str, signature, profile, config, **rest):
        """A new engine's sidecar from ``engines.profiles.ProfileConfig`` ``profile``, stamped now."""
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

    def check_artifacts(self, sidecar_path: Path) -> None:
        """Every recorded file exists and still has its sha256."""
        for role, artifact in self.artifacts.items():
            path = Path(sidecar_path).parent / artifact["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{sidecar_path}: {role} file {path} does not exist")
            if sha256_files(path) != artifact["sha256"]:
                raise ValueError(f"{sidecar_path}: {path} does not match its recorded sha256 (rebuild the engine)")

    def check_device(self, sidecar_path: Path, device: torch.device) -> None:
        """An engine bound to a device type (and GPU architecture) runs only there."""
        if self.device is None:
            return
        here = device_record(device)
        same = here["type"] == self.device["type"] and (
            here["type"] != "cuda" or here["compute_capability"] == self.device["compute_capability"]
        )
        if not same:
            raise ValueError(
                f"{sidecar_path}: the {self.kind} engine was built for {describe_device(self.device)}, but this "
                f"runner is on {describe_device(here)}; rebuild it there with "
                f"`make engine ENGINE={self.kind} MODEL={self.source_model}`"
            )


def device_record(device: torch.device) -> dict[str, str | None]:
    """The device type and, on CUDA, the GPU and its architecture."""
    if device.type != "cuda":
        return {"type": device.type, "gpu": None, "compute_capability": None}
    major, minor = torch.cuda.get_device_capability(device)
    return {"type": "cuda", "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def describe_device(record: dict) -> str:
    return record["type"] if record["type"] != "cuda" else f"{record['gpu']} (sm {record['compute_capability']})"


def sha256_files(*paths: Path, chunk: int = 1 << 20) -> str:
    """One digest over the files in order (an ONNX graph and its external data, if any)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def artifact(folder: Path, *files: Path) -> dict[str, str]:
    """A sidecar ``artifacts`` entry: the first file's name (relative to ``folder``) and the digest of all."""
    return {"file": str(Path(files[0]).relative_to(folder)), "sha256": sha256_files(*files)}
