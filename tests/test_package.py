"""The package as users install and run it: the wheel holds ``flux_triton`` alone, ``python -m
flux_triton`` lists its commands, locations follow the environment, not the source tree, and model processes
see only libpython of Python's own library folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import CHECKOUT

from flux_triton.locations import ENGINES_DIR_ENV, HOME_ENV, MODEL_ROOT_ENV, REPOSITORY_ENV, Locations


def test_the_wheel_installs_flux_triton_only(tmp_path):
    uv = shutil.which("uv") or str(CHECKOUT / ".tools" / "bin" / "uv")
    built = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(CHECKOUT)], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    (dist_info,) = tops - {"flux_triton"}
    assert dist_info.endswith(".dist-info") and "flux_triton" in tops
    # The client's dependencies install without the serving stack; `[serve]` adds it.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    serving = [line for line in requires if line.split()[1].startswith(("onnx", "protobuf", "polygraphy"))]
    assert serving and all(line.endswith("extra == 'serve'") for line in serving), serving


def test_the_entry_point_lists_its_commands():
    done = subprocess.run([sys.executable, "-m", "flux_triton"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    for command in ("demo", "serve", "health", "engine", "repo", "load", "tiny"):
        assert f"  {command} " in done.stderr, done.stderr


def test_locations_come_from_the_environment(monkeypatch, tmp_path):
    for name in (HOME_ENV, MODEL_ROOT_ENV, ENGINES_DIR_ENV, REPOSITORY_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    here = Locations.here()
    assert (here.model_root, here.engines_dir, here.repository) == (
        tmp_path / "models",
        tmp_path / "engines",
        tmp_path / "model_repository",
    )
    served = Locations.of_repository(tmp_path / "deploy" / "model_repository")
    assert served.model_root == tmp_path / "deploy" / "models"
    monkeypatch.setenv(MODEL_ROOT_ENV, str(tmp_path / "weights"))
    monkeypatch.setenv(ENGINES_DIR_ENV, str(tmp_path / "built"))
    assert Locations.here().model_root == tmp_path / "weights"
    assert served.engine("x.onnxruntime.json") == tmp_path / "built" / "x.onnxruntime.json"
    assert served.engine("/abs/x.json") == Path("/abs/x.json")
    assert served.engine_reference(tmp_path / "built" / "x.json") == "x.json"
    assert served.engine_reference(tmp_path / "elsewhere" / "x.json") == str(tmp_path / "elsewhere" / "x.json")
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert Locations.here().repository == tmp_path / "home" / "model_repository"


def test_model_processes_get_only_libpython_from_pythons_library_folder(tmp_path, monkeypatch):
    """The stub embeds libpython; the other libraries beside it must not shadow the ones torch links."""
    import sysconfig

    from flux_triton.deploy.server import server_environment

    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    paths = server_environment(cache=tmp_path)["LD_LIBRARY_PATH"].split(":")
    assert sysconfig.get_config_var("LIBDIR") not in paths
    [folder] = [Path(path) for path in paths if path.startswith(str(tmp_path))]
    [library] = folder.iterdir()
    assert library.name == sysconfig.get_config_var("INSTSONAME") and library.resolve().is_file()
