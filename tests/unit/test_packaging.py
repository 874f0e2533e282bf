"""Packaging: what pyproject declares is true of the code, the files and the nox sessions.

The floors themselves are tested by running the suite on them (`nox -s minimums`); these
checks keep the declaration honest in between: every requirement has a floor, the
minimums session pins exactly those floors (read from pyproject, never copied), every
declared package is imported by cwa and every package cwa imports is declared, and the
license, `py.typed` and project metadata are what a package index needs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# distribution name -> the module cwa imports it as
IMPORT_NAME = {"huggingface_hub": "huggingface_hub", "lm_eval": "lm_eval"}
# packages the test extra needs that cwa itself does not import: where they are used
TEST_ONLY = {"pytest": "tests/", "hypothesis": "tests/", "nox": "noxfile.py"}
# modules cwa imports without declaring them, and why
UNDECLARED_OK = {
    "click": "typer's parser before typer vendored it; imported under try/except ImportError",
}


def _requirements(extras: tuple[str, ...] | None = None) -> list[Requirement]:
    groups = PROJECT["optional-dependencies"]
    texts = list(PROJECT["dependencies"])
    for extra in groups if extras is None else extras:
        texts += groups[extra]
    return [Requirement(t) for t in texts]


def _third_party_imports(folder: Path) -> dict[str, set[str]]:
    """Top-level modules imported anywhere under `folder` (lazy imports included), minus
    the standard library and cwa itself -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "cwa" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _noxfile():
    pytest.importorskip("nox")
    import importlib.util

    spec = importlib.util.spec_from_file_location("cwa_noxfile", ROOT / "noxfile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Session:
    """Stands in for `nox.Session`: records what a session installs and runs."""

    def __init__(self):
        self.installs: list[tuple[str, ...]] = []
        self.runs: list[tuple[str, ...]] = []
        self.posargs: list[str] = []

    def install(self, *args, **kw):
        self.installs.append(args)

    def run(self, *args, **kw):
        self.runs.append(args)


# --- floors --------------------------------------------------------------------------


def test_every_requirement_has_exactly_one_floor():
    for req in _requirements():
        floors = [s for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req}: needs one '>=' floor (`nox -s minimums` tests it)"


def test_floors_found_by_installing_them():
    """The floors that installing and testing found (README, "Installs"): lowering one
    needs a `nox -s minimums` run on the lower version. Below each, the suite or cwa
    fails: transformers < 4.56 loads no model and 4.56-5.17 fail tests (hub cache, pickle
    and shape messages, GGUF tokenizers); transformers loads no pickle on torch < 2.6; NumPy 2
    (pyarrow) needs h5py 3.11, pandas 2.2.2, matplotlib 3.8.4, gguf 0.16; typer < 0.16
    breaks on click 8.2; accelerate < 1.2 lacks what transformers 5 imports; peft
    0.16-0.17 need transformers 4; lm_eval < 0.4.12 has no TaskManager.load; hypothesis <
    6.85 has no characters(exclude_characters=); nox < 2024.4.15 no nox.project."""
    floor = {r.name.lower(): next(s.version for s in r.specifier if s.operator == ">=")
             for r in _requirements()}
    from packaging.version import Version

    for name, least in {"torch": "2.6", "transformers": "5.18", "tokenizers": "0.23.1",
                        "safetensors": "0.8", "huggingface_hub": "1.31", "numpy": "2.0",
                        "h5py": "3.11", "pandas": "2.2.2", "matplotlib": "3.8.4", "typer": "0.16",
                        "gguf": "0.16", "accelerate": "1.2", "peft": "0.18", "lm_eval": "0.4.12",
                        "hypothesis": "6.85", "nox": "2024.4.15"}.items():
        assert Version(floor[name]) >= Version(least), (name, floor[name])


def test_minimums_session_pins_exactly_the_declared_floors(monkeypatch):
    nf = _noxfile()
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("CWA_MIN_TORCH", raising=False)
    s = _Session()
    nf.minimums(s)
    pins = set(s.installs[0])
    want = set()
    for req in _requirements(("test",)):
        low = next(x.version for x in req.specifier if x.operator == ">=")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        want.add(f"{req.name}{extras}=={low}")
    assert pins == want
    assert s.installs[1] == ("--no-deps", "-e", ".")  # the project without re-resolving
    assert ("python", "-m", "pip", "check") in s.runs
    assert s.runs[-1][:3] == ("python", "-m", "pytest")


def test_minimums_session_can_keep_another_torch(monkeypatch):
    nf = _noxfile()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CWA_MIN_TORCH", "2.13.0")
    s = _Session()
    nf.minimums(s)
    torch = [p for p in s.installs[0] if p.startswith("torch")]
    assert torch == ["torch==2.13.0"]


def test_floors_follow_pyproject_not_a_copy():
    nf = _noxfile()
    fake = {"project": {"dependencies": ["numpy>=1.30", "Foo[bar]>=2"],
                        "optional-dependencies": {"test": ["pytest>=9.1", "numpy>=1.30"]}}}
    assert nf.floors(fake) == ["numpy==1.30", "Foo[bar]==2", "pytest==9.1"]
    with pytest.raises(ValueError, match="floor"):
        nf.floors({"project": {"dependencies": ["numpy"], "optional-dependencies": {"test": []}}})
    with pytest.raises(ValueError, match="two floors"):
        nf.floors({"project": {"dependencies": ["numpy>=1"],
                               "optional-dependencies": {"test": ["numpy>=2"]}}})


# --- declared == imported --------------------------------------------------------------


def test_every_declared_package_is_imported_by_cwa():
    imported = _third_party_imports(ROOT / "cwa")
    for req in _requirements():
        name = req.name
        if name in TEST_ONLY:
            continue
        module = IMPORT_NAME.get(name, name.replace("-", "_"))
        assert module in imported, f"{name} is declared but cwa never imports {module}"
    assert "to_pandas" in (ROOT / "docs" / "api.md").read_text()  # why pandas is required


def test_every_package_cwa_imports_is_declared():
    declared = {IMPORT_NAME.get(r.name, r.name.replace("-", "_")) for r in _requirements()}
    for module, files in _third_party_imports(ROOT / "cwa").items():
        assert module in declared or module in UNDECLARED_OK, (
            f"cwa imports {module} ({', '.join(sorted(files))}) but pyproject does not declare it"
        )


# --- license, typing marker, metadata -------------------------------------------------


def test_license_is_an_spdx_expression_with_its_files():
    lic = PROJECT["license"]
    assert isinstance(lic, str), "the table form `license = {text = ...}` is deprecated (PEP 639)"
    try:
        from packaging.licenses import canonicalize_license_expression
    except ImportError:  # packaging < 24.2
        pass
    else:
        assert canonicalize_license_expression(lic) == lic
    assert set(re.findall(r"[A-Za-z0-9.-]+", lic)) - {"AND"} == {"MIT", "PSF-2.0"}
    files = PROJECT["license-files"]
    assert files == ["LICENSE", "cwa/assets/corpus/LICENSE-PSF.txt"]
    for f in files:
        assert (ROOT / f).is_file(), f
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")], (
        "License classifiers are superseded by the SPDX expression (setuptools refuses both)")


