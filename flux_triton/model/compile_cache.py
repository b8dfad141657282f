"""torch.compile's caches kept across restarts. Inductor's FX-graph cache and the AOTAutograd cache are torch's own,
on by default, under ``TORCHINDUCTOR_CACHE_DIR`` (else the process's ``/tmp``, which a restarted container loses).
``use_compile_cache`` points them at a folder the deployment keeps (a persistent volume), in a subfolder per key:
the model's architecture, its dtype and speed-ups, torch's and CUDA's versions and the device. Within it, torch's
own cache keys (the graph, its inputs, the compiler's config and versions) decide every hit, so a stale or foreign
entry is compiled anew, never used wrongly."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from flux_triton.model.store import config_digest

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_key(model_config: Mapping, dtype: torch.dtype, speedups, device: torch.device) -> dict:
    """What a model's compiled code depends on besides the graph (``speedups``: a ``model.speedups.Speedups``)."""
    if device.type == "cuda":
        name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        where = {"gpu": name, "compute_capability": list(capability), "cuda": torch.version.cuda}
    else:
        where = {"device": device.type}
    return {"model": config_digest(model_config), "dtype": str(dtype), "speedups": asdict(speedups),
            "torch": torch.__version__, **where}  # fmt: skip


def use_compile_cache(folder: str | Path, key: Mapping) -> Path | None:
    """Point this process's compile caches at ``folder``'s subfolder for ``key`` (call it before anything compiles;
    processes started later inherit it). A folder that cannot be written is a warning, and torch's default stays;
    returns the subfolder used, or ``None``."""
    text = json.dumps(key, sort_keys=True, default=str)
    target = Path(folder) / hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target):
            pass
        (target / "key.json").write_text(text + "\n")  # what the subfolder holds, for whoever looks
    except OSError as exc:
        warnings.warn(f"compile_cache_dir {folder}: cannot be written ({exc}); torch.compile's caches stay in "
                      f"{os.environ.get(INDUCTOR_CACHE_ENV, 'its default folder')}", stacklevel=2)  # fmt: skip
        return None
    os.environ[INDUCTOR_CACHE_ENV] = str(target)
    return target
