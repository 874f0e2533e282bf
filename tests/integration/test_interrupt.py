"""Interruption: SIGINT or SIGTERM during a stage leaves no partial artifact and no stray
temporary file, an existing artifact is left as it was, the exit code is 128 + the signal
(130 for SIGINT, 143 for SIGTERM), and the rerun completes (`cwa run` resumes from its
finished stages).

Each case is a real `python -m cwa` process that gets a real signal. To hit the stage at
a known point rather than by timing, the child runs the console script with one hook
that parks it (a long sleep, which the signal interrupts) either after the first batch
of a stage's computation or after the artifact's temporary file has been written but
before it is renamed. The children start together (their imports overlap) and each test
signals its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.reliability_util import (
    REPO,
    assert_ok,
    h5_content,
    invoke,
    tmp_files,
)

# The child: the console script (`cwa.cli.main`, with its SIGTERM handler) plus one hook.
CHILD = r"""
import contextlib, os, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores SIGINT
hook, marker = os.environ["CWA_TEST_HOOK"], os.environ["CWA_TEST_MARKER"]


def park():
    open(marker, "w").close()
    time.sleep(600)  # the test's signal ends this
    sys.exit("parked child was never signalled")


if hook.startswith("compute:"):  # park after the first batch of a stage's computation
    import cwa.stages as S

    stage, real = hook.split(":", 1)[1], S.progress

    @contextlib.contextmanager
    def progress(description, total, *a, **kw):
        with real(description, total, *a, **kw) as advance:
            if not description.startswith(stage):
                yield advance
                return

            def advance_then_park(n):
                advance(n)
                park()

            yield advance_then_park

    S.progress = progress
elif hook == "write:scores":  # park with the temporary file written, before the rename
    import safetensors.torch as st

    real_save = st.save_file

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        park()

    st.save_file = save_file
elif hook == "write:h5":  # park with the HDF5 file written, before it is sealed and renamed
    import cwa.artifacts as A

    A._seal_userblock = lambda path: park()

from cwa.cli import main

