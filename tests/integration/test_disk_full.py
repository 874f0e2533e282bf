"""Faults and bad input through the command line (issue 11): a full disk, a killed
writer, output paths that must not be replaced, and damaged cached artifacts.

- A full disk used to crash the HDF5 library (exit 139, ~90 lines of tracebacks, a
  `.tmp` left). Now every write is one `error:` line, exit 1, no temporary file, and
  a file already at the path is left as it was. Checked with a patched write (always)
  and with a real 2 MB tmpfs (where `mount` is permitted: root, as in CI), in real
  `python -m cwa` processes so that a crash shows as a crash.
- A writer killed with SIGKILL leaves its temporary file; the next write into that
  directory removes it.
- `-o` never replaces a FIFO, a directory, a link or a file that is not a cwa artifact;
  a damaged cached artifact is recomputed with a note; replacing another result says so.

Library-level cases are in `tests/unit/test_artifact_faults.py`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.reliability_util import (
    REPO,
    assert_clean_error,
    assert_ok,
    assert_refused,
    cwa_subprocess,
    invoke,
    scores_content,
    tmp_files,
    tree_state,
)

# --------------------------------------------------------------------------- patched write


def _enospc(path, *parts):
    with open(path, "wb") as f:
        f.write(bytes(parts[0])[:64])  # a partial write, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_while_ranking_is_one_line(k, tmp_path, monkeypatch):
    from cwa import artifacts as A

    out = tmp_path / "topk.h5"
    shutil.copy(k.topk1, out)  # another result already there
    before = tree_state(tmp_path)
    monkeypatch.setattr(A, "_write_bytes", _enospc)
    r = invoke(["rank", k.scores, "--topk", "7", "-o", out])
    line = assert_refused(r, 1, str(out), "no space left on device", "needed", before=before, roots=[tmp_path])
    assert "free space or choose another output path" in line
    assert not tmp_files(tmp_path)


def test_full_disk_while_writing_scores_or_json_is_one_line(k, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    from cwa import artifacts as A

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "s.safetensors"
    r = invoke(["score", "--model", k.other, "--metric", "magnitude", "-o", out])
    assert_refused(r, 1, str(out), "no space left on device", before={}, roots=[tmp_path])
    monkeypatch.setattr(A, "_write_bytes", _enospc)
    r = invoke(["eval", "--model", k.model, *k.data(), "--eval-samples", "2", "-o", tmp_path / "base.json"])
    assert_refused(r, 1, "base.json", "no space left on device", before={}, roots=[tmp_path])


# --------------------------------------------------------------------------- a real full disk


@contextlib.contextmanager
def _tmpfs(d: Path, size: str = "2m"):
    d.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or f'mount exited {r.returncode}'}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(d: Path) -> Path:
    """Fill the file system of `d` to the last byte."""
    filler = d / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return filler


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A GPT-2 whose magnitude scores (about 3.4 MB) and top-200000 selection (about
    3.2 MB) do not fit in 2 MB, and those scores (written outside the small disk)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from tests.integration.conftest import make_tokenizer

    root = tmp_path_factory.mktemp("big")
    tok = make_tokenizer()
    import torch

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=256, n_head=4, vocab_size=len(tok), n_positions=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    scores = root / "scores.safetensors"
    assert_ok(invoke(["score", "--model", root / "model", "--metric", "magnitude", "-o", scores]))
    assert scores.stat().st_size > 3 << 20
    return root / "model", scores


def _check_full(p: subprocess.Popen, out: Path, what: str) -> str:
    stdout, stderr = p.communicate(timeout=300)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert p.returncode == 1, f"{what}: exit {p.returncode} (139/-11: a crash)\n{stderr[-3000:]}"
    assert len(lines) == 1 and "Traceback" not in stderr, f"{what}: {stderr[-3000:]}"
    if what == "score-big":  # scores: refused before any work, from their computed size
        assert lines[0].startswith(f"error: -o {out}: needs "), lines[0]
        assert "free; use --score-dtype bfloat16" in lines[0], lines[0]
    else:
        assert lines[0].startswith(f"error: {out}: no space left on device while writing ("), lines[0]
        assert "free space or choose another output path" in lines[0], lines[0]
    assert stdout == "", stdout
    return lines[0]


def test_real_full_disk(k, big, tmp_path):
    """Real commands writing into a 2 MB tmpfs: big artifacts into an empty one (the
    scores file and a selection larger than the disk, where HDF5 used to crash), and
    every kind of write into a full one that already holds an artifact."""
    model, scores = big
    empty, full = tmp_path / "empty", tmp_path / "full"
    with _tmpfs(empty), _tmpfs(full):
        shutil.copy(k.topk1, full / "topk.h5")  # a result that must survive
        _fill(full)
        before = tree_state(full)
        env = {"OMP_NUM_THREADS": "1"}
        d = k.data()
        jobs = {  # started together: their imports overlap
            "score-big": (["score", "--model", model, "--metric", "magnitude", "-o", empty / "s.safetensors"],
                          empty / "s.safetensors"),
            "rank-big": (["rank", scores, "--topk", "200000", "-o", empty / "topk.h5"], empty / "topk.h5"),
            "rank-over-existing": (["rank", k.scores, "--topk", "50", "-o", full / "topk.h5"], full / "topk.h5"),
            "perturb": (["perturb", k.topk, "--model", k.model, *d, "--eval-samples", "2", "-o", full / "p.h5"],
                        full / "p.h5"),
            "eval-json": (["eval", "--model", k.model, *d, "--eval-samples", "2", "-o", full / "base.json"],
                          full / "base.json"),
        }
        procs = {name: (cwa_subprocess(args, env=env, cwd=tmp_path), out) for name, (args, out) in jobs.items()}
        try:
            lines = {name: _check_full(p, out, name) for name, (p, out) in procs.items()}
        finally:
            for p, _ in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert "MB on" in lines["score-big"] and "MB needed" in lines["rank-big"], lines
        assert os.listdir(empty) == [], f"left on the empty disk: {os.listdir(empty)}"
        assert tree_state(full) == before, "the full disk's files changed"
        assert not tmp_files(empty) and not tmp_files(full)


# --------------------------------------------------------------------------- a killed writer

# The child: the console script with `save_file` parked after writing the temporary file.
_PARKED_WRITER = r"""
import os, sys, time
import safetensors.torch as st

