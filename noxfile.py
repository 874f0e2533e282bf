"""nox sessions: `nox -s tests`, `nox -s slow`, `nox -s minimums`, `nox -s lint`, `nox -s examples`,
`nox -s bench`."""

from __future__ import annotations

import os

import nox
from packaging.requirements import Requirement

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build, from local disk here (a bare torch requirement can pull a CUDA build).
TORCH = "torch==2.13.0"


def install(session: nox.Session, *extras: str) -> None:
    """CPU torch first, then the project with its test extra."""
    session.install(TORCH)
    spec = f".[{','.join(('test',) + extras)}]"
    session.install("-e", spec)


def floors(pyproject: dict, extras: tuple[str, ...] = ("test",)) -> list[str]:
    """`name[extras]==X` for every `name>=X` in the dependencies and the given extras of a
    parsed pyproject: the lowest versions it declares, read from it, never copied here.
    A requirement without a `>=` floor is an error, so every bound stays tested."""
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        low = [s.version for s in req.specifier if s.operator == ">="]
        if len(low) != 1:
            raise ValueError(f"{text!r}: every dependency needs exactly one '>=' floor")
        extra_s = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pin = f"{req.name}{extra_s}=={low[0]}"
        if pins.setdefault(req.name.lower(), pin) != pin:
            raise ValueError(f"{req.name}: declared with two floors ({pins[req.name.lower()]}, {pin})")
    return list(pins.values())


@nox.session
def tests(session: nox.Session) -> None:
    """The fast suite (what CI runs)."""
    install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """The checks marked slow (long statistical and end-to-end runs)."""
    install(session)
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session
def minimums(session: nox.Session) -> None:
    """The fast suite on the lowest version of every declared dependency (CWA_MIN_TORCH=2.13.0 keeps that torch)."""
    pins = floors(nox.project.load_toml("pyproject.toml"))
    # torch's floor on PyPI is a CUDA build (~3.5 GB with its nvidia wheels); CWA_MIN_TORCH
    # replaces it, e.g. by the CPU build of the other sessions.
    torch = os.environ.get("CWA_MIN_TORCH")
    if torch:
        pins = [p for p in pins if not p.startswith("torch==")] + [f"torch=={torch}"]
    session.install(*pins)
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pip", "check")
    session.run("python", "-m", "pip", "list")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the package, tests, examples and benchmarks."""
    session.install("ruff")
    session.run("ruff", "check", "cwa", "tests", "examples", "benchmarks", "noxfile.py", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """Run the seed's ten workflows on the embedded model (MODEL=gpt2 overrides)."""
    install(session)
    session.run("bash", "examples/run_all.sh", *session.posargs, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: scoring, ranking and perturbation against their baselines."""
    install(session)
    session.run("python", "benchmarks/bench.py", *session.posargs)
