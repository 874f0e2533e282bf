"""Faults and bad input at the artifact level (issue 11): a failing write is one clear
error and loses nothing, stale temporary files of dead processes are cleaned up, only
regular files are replaced (and never a file that is not a cwa artifact), a cache hit
verifies what it reuses, and reading an HDF5 file is bounded by what cwa writes.

The real full disk (a 2 MB tmpfs) and the command-line cases are in
`tests/integration/test_disk_full.py`.
"""

from __future__ import annotations

import ast
import errno
import os
import socket
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cwa import artifacts as A
from cwa.errors import ArtifactError, CwaError, UsageError

REPO = Path(__file__).resolve().parents[2]


def _temps(d: Path) -> list[Path]:
    return sorted(Path(d).rglob(".*.tmp"))


def _h5(path: Path, fp: str = "f1") -> Path:
    return A.write_h5(path, A.SELECTION_SCHEMA, {"fingerprint": fp, "k": 3}, {"a": np.arange(50)}, doc={"v": 1})


def _scores(path: Path, fp: str = "s1", n: int = 1000) -> Path:
    t = {"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(7)}
    return A.write_scores(path, t, {"cwa.fingerprint": fp, "cwa.metric": "magnitude"})


# --------------------------------------------------------------------------- 1. write faults


def _failing_write(code: int):
    """A `_write_bytes` that writes part of the data, then fails like the OS would."""

    def write(path, *parts):
        with open(path, "wb") as f:
            f.write(bytes(parts[0])[:100])
        raise OSError(code, os.strerror(code), str(path))

    return write


def _failing_save_file(exc: Exception):
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the error
        raise exc

    return save_file


def _assert_one_line(e: CwaError, path: Path, *needles: str) -> str:
    msg = str(e)
    assert type(e) is CwaError and e.exit_code == 1, repr(e)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.mark.parametrize("kind", ["h5", "json", "text"])
def test_no_space_while_writing_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch, kind):
    target = tmp_path / f"out.{kind}"
    writers = {
        "h5": lambda: _h5(target, "f2"),
        "json": lambda: A.write_json(target, {"a": list(range(100))}),
        "text": lambda: A.write_text_atomic(target, "x" * 5000),
    }
    if kind == "h5":
        _h5(target, "f1")
    else:
        target.write_text("previous\n")
    before = target.read_bytes()
    monkeypatch.setattr(A, "_write_bytes", _failing_write(errno.ENOSPC))
    with pytest.raises(CwaError) as ei:
        writers[kind]()
    _assert_one_line(ei.value, target, "no space left on device while writing", "needed",
                     "free space or choose another output path")
    assert target.read_bytes() == before
    assert _temps(tmp_path) == []


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # what safetensors' Rust writer raises on a full disk
        "safetensors",
    ],
    ids=["oserror", "safetensor-error"],
)
def test_no_space_while_writing_scores(tmp_path, monkeypatch, exc):
    import safetensors
    import safetensors.torch

    if exc == "safetensors":
        exc = safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )
    target = _scores(tmp_path / "s.safetensors", "s1")
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(exc))
    with pytest.raises(CwaError) as ei:
        _scores(target, "s2")
    _assert_one_line(ei.value, target, "no space left on device", "needed")
    assert target.read_bytes() == before
    assert _temps(tmp_path) == []


@pytest.mark.parametrize(
    "code,needle",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
        (errno.EPERM, "not permitted"),
        (errno.EFBIG, "file too large"),
    ],
)
def test_every_file_system_fault_is_one_error(tmp_path, monkeypatch, code, needle):
    target = tmp_path / "r.json"
    monkeypatch.setattr(A, "_write_bytes", _failing_write(code))
    with pytest.raises(CwaError) as ei:
        A.write_json(target, {"a": 1})
    _assert_one_line(ei.value, target, needle, "choose another output path")
    assert os.listdir(tmp_path) == []


