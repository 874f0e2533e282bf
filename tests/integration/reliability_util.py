"""Shared by the reliability tests (bad input, interruption, corruption, determinism).

`kit()` builds, once per session, a tiny model, another model, calibration text and one
valid artifact of every kind, all through the command line; `invoke()` runs a command in
process with `CliRunner`; `assert_clean_error()` is the contract every refusal keeps: the
expected exit code, exactly one line on stderr that starts with "error:" and names the
value, nothing on stdout, no traceback and no exception escaping the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from cwa.cli import app

REPO = Path(__file__).resolve().parents[2]
RUNNER = CliRunner()

# Tiny settings shared by every command that needs data.
SEQ = "16"


def invoke(args: list[str], *, input: str | None = None, env: dict[str, str] | None = None):
    return RUNNER.invoke(app, [str(a) for a in args], input=input, env=env)


def assert_ok(r) -> str:
    assert r.exit_code == 0, f"exit {r.exit_code}\nstderr: {r.stderr}\nexception: {r.exception!r}"
    return r.stdout.strip()


def assert_clean_error(r, code: int, *needles: str) -> str:
    """The refusal contract; returns the error line."""
    escaped = r.exception is not None and not isinstance(r.exception, SystemExit)
    assert not escaped, f"exception escaped the command: {r.exception!r}\nstderr: {r.stderr}"
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == code, f"exit {r.exit_code}, wanted {code}; stderr: {r.stderr}"
    assert len(lines) == 1, f"wanted one stderr line, got {len(lines)}:\n{r.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert r.stdout == "", f"stdout should be empty on error: {r.stdout!r}"
    return line


def cwa_subprocess(args, *, env=None, cwd=None, **kw) -> subprocess.Popen:
    """`python -m cwa ARGS` as a real process (the console-script path, with its SIGTERM
    handler), stdout and stderr piped."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "cwa", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=cwd, **kw,
    )


@dataclass
class Kit:
    root: Path
    model: Path  # tiny GPT-2
    other: Path  # tiny Llama: another model, other fingerprint
    text: Path  # calibration / evaluation text
    scores: Path  # grad_x_weight, seed 0
    scores1: Path  # grad_x_weight, seed 1
    other_scores: Path  # magnitude of the other model
    topk: Path  # top-10 of scores
    topk1: Path  # top-10 of scores1
    random: Path  # random_k control of topk, 2 draws
    perturb: Path  # perturbation results of topk + random
    stability: Path  # stability of scores, scores1

    def data(self) -> list[str]:
        return ["--data", str(self.text), "--seq-len", SEQ]


_KIT: Kit | None = None


def kit(tmp_root: Path, model: Path, other: Path) -> Kit:
    """The session's kit (built on first use; shared by every reliability module)."""
    global _KIT
    if _KIT is None:
        _KIT = _build(Path(tmp_root) / "reliability-kit", Path(model), Path(other))
    return _KIT


def _build(root: Path, model: Path, other: Path) -> Kit:
    from tests.integration.conftest import make_text

    root.mkdir(parents=True, exist_ok=True)
    text = root / "calib.txt"
    text.write_text(make_text(3000, 7))
    d = ["--data", str(text), "--seq-len", SEQ]
    p = {k: root / f for k, f in {
        "scores": "scores.safetensors", "scores1": "scores1.safetensors",
        "other_scores": "other.safetensors", "topk": "topk.h5", "topk1": "topk1.h5",
        "random": "random.h5", "perturb": "perturb.h5", "stability": "stability.h5",
    }.items()}
    steps = [
        ["score", "--model", model, *d, "--calib-samples", "4", "-o", p["scores"]],
        ["score", "--model", model, *d, "--calib-samples", "4", "--seed", "1", "-o", p["scores1"]],
        ["score", "--model", other, "--metric", "magnitude", "-o", p["other_scores"]],
        ["rank", p["scores"], "--topk", "10", "-o", p["topk"]],
        ["rank", p["scores1"], "--topk", "10", "-o", p["topk1"]],
        ["control", p["scores"], "--ref", p["topk"], "--kind", "random_k", "--control-draws", "2", "-o", p["random"]],
        ["perturb", p["topk"], p["random"], "--model", model, *d, "--eval-samples", "2", "-o", p["perturb"]],
        ["stability", p["scores"], p["scores1"], "--topk", "10", "-o", p["stability"]],
    ]
    for s in steps:
        assert_ok(invoke(s))
    return Kit(root=root, model=model, other=other, text=text, **p)


def tmp_files(folder: Path) -> list[Path]:
    """Temporary files an atomic write may leave: `.NAME.*.tmp`."""
    return sorted(Path(folder).rglob(".*.tmp"))


def h5_content(path: Path) -> tuple[dict, dict]:
    """(attributes without the creation time, datasets) of an HDF5 artifact."""
    from cwa import artifacts as A

    art = A.read_h5(path)
    attrs = {k: v for k, v in art.attrs.items() if k != "cwa.created"}
    return attrs, art.arrays


def scores_content(path: Path) -> tuple[dict, dict]:
    """(metadata without the creation time, tensor bytes) of a scores artifact."""
    from cwa import artifacts as A

    sc = A.open_scores(path)
    meta = {k: v for k, v in sc.meta.items() if k != "cwa.created"}
    raw = {n: sc.get(n).numpy().tobytes() for n in sc.names}
    return meta, raw


def tree_state(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (or the file itself) -> SHA-256 of its bytes (a symlink ->
    its target text), so a refusal can be shown to have written and changed nothing."""
    import hashlib

    state: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        items = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in items:
            if p.is_symlink():
                state[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                state[str(p)] = "dir"
            elif p.exists():
                state[str(p)] = "special"
    return state


def assert_refused(r, code: int, *needles: str, before: dict[str, str], roots) -> str:
    """`assert_clean_error` plus: every file under `roots` is byte-identical to `before`
    (taken with `tree_state(*roots)` before the command ran) and nothing was added."""
    line = assert_clean_error(r, code, *needles)
    after = tree_state(*roots)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"refusal wrote files: added {added}, changed {changed}"
    return line