main(sys.argv[1:])
"""


@dataclass
class Case:
    name: str
    hook: str
    sig: int
    args: list[str]
    target: Path  # the artifact being written (file or run directory)
    folder: Path  # where temporary files would be
    proc: subprocess.Popen | None = None
    marker: Path | None = None


@pytest.fixture(scope="module")
def children(k, tmp_path_factory):
    """Start every child at once; each test signals one. Killed (by pid) at the end."""
    root = tmp_path_factory.mktemp("interrupt")
    d = k.data()
    run_out = root / "run"
    cases = [
        Case("score-compute-SIGINT", "compute:score", signal.SIGINT,
             ["score", "--model", k.model, *d, "--calib-samples", "4", "--batch-size", "1",
              "-o", root / "a" / "scores.safetensors"], root / "a" / "scores.safetensors", root / "a"),
        Case("score-compute-SIGTERM", "compute:score", signal.SIGTERM,
             ["score", "--model", k.model, *d, "--metric", "act_mag", "--calib-samples", "4", "--batch-size", "1",
              "-o", root / "b" / "scores.safetensors"], root / "b" / "scores.safetensors", root / "b"),
        Case("score-write-SIGTERM", "write:scores", signal.SIGTERM,
             ["score", "--model", k.model, *d, "--calib-samples", "4", "-o", root / "c" / "scores.safetensors"],
             root / "c" / "scores.safetensors", root / "c"),
        Case("rank-write-SIGINT", "write:h5", signal.SIGINT,
             ["rank", k.scores, "--topk", "7", "-o", root / "e" / "topk.h5"], root / "e" / "topk.h5", root / "e"),
        Case("run-perturb-SIGTERM", "compute:perturb", signal.SIGTERM,
             ["run", "--model", k.model, *d, "--calib-samples", "2", "--eval-samples", "4", "--batch-size", "1",
              "--seeds", "0", "--topk", "5", "--controls", "random_k", "--control-draws", "2",
              "--perturb", "zero", "--no-save-plots", "--out-dir", run_out],
             run_out / "artifacts" / "perturb_seed0.h5", run_out / "artifacts"),
    ]
    # the rank case overwrites an existing artifact (K = 3): an interrupted rewrite must keep it
    (root / "e").mkdir()
    assert_ok(invoke(["rank", k.scores, "--topk", "3", "-o", root / "e" / "topk.h5"]))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for c in cases:
        c.folder.mkdir(parents=True, exist_ok=True)
        c.marker = root / f"{c.name}.parked"
        c.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, c.args)], cwd=root,
            env={**env, "CWA_TEST_HOOK": c.hook, "CWA_TEST_MARKER": str(c.marker)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    yield {c.name: c for c in cases}
    for c in cases:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def _wait_parked(c: Case, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not c.marker.exists():
        if c.proc.poll() is not None:
            out, err = c.proc.communicate()
            pytest.fail(f"{c.name}: child exited {c.proc.returncode} before the hook:\n{err}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"{c.name}: child did not reach the hook in {timeout}s")
        time.sleep(0.05)


def _signal_and_check(c: Case) -> str:
    _wait_parked(c)
    if c.hook.startswith("write:"):  # the temporary file is really there when the signal lands
        assert tmp_files(c.folder), f"{c.name}: no temporary file to clean up"
    c.proc.send_signal(c.sig)
    out, err = c.proc.communicate(timeout=60)
    assert c.proc.returncode != 0, (c.name, out, err)
    # 128 + the signal, as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM
    want = {signal.SIGINT: 130, signal.SIGTERM: 143}[c.sig]
    assert c.proc.returncode == want, (c.name, c.proc.returncode, err)
    assert "interrupted" in err and "Traceback" not in err, err
    assert out == "", f"{c.name}: a path was printed for an unfinished stage: {out!r}"
    assert not tmp_files(c.folder), f"{c.name}: stray temporary files {tmp_files(c.folder)}"
    return err


@pytest.mark.parametrize("name", ["score-compute-SIGINT", "score-compute-SIGTERM", "score-write-SIGTERM"])
def test_interrupted_score_leaves_nothing_and_reruns(children, name):
    c = children[name]
    _signal_and_check(c)
    assert not c.target.exists(), f"{name}: partial artifact {c.target}"
    assert list(c.folder.iterdir()) == []
    r = invoke(c.args)
    assert assert_ok(r) == str(c.target)
    from cwa import artifacts as A

    assert A.open_scores(c.target).names


def test_interrupted_rewrite_keeps_the_old_artifact(children):
    c = children["rank-write-SIGINT"]
    before = c.target.read_bytes()
    _signal_and_check(c)
    assert c.target.read_bytes() == before, "the interrupted rewrite damaged the existing artifact"
    assert [p.name for p in c.folder.iterdir()] == [c.target.name]
    assert_ok(invoke(c.args))
    attrs, _ = h5_content(c.target)
    assert attrs["k"] == 7


def test_interrupted_run_resumes_from_finished_stages(children):
    import json

    c = children["run-perturb-SIGTERM"]
    _signal_and_check(c)
    art = c.folder
    done = sorted(p.name for p in art.iterdir())
    assert done == ["random_k_seed0.h5", "scores_seed0.safetensors", "topk_seed0.h5"], done
    assert not c.target.exists()
    run_dir = art.parent
    assert not (run_dir / "experiment_manifest.json").exists()
    r = invoke(c.args)
    assert assert_ok(r) == str(run_dir)
    manifest = json.loads((run_dir / "experiment_manifest.json").read_text())
    hits = {s["stage"]: s["cache_hit"] for s in manifest["stages"] if "cache_hit" in s and s["stage"] != "plot"}
    assert hits == {"score": True, "rank": True, "control": True, "perturb": False}, hits
    assert c.target.exists() and not tmp_files(run_dir)
