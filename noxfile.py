"""nox sessions: `nox -s tests`, `nox -s slow`, `nox -s lint`, `nox -s examples`, `nox -s bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def install(session: nox.Session, *extras: str) -> None:
    """CPU torch first (a bare torch requirement can pull a CUDA build), then the project."""
    session.install("torch==2.13.0")
    spec = f".[{','.join(('test',) + extras)}]"
    session.install("-e", spec)


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