real = st.save_file


def save_file(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    open(os.environ["CWA_TEST_MARKER"], "w").close()
    time.sleep(600)


st.save_file = save_file
from cwa.cli import main

main(sys.argv[1:])
"""


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(k, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "parked"
    p = subprocess.Popen(
        [sys.executable, "-c", _PARKED_WRITER, "score", "--model", k.other, "--metric", "magnitude",
         "-o", out / "s.safetensors"],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
             "CWA_TEST_MARKER": str(marker)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert p.poll() is None, p.communicate()[1]
            assert time.monotonic() - t0 < 180, "the child never reached the write"
            time.sleep(0.05)
        left = tmp_files(out)
        assert len(left) == 1 and f".{p.pid}." in left[0].name, left
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    assert tmp_files(out) == left, "SIGKILL cannot clean up: the temporary file is still there"
    assert_ok(invoke(["rank", k.scores, "--topk", "3", "-o", out / "t.h5"]))
    assert not tmp_files(out), f"stale temporary file left: {tmp_files(out)}"
    assert sorted(x.name for x in out.iterdir()) == ["t.h5"]


# --------------------------------------------------------------------------- what -o may replace


def test_output_that_is_not_a_regular_file_is_refused(k, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "a.h5").write_bytes(b"x")
    link = tmp_path / "link.h5"
    link.symlink_to(tmp_path / "elsewhere.h5")
    before = tree_state(tmp_path)
    for out, needle in ((fifo, "FIFO"), (tmp_path / "a.h5" / "x.h5", "a.h5 is a file"), (link, "symbolic link")):
        r = invoke(["rank", k.scores, "--topk", "5", "-o", out])
        assert_refused(r, 2, f"-o {out}", needle, before=before, roots=[tmp_path])


def test_a_file_that_is_not_a_cwa_artifact_is_never_overwritten(k, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my results, by hand\n")
    weights = tmp_path / "model.safetensors"
    shutil.copy(Path(k.model) / "model.safetensors", weights)
    before = tree_state(tmp_path)
    for args in (
        ["rank", k.scores, "--topk", "5", "-o", notes],
        ["rank", k.scores, "--topk", "5", "-o", notes, "--force"],
        ["score", "--model", k.other, "--metric", "magnitude", "-o", weights],
        ["control", k.scores, "--ref", k.topk, "--control-draws", "2", "-o", weights],
    ):
        r = invoke(args)
        assert_refused(r, 2, "is not a cwa artifact", "choose another output path", before=before, roots=[tmp_path])


def test_damaged_cached_scores_are_recomputed(k, tmp_path):
    """Flipped data bytes in a cached scores file used to be a cache hit (only the header
    was read) and broke a later stage; now the cache hit verifies every tensor."""
    out = tmp_path / "s.safetensors"
    shutil.copy(k.scores, out)
    args = ["score", "--model", k.model, *k.data(), "--calib-samples", "4", "-o", out]
    r = invoke(args)
    assert assert_ok(r) == str(out) and "note:" not in r.stderr  # an intact copy: a cache hit
    b = bytearray(out.read_bytes())
    b[-3] ^= 0xFF
    out.write_bytes(bytes(b))
    r = invoke(args)
    assert assert_ok(r) == str(out)
    notes = [x for x in r.stderr.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {out} is damaged ("), r.stderr
    assert notes[0].endswith("); recomputing"), notes
    assert scores_content(out) == scores_content(k.scores)


def test_damaged_cached_selection_is_recomputed_and_replacing_says_so(k, tmp_path):
    out = tmp_path / "t.h5"
    shutil.copy(k.topk, out)
    b = bytearray(out.read_bytes())
    b[600] ^= 0xFF
    out.write_bytes(bytes(b))
    r = invoke(["rank", k.scores, "--topk", "10", "-o", out])
    assert assert_ok(r) == str(out)
    assert f"note: {out} is damaged (" in r.stderr and "replaced" not in r.stderr, r.stderr
    r = invoke(["rank", k.scores, "--topk", "4", "-o", out])
    assert assert_ok(r) == str(out)
    assert f"note: replaced {out} (it held another result)" in r.stderr, r.stderr
    r = invoke(["rank", k.scores, "--topk", "4", "-o", out])  # a cache hit: nothing to say
    assert assert_ok(r) == str(out) and "note:" not in r.stderr, r.stderr


def test_cwa_info_of_a_doc_that_is_not_json(tmp_path):
    import h5py

    from cwa import artifacts as A

    p = tmp_path / "d.h5"
    with h5py.File(p, "w", userblock_size=512) as f:
        f.attrs["cwa.schema"] = A.SELECTION_SCHEMA
        f.attrs["cwa.doc"] = "{not json"
    A._seal_userblock(p)
    assert_clean_error(invoke(["info", p]), 1, str(p), "malformed cwa.doc")