def test_fault_creating_the_temporary_file_is_one_error(tmp_path, monkeypatch):
    def mkstemp(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(A.tempfile, "mkstemp", mkstemp)
    with pytest.raises(CwaError) as ei:
        _h5(tmp_path / "x.h5")
    _assert_one_line(ei.value, tmp_path / "x.h5", "read-only")


def test_other_errors_pass_through_and_clean_up(tmp_path):
    with pytest.raises(ValueError), A.atomic_path(tmp_path / "x.h5") as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("a bug, not a fault of the disk")
    assert os.listdir(tmp_path) == []


def test_h5_is_built_in_memory_and_round_trips(tmp_path):
    """The HDF5 library never writes the file: the image is built in memory and the
    user block (magic + SHA-256 of the rest, hashed in memory) goes in front of it."""
    import hashlib

    import h5py

    calls = []
    real = h5py.File

    def spy(name, mode="r", *a, **kw):
        calls.append((str(name), mode, kw.get("driver"), kw.get("backing_store")))
        return real(name, mode, *a, **kw)

    h5py.File = spy
    try:
        p = A.write_h5(tmp_path / "r.h5", A.PERTURBATION_SCHEMA, {"fingerprint": "f", "k": 3},
                       {"a": np.arange(5), "s": np.array(["x", "yy"], dtype=object)}, doc={"v": [1.0]})
    finally:
        h5py.File = real
    assert calls and all(mode == "w" and drv == "core" and bs is False for _, mode, drv, bs in calls), calls
    raw = p.read_bytes()
    assert raw.startswith(b"CWA-H5-SHA256\n")
    assert raw[14:78].decode() == hashlib.sha256(raw[512:]).hexdigest()
    art = A.read_h5(p)
    assert art.fingerprint == "f" and art.doc == {"v": [1.0]}
    assert art.arrays["a"].tolist() == [0, 1, 2, 3, 4] and art.arrays["s"].tolist() == ["x", "yy"]
    with h5py.File(p, "r") as f:  # an ordinary HDF5 file with a 512-byte user block
        assert f.userblock_size == 512
    assert os.listdir(tmp_path) == ["r.h5"]


# --------------------------------------------------------------------------- 2. stale temporaries


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_name_carries_the_owner_pid(tmp_path):
    with A.atomic_path(tmp_path / "x.h5") as tmp:
        assert tmp.name.startswith(f".x.h5.{os.getpid()}.") and tmp.name.endswith(".tmp"), tmp.name
        tmp.write_bytes(b"1")


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".scores.safetensors.{dead}.ab12cd_3.tmp"
    mine = tmp_path / f".topk.h5.{os.getpid()}.zz99yy00.tmp"
    other = [tmp_path / ".notes.tmp", tmp_path / f".x.{dead}.short.tmp", tmp_path / "keep.tmp"]
    for p in (stale, mine, *other):
        p.write_bytes(b"partial")
    A.write_json(tmp_path / "r.json", {"a": 1})
    assert not stale.exists(), "the dead process's temporary file was left"
    assert mine.exists(), "a live process's temporary file was removed"
    assert all(p.exists() for p in other), "a file that is not a cwa temporary was removed"


def test_stale_temporary_that_someone_still_locks_is_kept(tmp_path):
    """The owner's lock protects a temporary file whose pid is not visible here (another
    host writing into a shared directory)."""
    import fcntl

    held = tmp_path / f".p.h5.{_dead_pid()}.q1w2e3r4.tmp"
    held.write_bytes(b"partial")
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # another process checks it: our lock blocks its lock
        code = ("from pathlib import Path; from cwa import artifacts as A; "
                f"A.write_json(Path({str(tmp_path / 'r.json')!r}), 1)")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        assert held.exists()
    finally:
        os.close(fd)
    A.write_json(tmp_path / "r.json", 2)  # lock released: now it goes
    assert not held.exists()


# --------------------------------------------------------------------------- 3. only regular files


def _special(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"target-{kind}"
    if kind == "directory":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif kind == "device":
        try:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs root")
    elif kind == "symlink":
        (tmp_path / "real.h5").write_bytes(b"the link's target")
        p.symlink_to(tmp_path / "real.h5")
    return p


SPECIALS = ["directory", "fifo", "socket", "device", "symlink"]
NEEDLES = {"directory": "is a directory", "fifo": "FIFO", "socket": "socket",
           "device": "device", "symlink": "symbolic link"}


@pytest.mark.parametrize("kind", SPECIALS)
def test_write_never_replaces_what_is_not_a_regular_file(tmp_path, kind):
    p = _special(tmp_path, kind)
    before = os.lstat(p)
    for write in (lambda: _h5(p), lambda: A.write_json(p, {"a": 1}), lambda: _scores(p)):
        with pytest.raises(UsageError) as ei:
            write()
        assert str(p) in str(ei.value) and NEEDLES[kind] in str(ei.value), str(ei.value)
        assert ei.value.exit_code == 2
    after = os.lstat(p)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert _temps(tmp_path) == []
    if kind == "symlink":
        assert (tmp_path / "real.h5").read_bytes() == b"the link's target"


@pytest.mark.parametrize("kind", SPECIALS)
def test_check_output_refuses_before_any_work(tmp_path, kind):
    p = _special(tmp_path, kind)
    with pytest.raises(UsageError) as ei:
        A.check_output(p, "-o")
    assert str(ei.value).startswith(f"-o {p}: ") and NEEDLES[kind] in str(ei.value), str(ei.value)


def test_check_output_refuses_a_path_under_a_file(tmp_path):
    (tmp_path / "a.h5").write_bytes(b"x")
    for p in (tmp_path / "a.h5" / "x.h5", tmp_path / "a.h5" / "sub" / "x.h5"):
        with pytest.raises(UsageError) as ei:
            A.check_output(p, "-o")
        assert f"{tmp_path / 'a.h5'} is a file" in str(ei.value), str(ei.value)
        with pytest.raises(UsageError):
            A.write_json(p, 1)


def test_check_output_accepts_new_and_cwa_paths(tmp_path):
    assert A.check_output(tmp_path / "new" / "deeper" / "x.h5", "-o") == tmp_path / "new" / "deeper" / "x.h5"
    _h5(tmp_path / "t.h5")
    _scores(tmp_path / "s.safetensors")
    A.write_json(tmp_path / "e.json", {"fingerprint": "x", "cwa_version": "0"})
    (tmp_path / "empty.h5").write_bytes(b"")
    for name in ("t.h5", "s.safetensors", "e.json", "empty.h5"):
        A.check_output(tmp_path / name, "-o")
    (tmp_path / "notes.csv").write_text("a,b\n")
    A.check_output(tmp_path / "notes.csv", "--csv")  # a side output: a report, replaced freely


def _foreign(tmp_path: Path) -> list[Path]:
    import h5py
    from safetensors.torch import save_file

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    model = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(model), metadata={"format": "pt"})
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    js = tmp_path / "mine.json"
    js.write_text('{"my": "data"}\n')
    return [notes, model, plain, js]


def test_a_file_that_is_not_a_cwa_artifact_is_never_overwritten(tmp_path):
    for p in _foreign(tmp_path):
        before = p.read_bytes()
        with pytest.raises(UsageError) as ei:
            A.check_output(p, "-o")
        assert str(ei.value) == f"-o {p}: exists and is not a cwa artifact; choose another output path"
        for write in (lambda p=p: _h5(p), lambda p=p: _scores(p)):
            with pytest.raises(UsageError, match="not a cwa artifact"):
                write()
        with pytest.raises(UsageError, match="not a cwa artifact"):
            A.resolve_output(p, "topk", "f", ".h5")
        assert p.read_bytes() == before


def test_replacing_another_result_says_so(tmp_path, capsys):
    h5, sc = tmp_path / "t.h5", tmp_path / "s.safetensors"
    _h5(h5, "f1")
    _scores(sc, "s1")
    capsys.readouterr()
    _h5(h5, "f1")  # the same result again (--force): no note
    _scores(sc, "s1")
    assert "note:" not in capsys.readouterr().err
    _h5(h5, "f2")
    _scores(sc, "s2")
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: replaced {h5} (it held another result)", f"note: replaced {sc} (it held another result)"]
    A.write_json(tmp_path / "j.json", 1)
    A.write_json(tmp_path / "j.json", 2)  # side outputs: no note
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- 4. cache hits verify


def _flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x5A
    path.write_bytes(bytes(b))


def _scores_data_offset(path: Path) -> int:
    import struct

    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_cache_hit_on_intact_artifacts(tmp_path, capsys):
    sc, h5 = _scores(tmp_path / "s.safetensors", "s1"), _h5(tmp_path / "t.h5", "f1")
    assert A.cached(sc, "s1", A.scores_fingerprint_of)
    assert A.cached(h5, "f1", A.h5_fingerprint_of)
    assert not A.cached(sc, "other", A.scores_fingerprint_of)
    assert not A.cached(tmp_path / "missing.h5", "f1", A.h5_fingerprint_of)
    (tmp_path / "empty.h5").write_bytes(b"")
    assert not A.cached(tmp_path / "empty.h5", "f1", A.h5_fingerprint_of)
    # an intact artifact of another kind is another result, not damage
    assert not A.cached(sc, "s1", A.h5_fingerprint_of)
    assert not A.cached(h5, "f1", A.scores_fingerprint_of)
    assert capsys.readouterr().err == ""


def test_cache_hit_verifies_the_scores_data(tmp_path, capsys):
    """Flipped data bytes (the header intact) used to be a cache hit."""
    sc = _scores(tmp_path / "s.safetensors", "s1", n=300_000)
    _flip(sc, sc.stat().st_size - 5)
    assert A.scores_fingerprint_of(sc) == "s1"  # the header still reads
    assert not A.cached(sc, "s1", A.scores_fingerprint_of)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"note: {sc} is damaged (") and err.endswith("); recomputing"), err
    assert "SHA-256" in err and "\n" not in err