def test_license_file_is_the_mit_license():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the cwa developers" in text
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_build_backend_supports_spdx_licenses():
    req = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    st = next(r for r in req if r.name == "setuptools")
    from packaging.version import Version

    low = next(s.version for s in st.specifier if s.operator == ">=")
    assert Version(low) >= Version("77"), "license expressions and license-files need setuptools 77"


def test_py_typed_is_shipped():
    assert (ROOT / "cwa" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["cwa"]
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_project_urls_and_classifiers():
    urls = PROJECT["urls"]
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(urls)
    for url in urls.values():
        assert url.startswith("https://"), url
    assert PROJECT["readme"] == "README.md"
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in PROJECT["classifiers"])
    assert len(set(PROJECT["classifiers"])) == len(PROJECT["classifiers"])


def test_version_has_one_source_read_back_by_importlib_metadata():
    import cwa

    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cwa.__version__"}
    try:
        installed = importlib.metadata.version("cwa")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cwa is not installed in this environment (pip install -e .)")
    assert installed == cwa.__version__


def test_readme_images_render_on_a_package_index():
    """PyPI renders the README without the repository beside it: a relative image link
    shows as a broken image there."""
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(r"<img[^>]+src=\"([^\"]+)", readme)
    relative = [src for src in images if not src.startswith("https://")]
    assert not relative, f"README images with relative links: {relative}"
