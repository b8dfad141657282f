"""Where the project's files live: the model root, the engines folder and the Triton model repository.

Each is an environment variable, else a folder under the project home: ``$FLUX_TRITON_HOME``, else the
folder given (the one above a model repository, for the Triton models), else the current directory
(the checkout, for ``make`` and ``python -m flux_triton``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "FLUX_TRITON_HOME"
MODEL_ROOT_ENV = "FLUX_MODEL_ROOT"
ENGINES_DIR_ENV = "FLUX_ENGINE_DIR"
REPOSITORY_ENV = "FLUX_MODEL_REPOSITORY"


def _from_env(name: str, default: Path) -> Path:
    return Path(os.environ.get(name) or default).resolve()


@dataclass(frozen=True)
class Locations:
    home: Path

    @classmethod
    def here(cls, home: Path | None = None) -> Locations:
        """``$FLUX_TRITON_HOME``, else ``home``, else the current directory."""
        return cls(_from_env(HOME_ENV, home or Path.cwd()))

    @classmethod
    def of_repository(cls, repository: Path) -> Locations:
        """For a model inside a Triton repository: the folder above it is the home."""
        return cls.here(Path(repository).resolve().parent)

    @property
    def model_root(self) -> Path:
        return _from_env(MODEL_ROOT_ENV, self.home / "models")

    @property
    def engines_dir(self) -> Path:
        return _from_env(ENGINES_DIR_ENV, self.home / "engines")

    @property
    def repository(self) -> Path:
        return _from_env(REPOSITORY_ENV, self.home / "model_repository")

    @property
    def out(self) -> Path:
        """Generated repositories of the non-default engines."""
        return self.home / "out"

    def engine(self, reference: str) -> Path:
        """An engine sidecar named by a ``dit_engine`` config: absolute, or a name in the engines folder."""
        path = Path(reference)
        return path if path.is_absolute() else self.engines_dir / path

    def engine_reference(self, sidecar: Path) -> str:
        """How a generated config names ``sidecar``: its name when it lies in the engines folder, else its path."""
        sidecar = Path(sidecar).resolve()
        return sidecar.name if sidecar.parent == self.engines_dir else str(sidecar)
