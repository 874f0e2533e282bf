"""A wheel built from a clean checkout installs in a fresh venv and works from `/`.

Slow (a fresh venv with torch and the dependencies, ~3-5 minutes) and needs the package
index: `nox -s slow`, or `pytest -m slow tests/integration/test_wheel.py`. The source is a
`git clone` of this repository's HEAD (what a release is built from); set
`CWA_WHEEL_SOURCE=DIR` to build from a copy of a working tree instead (uncommitted files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"  # the CPU build the README installs first
# pip's words when it could not reach an index (then it also says "No matching
# distribution"; without one of these, that is a fault of the package: an impossible pin)
_OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution",
            "Name or service not known", "Network is unreachable", "ProxyError", "ConnectTimeout",
            "Read timed out")


def _run(cmd, *, cwd, env, timeout=900):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _pip(py, args, *, env):
    r = _run([py, "-m", "pip", "--disable-pip-version-check", *args], cwd="/", env=env)
    if r.returncode != 0 and any(s in r.stdout + r.stderr for s in _OFFLINE):
        pytest.skip(f"the package index is not reachable: pip {' '.join(args[:2])}: "
                    f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    assert r.returncode == 0, f"pip {' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _source(tmp: Path) -> Path:
    src = tmp / "src"
    given = os.environ.get("CWA_WHEEL_SOURCE")
    if given:
        shutil.copytree(given, src, ignore=shutil.ignore_patterns(
            ".venv", ".nox", "*.egg-info", "build", "dist", "__pycache__", "cwa-out", "outputs"))
        return src
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout (or CWA_WHEEL_SOURCE=DIR)")
    r = _run(["git", "clone", "-q", ROOT, src], cwd=tmp, env=os.environ)
    assert r.returncode == 0, r.stderr
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin, the wheel, a clean environment) after a fresh install."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CWA_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CWA_CACHE_DIR=str(tmp / "cache"),
               CWA_PROGRESS_INTERVAL="inf", HOME=str(tmp / "home"))
    src = _source(tmp)
    r = _run([sys.executable, "-m", "venv", tmp / "venv"], cwd="/", env=env)
    if r.returncode != 0:
        pytest.skip(f"cannot make a venv: {r.stderr.strip()[-300:]}")
    py = tmp / "venv" / "bin" / "python"
    _pip(py, ["wheel", "-q", "--no-deps", "-w", tmp / "dist", src], env=env)  # isolated build
    (wheel,) = (tmp / "dist").glob("cwa-*.whl")
    _pip(py, ["install", "-q", TORCH], env=env)
    _pip(py, ["install", "-q", wheel], env=env)
    return py, py.parent, wheel, env


def test_the_wheel_holds_the_package_its_data_and_licenses(installed):
    _, _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    for f in ("cwa/py.typed", "cwa/assets/model/model.safetensors", "cwa/assets/model/tokenizer.json",
              "cwa/assets/corpus/pydoc_topics.json.gz", f"{info}/licenses/LICENSE",
              f"{info}/licenses/cwa/assets/corpus/LICENSE-PSF.txt"):
        assert f in names, f
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT AND PSF-2.0" in meta
    assert "Project-URL: Source, https://" in meta


def test_installed_metadata_and_typing_marker(installed):
    py, _, _, env = installed
    code = ("import importlib.metadata as m, importlib.resources as r, cwa; "
            "print(m.version('cwa'), cwa.__version__, r.files('cwa').joinpath('py.typed').is_file(), "
            "cwa.__file__)")
    r = _run([py, "-c", code], cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    version, attr, typed, where = r.stdout.split()
    assert version == attr and typed == "True"
    assert "site-packages" in where  # the wheel, not a source tree on the path


def test_cwa_works_from_root(installed, tmp_path):
    _, bindir, _, env = installed
    cwa = bindir / "cwa"
    r = _run([cwa, "run", "--help"], cwd="/", env=env)
    assert r.returncode == 0 and "--model" in r.stdout, r.stderr
    r = _run([cwa, "eval", "--eval-samples", "2", "-o", tmp_path / "base.json"], cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "base.json")
    doc = json.loads((tmp_path / "base.json").read_text())
    assert "perplexity" in json.dumps(doc)
    out = tmp_path / "run"
    r = _run([cwa, "run", "--seeds", "0", "--topk", "5", "--calib-samples", "2", "--eval-samples", "2",
              "--controls", "random_k", "--control-draws", "2", "--no-save-plots", "--out-dir", out],
             cwd="/", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["versions"]["cwa"] == manifest["cwa_version"]  # importlib.metadata agrees
    assert manifest["cwd"] == "/"
    assert (out / "perturbation_results.json").is_file()