@pytest.mark.parametrize("damage", ["flip-data", "truncate", "bad-header"])
def test_damaged_cwa_artifacts_are_recomputed_with_a_note(tmp_path, capsys, damage):
    sc = _scores(tmp_path / "s.safetensors", "s1")
    h5 = _h5(tmp_path / "t.h5", "f1")
    if damage == "flip-data":
        _flip(sc, _scores_data_offset(sc) + 3)
        _flip(h5, 700)
    elif damage == "truncate":
        for p in (sc, h5):
            p.write_bytes(p.read_bytes()[: p.stat().st_size - 40])
    else:
        raw = sc.read_bytes()
        i = raw.index(b'"data_offsets"')
        sc.write_bytes(raw[:i] + b'"data_offsetz"' + raw[i + 14:])  # the cwa schema still there
        _flip(h5, 520)
    capsys.readouterr()
    assert not A.cached(sc, "s1", A.scores_fingerprint_of)
    assert not A.cached(h5, "f1", A.h5_fingerprint_of)
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2, notes
    for p, line in zip((sc, h5), notes, strict=True):
        assert line.startswith(f"note: {p} is damaged (") and line.endswith("); recomputing"), line
        assert "--force" not in line
    # and the stage's rewrite goes through (a damaged cwa artifact is ours to replace)
    _scores(sc, "s1")
    _h5(h5, "f1")
    assert A.cached(sc, "s1", A.scores_fingerprint_of) and A.cached(h5, "f1", A.h5_fingerprint_of)


def test_cache_refuses_a_file_that_is_not_a_cwa_artifact(tmp_path):
    for p in _foreign(tmp_path):
        for opener in (A.scores_fingerprint_of, A.h5_fingerprint_of):
            with pytest.raises(UsageError, match="not a cwa artifact"):
                A.cached(p, "f", opener)


def test_cache_refuses_what_is_not_a_regular_file(tmp_path):
    for kind in ("directory", "fifo", "symlink"):
        with pytest.raises(UsageError, match=NEEDLES[kind]):
            A.cached(_special(tmp_path, kind), "f", A.h5_fingerprint_of)


def test_verify_streams_every_tensor(tmp_path):
    sc = _scores(tmp_path / "s.safetensors", "s1", n=50_000)
    A.open_scores(sc).verify()
    _flip(sc, sc.stat().st_size - 1)  # the last byte: tensor order in the file is not param order
    with pytest.raises(ArtifactError, match="SHA-256"):
        A.open_scores(sc).verify()


# --------------------------------------------------------------------------- 5. bounded reading


def _sealed_h5(path: Path, build) -> Path:
    """An HDF5 file made with h5py directly, sealed with cwa's user block (a valid hash)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        f.attrs["cwa.schema"] = A.SELECTION_SCHEMA
        f.attrs["fingerprint"] = "x"
        build(f)
    A._seal_userblock(path)
    A._verify_userblock(path)
    return path


def _gzip_bomb(path: Path) -> Path:
    """1 GiB of zeros, gzip'd into about 1 MB."""
    chunk = 1 << 20
    z = zlib.compress(bytes(chunk), 9)

    def build(f):
        d = f.create_dataset("bomb", shape=(1 << 30,), dtype="u1", chunks=(chunk,), compression="gzip")
        for i in range(1024):
            d.id.write_direct_chunk((i * chunk,), z)

    return _sealed_h5(path, build)


def test_compressed_dataset_is_refused_before_reading(tmp_path):
    p = _gzip_bomb(tmp_path / "bomb.h5")
    assert p.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError) as ei:
        A.read_h5(p)
    assert time.perf_counter() - t0 < 5
    assert "'bomb'" in str(ei.value) and "compressed" in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("layout", ["chunked", "unallocated-1GiB", "external"])
def test_datasets_cwa_never_writes_are_refused(tmp_path, layout):
    def build(f):
        if layout == "chunked":
            f.create_dataset("d", data=np.arange(100), chunks=(10,))
        elif layout == "unallocated-1GiB":  # never written: reading makes 1 GiB of fill value
            f.create_dataset("d", shape=(1 << 30,), dtype="u1")
        else:
            (tmp_path / "outside.bin").write_bytes(bytes(800))
            f.create_dataset("d", shape=(100,), dtype="i8", external=[(str(tmp_path / "outside.bin"), 0, 800)])

    p = _sealed_h5(tmp_path / f"{layout}.h5", build)
    with pytest.raises(ArtifactError, match="dataset 'd'"):
        A.read_h5(p)


def test_variable_length_strings_are_bounded_by_the_file(tmp_path):
    import h5py

    names = [f"p{i}" * 100 for i in range(10)]
    p = _sealed_h5(tmp_path / "s.h5", lambda f: f.create_dataset("params", data=np.array(names, dtype=h5py.string_dtype())))
    assert A.read_h5(p).arrays["params"].tolist() == names
    with h5py.File(p, "r") as f:  # were the file 1000 bytes, these strings would not fit in it
        assert A._read_dataset(p, "params", f["params"], 10_000).tolist() == names
        with pytest.raises(ArtifactError, match="dataset 'params' holds more string data than the file"):
            A._read_dataset(p, "params", f["params"], 1000)


def test_doc_that_is_not_json_is_an_artifact_error(tmp_path):
    p = _sealed_h5(tmp_path / "d.h5", lambda f: f.attrs.__setitem__("cwa.doc", "{not json"))
    with pytest.raises(ArtifactError, match="malformed cwa.doc"):
        A.read_h5(p)


def test_written_artifacts_still_read(tmp_path):
    """What cwa writes passes the new checks (compact, contiguous, strings, empty)."""
    p = A.write_h5(tmp_path / "w.h5", A.STABILITY_SCHEMA, {"fingerprint": "f"},
                   {"e": np.zeros(0), "m": np.ones((3, 4)), "s": np.array(["a", "b"], dtype=object),
                    "x": np.float32(2.5)}, doc=[1, "two"])
    art = A.read_h5(p)
    assert art.arrays["m"].shape == (3, 4) and art.arrays["e"].shape == (0,) and art.doc == [1, "two"]


def test_cwa_info_on_a_gzip_bomb_is_one_line_and_small(tmp_path):
    """`cwa info` on a 1 MB file holding a gzip'd 1 GiB dataset: one error line, exit 1,
    and a small peak RSS (it was 1.1 GB). Measured in a wrapper process whose only child
    is `cwa info` (RUSAGE_CHILDREN is the maximum over every child it waited for)."""
    p = _gzip_bomb(tmp_path / "bomb.h5")
    wrapper = (
        "import os, resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'cwa', 'info', sys.argv[1]], capture_output=True, text=True)\n"
        "sys.stdout.write(repr((r.returncode, r.stdout, r.stderr, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, str(p)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    rc, stdout, stderr, maxrss_kb = ast.literal_eval(out.stdout)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert rc == 1 and stdout == "" and len(lines) == 1, (rc, stdout, stderr)
    assert lines[0].startswith("error: ") and "bomb.h5" in lines[0] and "'bomb'" in lines[0], lines[0]
    peak_mb = maxrss_kb / 1024
    print(f"peak RSS of cwa info on the gzip bomb: {peak_mb:.0f} MB")
    assert peak_mb < 400, f"cwa info peaked at {peak_mb:.0f} MB"


def test_input_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO given as an input is refused; reading it would block forever."""
    import threading

    fifo = _special(tmp_path, "fifo")
    for read in (A.read_h5, A.open_scores):
        got: list[BaseException | None] = []

        def run(read=read, got=got):
            try:
                read(fifo)
                got.append(None)
            except BaseException as e:  # noqa: BLE001 - reported below
                got.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():  # unblock the reader, then fail
            os.close(os.open(fifo, os.O_WRONLY))
            t.join(10)
            pytest.fail(f"{read.__name__} blocked on a FIFO")
        assert isinstance(got[0], ArtifactError) and "not a regular file" in str(got[0]), got
