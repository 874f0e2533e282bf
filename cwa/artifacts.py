"""Artifacts: the files stages read and write. The only module that imports h5py and
safetensors.

- Scores (`scores/1`): a `.safetensors` file, one tensor per scored parameter, string
  metadata (SPEC list). Read one tensor (or one row-chunk of a tensor) at a time.
- Selections (`selection/1`), perturbation results (`perturbation/1`) and stability
  (`stability/1`): HDF5 files with root attributes, datasets, and a JSON document.

Writing. Every write goes through `atomic_path`: a temporary file
`.{name}.{pid}.{random}.tmp` in the target directory, renamed into place, so an
interrupted stage leaves nothing half-written. Around that one mechanism:

- Faults of the file system (no space, quota, read-only, permission, file too large, I/O
  error) while writing any artifact, JSON or text file, including safetensors' own write
  errors caused by them, become one `CwaError` line naming the path and the fix; the
  temporary file is removed and a file already at the path is left as it was. HDF5
  files are built in memory (h5py's core driver, no backing store) and written with
  ordinary Python I/O, so the HDF5 library never sees a full disk (it used to crash).
- Temporary files whose owner died without cleaning up (SIGKILL, power loss) are
  removed by the next write into that directory: the owner's pid is in the name and
  the owner holds an advisory lock on the file while it lives, so a file is removed
  only when that pid is gone and nobody holds the lock (another host on a shared file
  system holds it).
- What is at the target must be a regular file (or nothing): a directory, FIFO, device,
  socket or symbolic link is refused (`UsageError`) before any work, and so is a path
  under an existing file. A primary artifact (`-o`) never replaces a file that is not a
  cwa artifact (a user's own model or notes); replacing another cwa result says so on
  stderr. `check_output` runs these checks up front; `resolve_output` and
  `atomic_path` run them too.

Reading. HDF5 files carry a 512-byte user block holding a magic string and the SHA-256 of
everything after it; the hash is checked before h5py opens the file, so a corrupted file
is a clean `ArtifactError`, never a crash inside the HDF5 library. Reading is bounded by
what cwa writes: uncompressed, contiguous datasets no larger than the file, so a small
file cannot expand into gigabytes. Scores carry per-tensor SHA-256s in `cwa.sha256`,
verified whenever a tensor is read (whole, or streamed: checked after its last piece) and
on every cache hit (`cached`): a damaged cached artifact is recomputed with a note. A
scores file this machine has verified in full is trusted while it is unchanged (same
device, inode, size, mtime and ctime, and the same recorded hashes; `cwa.memo`), so
ranking it again reads it once instead of hashing it again; `verify(force=True)` hashes
it regardless. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import itertools
import json
import math
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa import __version__, memo
from cwa.console import log
from cwa.errors import ArtifactError, CwaError, UsageError

SCORES_SCHEMA = "scores/1"
SELECTION_SCHEMA = "selection/1"
PERTURBATION_SCHEMA = "perturbation/1"
STABILITY_SCHEMA = "stability/1"

_SCORE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # safetensors names

_USERBLOCK = 512
_MAGIC = b"CWA-H5-SHA256\n"

DEFAULT_OUT_DIR = Path("cwa-out")


# --------------------------------------------------------------------------- helpers


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of obj (sorted keys)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def stage_fingerprint(stage: str, **parts: Any) -> str:
    """Fingerprint of a stage: its name, input fingerprints, model/data fingerprints and
    every option that changes the result (callers leave out batch size, device, verbosity)."""
    return stable_hash({"stage": stage, **parts})


def json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"; numpy scalars
    and arrays become Python values."""
    import math

    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if np is not None:
        if isinstance(obj, np.ndarray):
            return json_safe(obj.tolist())
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            obj = float(obj)
        if isinstance(obj, np.bool_):
            return bool(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------- writing


# errno of a write the user can fix by freeing space or choosing another path
_WRITE_FAULTS = {
    errno.ENOSPC: "no space left on device while writing{need}; free space or choose another output path",
    errno.EFBIG: "file too large for this file system{need}; choose another output path",
    errno.EROFS: "the file system is read-only; choose another output path",
    errno.EACCES: "permission denied writing in {dir}; choose another output path or fix its permissions",
    errno.EPERM: "operation not permitted writing in {dir}; choose another output path or fix its permissions",
    errno.EIO: "input/output error while writing (the storage failed); check the disk or choose another output path",
}
if hasattr(errno, "EDQUOT"):
    _WRITE_FAULTS[errno.EDQUOT] = (
        "disk quota exceeded while writing{need}; free space or choose another output path"
    )
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) reports errno


def _write_fault(e: BaseException) -> int | None:
    """The errno of a file-system fault behind `e` (an OSError, or an error of a library
    such as safetensors that reports "(os error N)"), or None."""
    if isinstance(e, OSError):
        return e.errno if e.errno in _WRITE_FAULTS else None
    if isinstance(e, Exception):
        m = _OS_ERROR_IN_TEXT.search(str(e))
        if m and int(m.group(1)) in _WRITE_FAULTS:
            return int(m.group(1))
    return None


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
    return ""  # pragma: no cover


def _fault_error(target: Path, code: int, size: int | None) -> CwaError:
    directory = target.parent if str(target.parent) else Path(".")
    need = ""
    if code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)) and size:
        need = f"{_human(size)} needed"
        with contextlib.suppress(OSError):
            import shutil

            need += f", {_human(shutil.disk_usage(_existing_dir(directory)).free)} free"
        need = f" ({need})"
    return CwaError(f"{target}: " + _WRITE_FAULTS[code].format(need=need, dir=directory))


def _existing_dir(p: Path) -> Path:
    """`p` or its nearest existing ancestor."""
    for q in (p, *p.parents):
        if q.is_dir():
            return q
    return Path(".")


@contextlib.contextmanager
def atomic_path(
    target: str | os.PathLike, *, size: int | None = None, artifact: bool = False
) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` on success,
    delete it on any failure (including KeyboardInterrupt / SystemExit).

    Before anything is created, `target` is checked like `check_output` (with
    `artifact`: an existing file must be a cwa artifact). A file-system fault while
    writing (full disk, quota, read-only, permission, file too large, I/O error) is
    raised as one `CwaError` line naming the path and the fix; `size`, the bytes the
    write needs, goes into that line. Stale temporary files of dead processes in the
    target directory are removed first (see `_remove_stale_temps`).
    """
    target = Path(target)
    _check_target(target, str(target), artifact=artifact)
    fd = -1
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target.parent)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name[:180]}.{os.getpid()}.", suffix=".tmp", dir=target.parent
        )
    except OSError as e:
        code = _write_fault(e)
        if code is None:
            raise
        raise _fault_error(target, code, size) from e
    _hold_lock(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.fsync(fd)  # fsync flushes the file, whichever descriptor wrote it
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.close(fd)  # first: an open descriptor keeps the space of an unlinked file
        fd = -1
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        code = _write_fault(e)
        if code is None:
            raise
        raise _fault_error(target, code, size) from e
    finally:
        if fd >= 0:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# .{name}.{pid}.{8 random characters of mkstemp}.tmp
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")


def _hold_lock(fd: int) -> None:
    """Hold an advisory lock on our temporary file while this process lives (the kernel
    drops it when the process dies, however it dies)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can check: keep the file
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale_temps(directory: Path) -> list[Path]:
    """Remove `.NAME.PID.XXXXXXXX.tmp` files in `directory` left by a process that is
    gone (killed before it could clean up); returns what was removed.

    A file is removed only when its pid is not a live process here and nobody holds its
    lock (its owner, possibly on another host sharing the directory, keeps one while it
    writes). POSIX only; failures are ignored (this is housekeeping)."""
    removed: list[Path] = []
    if os.name != "posix":
        return removed
    try:
        import fcntl

        entries = list(os.scandir(directory))
    except (ImportError, OSError):
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive somewhere
            except OSError:
                pass  # no locks on this file system: the pid decides
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _write_bytes(path: Path, *parts: bytes | bytearray | memoryview) -> None:
    """Write `parts` into `path` with ordinary Python I/O (a full disk is an OSError)."""
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    with atomic_path(path, size=len(data)) as tmp:
        _write_bytes(tmp, data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, dumps(obj) + "\n")


def default_output(stage: str, fingerprint: str, ext: str, out_dir: Path | None = None) -> Path:
    """Content-derived default output name under ./cwa-out/."""
    return Path(out_dir or DEFAULT_OUT_DIR) / f"{stage}-{fingerprint[:16]}{ext}"


# --------------------------------------------------------------------------- output checks

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_output(
    path: str | os.PathLike,
    flag: str = "-o",
    *,
    artifact: bool | None = None,
    ext: str | None = None,
) -> Path:
    """Refuse, before any work, an output path cwa must not write (`UsageError`, exit 2,
    naming `flag` and the path): an existing directory, FIFO, device, socket or symbolic
    link; a path under an existing file (`-o a.h5/x.h5`: a.h5 is a file). With
    `artifact` (default: for `-o`/`--output`, the primary artifact), an existing
    non-empty file must be a cwa artifact (HDF5 with cwa's user block, safetensors with
    a cwa schema, a cwa JSON report); anything else — a user's model.safetensors or
    notes.txt — is never overwritten. A directory where nothing can be written
    (read-only file system, no permission) is a `CwaError` (exit 1) now rather than after
    the computation. Returns the path."""
    path = Path(path)
    if artifact is None:
        artifact = flag in ("-o", "--output")
    label = f"{flag} {path}" if flag else str(path)
    kind = _check_target(path, label, artifact=artifact, ext=ext)
    if kind is None:
        _check_writable_dir(path)
    return path


def _check_target(path: Path, label: str, *, artifact: bool, ext: str | None = None) -> str | None:
    """The checks of `check_output` except writability; returns what is at `path`
    (`_sniff`), or None when nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError:
        return None  # unreadable here: let the write report it
    if st is None:
        _check_parents(path, label)
        return None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise UsageError(
            f"{label}: is a symbolic link; cwa does not write through links, give the path of a regular file"
        )
    if stat.S_ISDIR(mode):
        hint = f" ending in {ext}" if ext else ""
        raise UsageError(f"{label}: is a directory; give a file path{hint}")
    for test, what in _SPECIAL:
        if test(mode):
            raise UsageError(f"{label}: is {what}, not a regular file; choose another output path")
    kind = _sniff(path)
    if artifact and kind == "foreign":
        raise UsageError(f"{label}: exists and is not a cwa artifact; choose another output path")
    return kind


def _check_parents(path: Path, label: str) -> None:
    for parent in path.parents:  # nearest first
        try:
            pst = os.stat(parent)
        except NotADirectoryError:
            continue  # a file further up; found below
        except FileNotFoundError:
            if os.path.islink(parent):
                raise UsageError(f"{label}: {parent} is a broken symbolic link; choose another output path") from None
            continue
        except OSError:
            return
        if not stat.S_ISDIR(pst.st_mode):
            raise UsageError(f"{label}: {parent} is a file, not a directory; choose another output path")
        return


def _check_writable_dir(path: Path) -> None:
    """A CwaError now when nothing can be created in the directory `path` would go in."""
    d = _existing_dir(path.parent if str(path.parent) else Path("."))
    code = None
    with contextlib.suppress(OSError, AttributeError):
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            code = errno.EROFS
    if code is None and not os.access(d, os.W_OK | os.X_OK):
        code = errno.EACCES
    if code is not None:
        raise _fault_error(path, code, None)


def check_free_space(path: str | os.PathLike, need: int, what: str, fixes: str) -> None:
    """Before any work: a `CwaError` naming `what`, the bytes needed and free, and
    `fixes`, when the file system `path` goes to has less than `need` bytes free (what
    is already at `path` counts as free: it is replaced)."""
    import shutil

    path = Path(path)
    d = _existing_dir(path.parent if str(path.parent) else Path("."))
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return  # cannot tell: the write reports a real shortage
    with contextlib.suppress(OSError):
        if path.is_file():
            free += path.stat().st_size
    if need > free:
        raise CwaError(
            f"{what}: needs {_human(need)} on {d} but {_human(free)} is free; {fixes}"
        )


def _sniff(path: Path) -> str:
    """What a regular file is: "empty", "h5" (cwa's HDF5 user block), "scores" (a
    safetensors file whose header names a cwa schema, intact or not), "json" (a cwa JSON
    report) or "foreign" (anything else). Reads at most the header."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty"
        with open(path, "rb") as f:
            head = f.read(max(len(_MAGIC), 8))
            if head.startswith(_MAGIC):
                return "h5"
            if head[:1] == b"{":
                f.seek(0)
                text = f.read(4 << 20)
                return "json" if b'"cwa_version"' in text or b'"fingerprint"' in text else "foreign"
            if len(head) >= 8:
                (n,) = struct.unpack("<Q", head[:8])
                f.seek(8)
                header = f.read(min(n, size - 8, 100 << 20))
                if b'"cwa.schema"' in header:
                    return "scores"
    except OSError:
        pass
    return "foreign"


# --------------------------------------------------------------------------- reading


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected an artifact file")
    if not path.is_file():  # a FIFO would block the read forever
        raise ArtifactError(f"{path}: is not a regular file, expected an artifact file")


def _held_fingerprint(path: Path) -> str | None:
    """The fingerprint of the cwa result at `path`: "" when it cannot be read (damaged),
    None when there is nothing (no file, an empty one)."""
    try:
        kind = _sniff(path) if path.is_file() else None
    except OSError:
        return None
    if kind in (None, "empty"):
        return None
    try:
        if kind == "h5":
            return read_h5(path).fingerprint
        if kind == "scores":
            return open_scores(path).fingerprint
    except Exception:
        return ""
    return ""


def _note_replaced(path: Path, held: str | None, fingerprint: str | None) -> None:
    """The SPEC's note when a primary artifact replaced another result (not for a
    damaged file, already reported by `cached`, nor for a recompute of the same one)."""
    if held and held != (fingerprint or ""):
        log(f"note: replaced {path} (it held another result)")


# --------------------------------------------------------------------------- scores


def write_scores(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    *,
    dtype: str = "float32",
) -> Path:
    """Write a scores artifact. `tensors` in param order; `meta` values are JSON-encoded
    unless already strings. Adds schema, param order, per-tensor hashes, version, time."""
    import torch
    from safetensors.torch import save_file

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {}
    hashes = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", tdtype).contiguous()
        out[name] = t
        hashes[name] = _tensor_sha(t)
    md = {k: v if isinstance(v, str) else json.dumps(json_safe(v)) for k, v in meta.items()}
    md.update(
        {
            "cwa.schema": SCORES_SCHEMA,
            "cwa.param_order": json.dumps(list(tensors)),
            "cwa.sha256": json.dumps(hashes),
            "cwa.version": __version__,
            "cwa.created": now_iso(),
            "cwa.score_dtype": dtype,
        }
    )
    path = Path(path)
    held = _held_fingerprint(path)
    size = sum(t.numel() * t.element_size() for t in out.values()) + len(json.dumps(md))
    with atomic_path(path, size=size, artifact=True) as tmp:
        save_file(out, str(tmp), metadata=md)  # its I/O errors say "(os error N)"
    _note_replaced(path, held, md.get("cwa.fingerprint"))
    return path


def _tensor_sha(t) -> str:
    import torch

    if not t.numel():
        return hashlib.sha256(b"").hexdigest()
    # hash the bytes in place (a uint8 view), never a copy of a possibly huge tensor
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# safetensors dtype names -> torch dtype names (scores are float32, bfloat16 or float16)
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_READ_BLOCK = 64 << 20  # bytes per read() call
# Largest piece `chunks()` yields. Measured ranking 1e9 float32 scores (top-K + statistics,
# benchmarks/RESULTS.md): 2^20-entry pieces (4 MB) run the top-K 2x faster than 2^24 ones
# (cache-sized temporaries, cheaper first selections) and keep the consumer's temporaries
# small; statistics take the same time.
PIECE_ELEMS = 1 << 20
# Bytes per memory-mapped window of `ScoresFile.chunks(reuse=True)`; 0: plain reads.
# One pass over a 4 GB file with one reduction per 2 MB (benchmarks/RESULTS.md, sixth
# round; 4 alternating rounds in one process): windows of 4 MB 0.69-0.83 s, 16 MB
# 0.62-0.78 s, 64 MB 0.61-0.79 s, plain reads 0.83-1.43 s (a bare read 0.58-0.67 s);
# the resident set holds about two windows.
MAP_BYTES = 16 << 20
# RSS growth (since the last release) after which `chunks()` hands freed heap memory back
# to the OS (see `_ReleaseFreedHeap`).
TRIM_BUDGET_BYTES = 128 << 20
# The RSS is looked at no more often than this (a consumer allocates far less than the
# budget in that time).
CHECK_EVERY_S = 0.01


class _ReleaseFreedHeap:
    """Hand freed heap memory back to the OS once the RSS has grown past a budget.

    A consumer of `chunks()` allocates and frees temporaries of a chunk's size over and
    over. glibc serves blocks under its (self-raising, up to 32 MB) mmap threshold from
    the heap, and small long-lived objects allocated in between pin the freed space, so
    the resident set creeps up by megabytes per chunk although live memory stays flat
    (measured: 260 MB -> 700 MB over 100 chunks of a ranking pass). `malloc_trim(0)`
    returns those free pages. It is called only when the RSS has grown by
    `TRIM_BUDGET_BYTES` over the RSS after the previous trim (process-wide, so the floor
    does not ratchet up from one tensor's stream to the next); memory the process really
    keeps raises the floor after one trim. A no-op where glibc is not the allocator.
    """

    trim = None
    page = 4096
    floor: int | None = None
    last = -math.inf

    @classmethod
    def _init(cls) -> None:
        cls.trim = False
        if not os.path.exists("/proc/self/statm"):
            return
        try:
            import ctypes

            cls.trim = ctypes.CDLL("libc.so.6").malloc_trim
            cls.page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            cls.trim = False

    @classmethod
    def _rss(cls) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * cls.page
        except (OSError, ValueError, IndexError):
            return None

    @classmethod
    def check(cls) -> None:
        if cls.trim is None:
            cls._init()
        if not cls.trim:
            return
        now = time.monotonic()
        if now - cls.last < CHECK_EVERY_S:  # reading the RSS costs 30 us, a 1 MB piece 100 us
            return
        cls.last = now
        rss = cls._rss()
        if rss is None:
            return
        if cls.floor is None or rss < cls.floor:
            cls.floor = rss
        elif rss - cls.floor > TRIM_BUDGET_BYTES:
            cls.trim(0)
            cls.floor = cls._rss() or rss


class Scores:
    """Scores of every scored weight: `names` in param order, one float32 tensor each,
    and the provenance of record, `meta` (the `cwa.*` strings a scores file carries).

    What `cwa.score` returns, in memory; `open_scores` returns a `ScoresFile`, the same
    interface read lazily from disk. `save(path)` writes the scores artifact; opening it
    gives back the same fingerprint, metadata and tensors."""

    model = None  # the LoadedModel the scores were computed on, in memory only (never saved)

    def __init__(self, tensors: dict[str, Any], meta: dict[str, str], *, path: Path | None = None) -> None:
        self._tensors = dict(tensors)
        self.meta = dict(meta)
        self.names = list(self._tensors)
        self.shapes = {n: tuple(int(x) for x in t.shape) for n, t in self._tensors.items()}
        self.path = path

    def __repr__(self) -> str:
        n = sum(self.numel(x) for x in self.names)
        return f"Scores(metric={self.metric!r}, seed={self.seed}, tensors={len(self.names)}, weights={n:,})"

    @property
    def metric(self) -> str:
        return self.meta.get("cwa.metric", "")

    @property
    def fingerprint(self) -> str:
        return self.meta.get("cwa.fingerprint", "")

    @property
    def model_fingerprint(self) -> str:
        return self.meta.get("cwa.model_fingerprint", "")

    @property
    def seed(self) -> int:
        """The seed the scores were computed with (every selection made from them carries it)."""
        try:
            return int(self.meta.get("cwa.seed", "0"))
        except ValueError:
            raise ArtifactError(f"{self.path}: cwa.seed {self.meta.get('cwa.seed')!r} is not an integer") from None

    @property
    def score_dtype(self) -> str:
        return self.meta.get("cwa.score_dtype") or self.json_meta("cwa.options", {}).get("score_dtype", "float32")

    def json_meta(self, key: str, default: Any = None) -> Any:
        v = self.meta.get(key)
        if v is None:
            return default
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def get(self, name: str, verify: bool = True):
        """The whole tensor as float32."""
        return self._tensors[name]

    def __getitem__(self, name: str):
        return self.get(name)

    def chunks(
        self, name: str, chunk_elems: int = 1 << 24, verify: bool = True, reuse: bool = False,
        start: int = 0, stop: int | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Views of the tensor in memory, of flat entries [start, stop) (``reuse`` changes
        nothing: no buffer is read)."""
        from cwa.ranking import iter_chunks

        yield from iter_chunks(self.get(name), chunk_elems, start, stop)

    def sample_runs(self, name: str, starts: list[int], length: int):
        """float32 runs of `length` entries of the flat tensor from each start, concatenated
        (a sample of it; ranking uses one to seed its threshold). Unverified."""
        from cwa.ranking import flat_runs

        return flat_runs(self.get(name), starts, length)

    def verify(self) -> None:
        """In memory there is nothing to verify (a file checks its tensors' SHA-256)."""

    def tensors(self) -> dict[str, Any]:
        """name -> float32 tensor, every tensor (a file reads them all)."""
        return {n: self.get(n) for n in self.names}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores artifact (atomically; the stored dtype is `score_dtype`)."""
        keep = {k: v for k, v in self.meta.items() if k not in _WRITTEN_META}
        return write_scores(path, self.tensors(), keep, dtype=self.score_dtype)

    def to_pandas(self):
        """One row per scored tensor: param, shape, numel, min, max, mean, n_zero."""
        import pandas as pd

        rows = []
        for n in self.names:
            t = self.get(n)
            rows.append({
                "param": n, "shape": tuple(self.shape(n)), "numel": self.numel(n),
                "min": float(t.min()) if t.numel() else float("nan"),
                "max": float(t.max()) if t.numel() else float("nan"),
                "mean": float(t.double().mean()) if t.numel() else float("nan"),
                "n_zero": int((t == 0).sum()),
            })
        return pd.DataFrame(rows)


# metadata `write_scores` adds itself (recomputed on every save)
_WRITTEN_META = ("cwa.schema", "cwa.param_order", "cwa.sha256", "cwa.version", "cwa.created", "cwa.score_dtype")


@dataclass(repr=False)
class ScoresFile(Scores):
    """A scores artifact opened lazily: `names` in param order, one tensor at a time.

    Tensors are read with explicit file reads at the offsets of the safetensors header
    into freshly allocated buffers, or, for `chunks(reuse=True)` (a consumer that keeps
    no piece), through memory maps of one window of the file at a time: pages of a
    mapped file that have been touched count in the process's resident set until it is
    unmapped, so one map of a 4 GB file would look like a 4 GB process, and a window is
    unmapped as soon as its pieces are gone. `chunks()` therefore holds about one chunk
    (or two windows) at a time, and `get()` exactly one tensor.
    """

    path: Path
    meta: dict[str, str]
    names: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # name -> (safetensors dtype, first byte, end byte) in the file; empty: use safe_open
    layout: dict[str, tuple[str, int, int]] = field(default_factory=dict, repr=False)
    _verified: set[str] = field(default_factory=set, repr=False)
    _hashes: dict[str, str] | None = field(default=None, repr=False)
    # the file's stamp when opened and the time of that (see `_recall`), and whether the
    # verification memo has been consulted or written for it
    _stamp: dict | None = field(default=None, repr=False)
    _opened_ns: int = field(default=0, repr=False)
    _memo_done: bool = field(default=False, repr=False)

    def _recall(self) -> None:
        """Mark every tensor verified when this machine verified the file before and its
        stamp (device, inode, size, mtime, ctime) and recorded hashes are unchanged since
        (`cwa.memo`): hashing unchanged bytes again costs about seven reads of the file
        on two cores (benchmarks/RESULTS.md), each time the scores are ranked."""
        st, key = self._stat()
        if st is None:
            return
        self._stamp, self._opened_ns = memo.stamp(st), time.time_ns()
        entry = memo.read_memo(_verified_memo_path()).get(key)
        if (isinstance(entry, dict) and entry.get("stamp") == self._stamp
                and entry.get("hashes") == self._hashes_digest()):
            self._verified.update(n for n in self.names if self._hash_of(n) is not None)
            self._memo_done = True

    def _stat(self) -> tuple[os.stat_result | None, str]:
        """The file's stat and real path (the memo's key); None when it cannot be stat'ed."""
        try:
            return os.stat(self.path), os.path.realpath(self.path)
        except OSError:
            return None, ""

    def _hashes_digest(self) -> str:
        return hashlib.sha256(self.meta.get("cwa.sha256", "").encode()).hexdigest()

    def _remember(self) -> None:
        """Record the file as verified once every tensor with a hash has been checked,
        the file is unchanged since it was opened, and it was older than 2 s then."""
        if self._memo_done or self._stamp is None:
            return
        if any(n not in self._verified for n in self.names if self._hash_of(n) is not None):
            return
        self._memo_done = True
        st, key = self._stat()
        if st is not None and memo.stamp(st) == self._stamp and memo.old_enough(st, self._opened_ns):
            entry = {"stamp": self._stamp, "hashes": self._hashes_digest()}
            memo.write_memo(_verified_memo_path(), key, entry)

    def _hash_of(self, name: str) -> str | None:
        if self._hashes is None:
            h = self.json_meta("cwa.sha256") or {}
            self._hashes = h if isinstance(h, dict) else {}
        return self._hashes.get(name)

    def _check_hash(self, name: str, digest: str) -> None:
        if digest != self._hash_of(name):
            raise ArtifactError(
                f"{self.path}: tensor {name!r} does not match its recorded SHA-256 "
                "(file corrupted); recompute it with --force"
            )
        self._verified.add(name)
        self._remember()

    def _unverified(self, name: str) -> bool:
        """Whether reading the tensor will hash it: a hash is recorded, not yet checked."""
        return name not in self._verified and self._hash_of(name) is not None

    def needs_hashing(self) -> bool:
        """Whether reading the tensors will hash some (`_unverified`)."""
        return any(self._unverified(n) for n in self.names)

    def _readable(self, name: str) -> bool:
        return name in self.layout and self.layout[name][0] in _ST_DTYPES

    def _read(self, f, name: str, start: int, count: int, out=None):
        """`count` stored values of `name` from flat index `start`, in the stored dtype
        (into ``out`` when given: a contiguous tensor of that dtype and size)."""
        import torch

        st_dtype, begin, end = self.layout[name]
        dtype = getattr(torch, _ST_DTYPES[st_dtype])
        if out is None:
            out = torch.empty(count, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy())
        item = out.element_size()
        off = begin + start * item
        if off + count * item > end:
            raise ArtifactError(f"{self.path}: read past the end of tensor {name!r}")
        f.seek(off)
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got : got + _READ_BLOCK])
            if not n:
                raise ArtifactError(f"{self.path}: tensor {name!r} is truncated")
            got += n
        return out

    def sample_runs(self, name: str, starts: list[int], length: int):
        """float32 runs of `length` entries from each flat start, concatenated, read from
        the file without reading the rest (unverified: a sample only steers how ranking
        filters; the pass over the whole tensor verifies it). None when the stored dtype
        is not read directly."""
        import torch

        if not self._readable(name):
            return None
        n = self.numel(name)
        parts = []
        with open(self.path, "rb", buffering=0) as f:
            for s in starts:
                count = min(length, n - s)
                if count > 0:
                    parts.append(self._read(f, name, s, count).to(torch.float32))
        return torch.cat(parts) if parts else torch.zeros(0)

    def get(self, name: str, verify: bool = True):
        """The whole tensor as float32 (hash-verified when the file carries hashes)."""
        import torch

        if not self._readable(name):
            return self._get_safe_open(name, verify)
        with open(self.path, "rb", buffering=0) as f:
            t = self._read(f, name, 0, self.numel(name))
        if verify and self._unverified(name):
            self._check_hash(name, _tensor_sha(t))
        return t.to(torch.float32).reshape(self.shapes[name])

    def _get_safe_open(self, name: str, verify: bool):
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{self.path}: cannot read tensor {name!r}: {e}") from None
        if verify and self._hash_of(name) is not None:
            self._check_hash(name, _tensor_sha(t))
        return t.to(torch.float32)

    def verify(self, force: bool = False) -> None:
        """Check every tensor against its recorded SHA-256 (`ArtifactError` on the first
        mismatch or truncation), streaming the raw bytes through one 16 MB buffer;
        tensors without a recorded hash are skipped. What a cache hit checks. Tensors
        already verified (in this process, or by the memo for an unchanged file) are
        skipped unless `force`."""
        if force:
            self._verified.clear()
            self._memo_done = False
        buf = None
        with open(self.path, "rb", buffering=0) as f:
            for name in self.names:
                if not self._unverified(name):
                    continue
                if not self._readable(name):
                    self.get(name)  # verified on the way
                    continue
                _, begin, end = self.layout[name]
                if buf is None:
                    buf = memoryview(bytearray(1 << 24))
                h = hashlib.sha256()
                f.seek(begin)
                left = end - begin
                while left:
                    n = f.readinto(buf[: min(left, len(buf))])
                    if not n:
                        raise ArtifactError(f"{self.path}: tensor {name!r} is truncated")
                    h.update(buf[:n])
                    left -= n
                self._check_hash(name, h.hexdigest())

    def chunks(
        self, name: str, chunk_elems: int = 1 << 24, verify: bool = True, reuse: bool = False,
        start: int = 0, stop: int | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Yield (flat_offset, float32 1-D tensor) pieces of a tensor, at most `chunk_elems`
        values each, so that peak memory is about one chunk whatever the tensor's size.
        ``start``/``stop``: only flat entries [start, stop), pieces starting at ``start``
        (ranking reads spans of a tensor on several threads); a part of a tensor cannot be
        hash-checked, so with `verify` a part of a tensor not yet verified is refused.

        Pieces are at most `PIECE_ELEMS` values whatever `chunk_elems` asks (smaller
        pieces are as exact and faster to process). Each piece is a new tensor (a consumer
        may keep it), unless `reuse`: then the pieces are views of a memory-mapped window
        of the file (`_mapped_raws`; with `MAP_BYTES` 0, two buffers read into in turn,
        a piece overwritten when the next-but-one is read), and the consumer copies what
        it keeps. A fresh 4 MB buffer per piece costs a page fault per 4 KB whenever the
        allocator has handed the previous one back to the OS, which it does or not by
        chance of heap layout: one read of a 4 GB file took 0.45 s or 2.1 s (49 K or 685 K
        page faults) from run to run; reused buffers fault once. With `verify`, the
        SHA-256 of a tensor not yet verified is computed along the way and checked after
        its last piece (an `ArtifactError` then ends the iteration); later passes skip it.
        """
        import torch

        n = self.numel(name)
        step = max(1, min(int(chunk_elems), PIECE_ELEMS))
        start, stop = int(start), n if stop is None else min(int(stop), n)
        whole = start == 0 and stop == n
        if verify and not whole and self._unverified(name):
            raise ValueError(f"{self.path}: a part of tensor {name!r} cannot be verified; "
                             "verify() the file first")
        if not self._readable(name) or (whole and n <= step):  # the whole tensor at once
            if start < stop:
                flat = self.get(name, verify=verify).reshape(-1)
                yield start, flat if whole else flat[start:stop]
            return
        h = _HashBehind() if verify and self._unverified(name) else None
        if reuse and MAP_BYTES:
            raws = self._mapped_raws(name, step, start, stop)
        else:
            raws = self._read_raws(name, step, reuse, start, stop)
        floats: list = [None, None]  # float32 buffers used in turn, with `reuse`
        for i, (start, raw) in enumerate(raws):
            if h is not None:  # read-only from here: the hash reads it meanwhile
                h.update(raw.view(torch.uint8).numpy())
            if raw.dtype == torch.float32:
                piece = raw
            elif reuse:
                if floats[i % 2] is None:
                    floats[i % 2] = torch.empty(step, dtype=torch.float32)
                piece = floats[i % 2][: raw.numel()].copy_(raw)
            else:
                piece = raw.to(torch.float32)
            yield start, piece
            del raw, piece
        if h is not None:
            self._check_hash(name, h.hexdigest())

    def _read_raws(self, name: str, step: int, reuse: bool, lo: int, hi: int) -> Iterator[tuple[int, Any]]:
        """(start, stored values) pieces of `step` entries of flat entries [lo, hi) by
        plain reads: new tensors, or with `reuse` two buffers read into in turn."""
        ring: list = [None, None]
        with open(self.path, "rb", buffering=0) as f:
            for i, start in enumerate(range(lo, hi, step)):
                count = min(step, hi - start)
                slot = ring[i % 2] if reuse else None
                raw = self._read(f, name, start, count, None if slot is None else slot[:count])
                if reuse and slot is None:
                    ring[i % 2] = raw
                yield start, raw
                del raw
                _ReleaseFreedHeap.check()  # the consumer is done with the piece

    def _mapped_raws(self, name: str, step: int, lo: int, hi: int) -> Iterator[tuple[int, Any]]:
        """(start, stored values) pieces of `step` entries of flat entries [lo, hi), views
        of memory maps of `MAP_BYTES` windows of the file, each unmapped when its last
        piece (and every view of it) is gone, so that the resident set holds about two
        windows. A read copies every byte from the page cache into a buffer; a mapped
        window hands the consumer the page cache's own pages, so a pass that only reduces
        its pieces costs less than a plain read of the file (benchmarks/RESULTS.md). Private (copy-on-write) maps: a
        consumer that writes into a piece changes its own copy, never the file. The file's
        size is checked before each window is mapped: a file cut short by another program
        is an error, unless the cut falls inside the window being read, which ends the
        process with SIGBUS (cwa itself replaces files by renaming, which leaves the
        mapped inode intact)."""
        import mmap

        import torch

        st_dtype, begin, _ = self.layout[name]
        dtype = getattr(torch, _ST_DTYPES[st_dtype])
        item = dtype.itemsize
        per_window = max(step, MAP_BYTES // item // step * step)  # whole pieces per window
        with open(self.path, "rb", buffering=0) as f:
            for w0 in range(lo, hi, per_window):
                off = begin + w0 * item
                a0 = off - off % mmap.ALLOCATIONGRANULARITY
                count_w = min(per_window, hi - w0)
                if os.fstat(f.fileno()).st_size < off + count_w * item:  # before each map
                    raise ArtifactError(f"{self.path}: tensor {name!r} is truncated")
                window = mmap.mmap(f.fileno(), off + count_w * item - a0,
                                   access=mmap.ACCESS_COPY, offset=a0)
                raw_w = torch.frombuffer(window, dtype=dtype, offset=off - a0, count=count_w)
                del window  # the tensor keeps the map alive as long as it is used
                for j in range(0, count_w, step):
                    yield w0 + j, raw_w[j : j + step]
                del raw_w

_HASH_POOL = None


class _HashBehind:
    """SHA-256 of a stream of pieces computed on another thread while the reader's
    consumer works on the piece (hashlib releases the GIL for large buffers), so checking
    a tensor costs about max(hash, consumer) of wall time instead of their sum. Pieces
    are hashed in order, one at a time; a piece must not change until the next `update`
    (a change would show as a mismatch, never as a silent pass)."""

    def __init__(self) -> None:
        global _HASH_POOL
        if _HASH_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _HASH_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cwa-hash")
        self.h = hashlib.sha256()
        self.pool = _HASH_POOL
        self.pending = None

    def update(self, buf) -> None:
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.h.update, buf)

    def hexdigest(self) -> str:
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        return self.h.hexdigest()


def _read_safetensors_header(path: Path) -> dict:
    """Parse and validate the safetensors header without loading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: not a safetensors file (bad header)")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            ok = 0 <= a <= b <= data_len
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{path}: tensor {k!r} lies outside the file (truncated?)")
    return header


def open_scores(path: str | os.PathLike) -> ScoresFile:
    """Open a scores artifact, checking its header and schema."""
    path = Path(path)
    _check_exists(path)
    header = _read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{path}: not a safetensors file (metadata must map strings to strings)")
    if meta.get("cwa.schema") != SCORES_SCHEMA:
        got = meta.get("cwa.schema", "no cwa schema")
        raise ArtifactError(f"{path}: expected a scores artifact ({SCORES_SCHEMA}), found {got}")
    try:
        order = json.loads(meta["cwa.param_order"])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: scores artifact without a valid cwa.param_order") from None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
        raise ArtifactError(f"{path}: scores artifact without a valid cwa.param_order")
    keys = {k for k in header if k != "__metadata__"}
    if set(order) != keys:
        raise ArtifactError(f"{path}: cwa.param_order does not match the stored tensors")
    # The per-tensor SHA-256 covers the bytes only: a header that relabels them (F32 read
    # as I32) would pass it, so the stored dtype must be the one the metadata declares.
    want = _SCORE_DTYPES.get(meta.get("cwa.score_dtype", "float32"))
    for k in order:
        if not isinstance(header[k], dict) or header[k].get("dtype") != want:
            raise ArtifactError(
                f"{path}: tensor {k!r} is not stored as {meta.get('cwa.score_dtype', 'float32')} "
                "as its metadata says (file corrupted); recompute it with --force"
            )
    try:
        hashes = json.loads(meta.get("cwa.sha256", "{}"))
    except json.JSONDecodeError:
        hashes = None
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise ArtifactError(f"{path}: scores artifact with a malformed cwa.sha256")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise ArtifactError(f"{path}: invalid safetensors file: {e}") from None
    shapes = {k: tuple(int(s) for s in header[k]["shape"]) for k in order}
    with open(path, "rb") as f:
        base = 8 + int.from_bytes(f.read(8), "little")
    layout = {}
    for k in order:
        a, b = header[k]["data_offsets"]
        layout[k] = (str(header[k].get("dtype", "")), base + int(a), base + int(b))
    scores = ScoresFile(path=path, meta=dict(meta), names=list(order), shapes=shapes, layout=layout)
    scores._recall()
    return scores


def _verified_memo_path() -> Path:
    """The memo of scores files verified against their hashes (`cwa.memo`)."""
    return memo.cache_dir() / "verified_scores.json"


# --------------------------------------------------------------------------- HDF5


@dataclass
class H5Artifact:
    """An HDF5 artifact read whole: root attributes, datasets by path, JSON document."""

    path: Path
    schema: str
    attrs: dict[str, Any]
    arrays: dict[str, Any]
    doc: Any

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))


def write_h5(
    path: str | os.PathLike,
    schema: str,
    attrs: dict[str, Any],
    arrays: dict[str, Any],
    doc: Any = None,
) -> Path:
    """Write an HDF5 artifact atomically with the SHA-256 user block.

    The file is built in memory and written with ordinary Python I/O (see the module
    docstring): a full disk is one `CwaError` line, never a crash of the HDF5 library."""
    path = Path(path)
    image = _H5Image(_h5_image(schema, attrs, arrays, doc))
    held = _held_fingerprint(path)
    with atomic_path(path, size=_USERBLOCK + len(image.body), artifact=True) as tmp:
        _seal_userblock(image)
        _write_bytes(tmp, image.block, image.body)
    fp = attrs.get("fingerprint")
    _note_replaced(path, held, fp if isinstance(fp, str) else None)
    return path


_IMAGE_IDS = itertools.count()


def _h5_image(schema: str, attrs: dict[str, Any], arrays: dict[str, Any], doc: Any) -> bytes:
    """The HDF5 file as bytes, built with h5py's core driver without a backing store
    (nothing touches the disk). The image starts at the superblock: the 512-byte user
    block goes in front of it (HDF5 finds the superblock at offset 512 and takes that
    as the file's base address)."""
    import h5py
    import numpy as np

    name = f"cwa-image-{os.getpid()}-{next(_IMAGE_IDS)}.h5"  # a name only; no file
    with h5py.File(name, "w", driver="core", backing_store=False, block_size=1 << 20) as f:
        f.attrs["cwa.schema"] = schema
        f.attrs["cwa.version"] = __version__
        f.attrs["cwa.created"] = now_iso()
        for k, v in attrs.items():
            if isinstance(v, dict | list | tuple) or v is None:
                v = json.dumps(json_safe(v))
            f.attrs[k] = v
        if doc is not None:
            f.attrs["cwa.doc"] = dumps(doc, indent=None)
        for k, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in "UO":
                arr = np.array([str(x) for x in arr.ravel()], dtype=h5py.string_dtype())
            f.create_dataset(k, data=arr)
        f.flush()
        return f.id.get_file_image()


@dataclass
class _H5Image:
    """An HDF5 file in memory: `body` (from the superblock on) and, once sealed, the
    user `block` that goes in front of it."""

    body: bytes
    block: bytes = b""


def _userblock(digest: str) -> bytes:
    return (_MAGIC + digest.encode() + b"\n").ljust(_USERBLOCK, b"\0")


def _seal_userblock(target: Path | _H5Image) -> None:
    """Write the magic and the SHA-256 of everything after the user block into the user
    block: of an in-memory image (`write_h5`; hashed in memory), or of an HDF5 file on
    disk created with `userblock_size=512` (in place; for hand-built files in tests)."""
    if isinstance(target, _H5Image):
        target.block = _userblock(hashlib.sha256(target.body).hexdigest())
        return
    h = hashlib.sha256()
    with open(target, "rb") as f:
        f.seek(_USERBLOCK)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    with open(target, "rb+") as f:
        f.write(_userblock(h.hexdigest()))


def _verify_userblock(path: Path) -> None:
    with open(path, "rb") as f:
        block = f.read(_USERBLOCK)
        if len(block) < _USERBLOCK or not block.startswith(_MAGIC):
            raise ArtifactError(f"{path}: not a cwa HDF5 artifact")
        want = block[len(_MAGIC) : len(_MAGIC) + 64].decode("ascii", "replace")
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise ArtifactError(
            f"{path}: content does not match its SHA-256 (corrupted or truncated); "
            "recompute it with --force"
        )


_STRING_SLICE = 64  # variable-length strings read this many at a time (see _read_dataset)


def _storage_check(path: Path, what: str, n: int, itemsize: int, file_size: int) -> None:
    if n * max(itemsize, 1) > file_size:
        raise ArtifactError(
            f"{path}: {what} declares {n * max(itemsize, 1)} bytes, more than the file holds "
            f"({file_size}); not a valid cwa artifact, recompute it with --force"
        )


def _read_dataset(path: Path, name: str, obj: Any, file_size: int) -> Any:
    """A dataset's values, refused before reading (`ArtifactError` naming it) unless it is
    stored the way cwa writes: uncompressed, contiguous (or compact), in this file, and
    no larger than the file. Variable-length strings are read a few at a time and stop
    at the file's size, so a file cannot expand into more memory than it holds."""
    import h5py
    import numpy as np

    dcpl = obj.id.get_create_plist()
    if (
        dcpl.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT)
        or dcpl.get_nfilters()
        or dcpl.get_external_count()
    ):
        raise ArtifactError(
            f"{path}: dataset {name!r} is stored compressed, chunked or outside the file, which cwa "
            "never writes; not a valid cwa artifact, recompute it with --force"
        )
    if obj.shape is None:  # an empty dataspace
        return obj[()]
    _storage_check(path, f"dataset {name!r}", obj.size, obj.dtype.itemsize, file_size)
    string = obj.dtype.kind == "O" or h5py.check_string_dtype(obj.dtype) is not None
    if obj.dtype.kind != "O" or obj.ndim == 0:  # fixed-size values: bounded by the check above
        a = obj[()]
        if string:
            a = np.array([x.decode() if isinstance(x, bytes) else x for x in np.ravel(a)])
        return a
    per_row = max(1, obj.size // max(1, obj.shape[0]))
    rows = max(1, _STRING_SLICE // per_row)
    out: list[Any] = []
    total = 0
    for i in range(0, obj.shape[0], rows):
        for x in np.ravel(obj[i : i + rows]):
            total += len(x) if isinstance(x, str | bytes) else int(getattr(x, "nbytes", 0))
            out.append(x.decode() if isinstance(x, bytes) else x)
        if total > file_size:
            raise ArtifactError(
                f"{path}: dataset {name!r} holds more string data than the file; not a valid "
                "cwa artifact, recompute it with --force"
            )
    return np.array(out)


def read_h5(path: str | os.PathLike, expect: str | tuple[str, ...] | None = None) -> H5Artifact:
    """Verify and read a whole HDF5 artifact (bounded: see `_read_dataset`)."""
    import math

    import h5py

    path = Path(path)
    _check_exists(path)
    _verify_userblock(path)
    file_size = path.stat().st_size
    arrays: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = {}
            for k in f.attrs:
                aid = f.attrs.get_id(k)
                n = 0 if aid.shape is None else math.prod(aid.shape)
                _storage_check(path, f"attribute {k!r}", n, aid.dtype.itemsize, file_size)
                attrs[k] = _attr(f.attrs[k])

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    arrays[name] = _read_dataset(path, name, obj, file_size)

            f.visititems(visit)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"{path}: unreadable HDF5 file: {e}") from None
    schema = str(attrs.pop("cwa.schema", ""))
    if expect is not None:
        want = (expect,) if isinstance(expect, str) else expect
        if schema not in want:
            raise ArtifactError(
                f"{path}: expected a {' or '.join(want)} artifact, found {schema or 'no schema'}"
            )
    doc = attrs.pop("cwa.doc", None)
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            raise ArtifactError(f"{path}: malformed cwa.doc (not JSON); recompute it with --force") from None
    elif doc is not None:
        raise ArtifactError(f"{path}: malformed cwa.doc (not a JSON string); recompute it with --force")
    return H5Artifact(path=path, schema=schema, attrs=attrs, arrays=arrays, doc=doc)


def _attr(v: Any) -> Any:
    import numpy as np

    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def artifact_schema(path: str | os.PathLike) -> str:
    """The schema of any cwa artifact (for dispatch), raising ArtifactError if none."""
    path = Path(path)
    _check_exists(path)
    with open(path, "rb") as f:
        start = f.read(len(_MAGIC))
    if start == _MAGIC:
        return read_h5(path).schema
    if path.suffix == ".json":
        raise ArtifactError(f"{path}: a JSON report, not a stage artifact")
    return open_scores(path).meta["cwa.schema"]


# --------------------------------------------------------------------------- selections


def write_selection(
    path: str | os.PathLike,
    sel: Any,
    *,
    fingerprint: str | None = None,
    provenance: dict[str, Any] | None = None,
    extra_arrays: dict[str, Any] | None = None,
    doc: Any = None,
) -> Path:
    """Write a `cwa.ranking.Selection` as a `selection/1` HDF5 artifact; its record
    (`fingerprint`, `provenance`, `arrays`, `doc`) unless given here."""
    import numpy as np

    arrays: dict[str, Any] = {"params": np.array(sel.params, dtype=object)}
    for d, draw in enumerate(sel.draws):
        arrays[f"draws/{d}/param_index"] = np.asarray(draw.param_index, dtype=np.int32)
        arrays[f"draws/{d}/flat_index"] = np.asarray(draw.flat_index, dtype=np.int64)
        arrays[f"draws/{d}/score"] = np.asarray(draw.score, dtype=np.float32)
    arrays.update(sel.arrays if extra_arrays is None else extra_arrays)
    attrs = {
        "kind": sel.kind,
        "k": int(sel.k),
        "mode": sel.mode,
        "metric": sel.metric,
        "rank_by": sel.rank_by,
        "seed": int(sel.seed),
        "ties_at_k": int(sel.ties_at_k),
        "n_draws": len(sel.draws),
        "fingerprint": sel.fingerprint if fingerprint is None else fingerprint,
        "provenance": sel.provenance if provenance is None else provenance,
        "info": sel.info,
    }
    return write_h5(path, SELECTION_SCHEMA, attrs, arrays, doc=sel.doc if doc is None else doc)


def read_selection(path: str | os.PathLike):
    """Read a selection artifact into a `cwa.ranking.Selection`, its record included
    (`fingerprint`, `provenance`, `doc`, the extra `arrays`, `path`)."""
    return selection_from(read_h5(path, SELECTION_SCHEMA))


def selection_from(art: H5Artifact):
    """The `Selection` of a `selection/1` artifact already read (`read_h5`), checked."""
    from cwa.ranking import Selection

    if art.schema != SELECTION_SCHEMA:
        raise ArtifactError(f"{art.path}: expected a {SELECTION_SCHEMA} artifact, found {art.schema or 'no schema'}")
    a = art.attrs
    try:
        n = int(a["n_draws"])
        params = [str(p) for p in art.arrays["params"]]
        draws = [_read_draw(art, d, len(params)) for d in range(n)]
        sel = Selection(
            kind=str(a["kind"]),
            k=int(a["k"]),
            mode=str(a["mode"]),
            metric=str(a["metric"]),
            rank_by=str(a["rank_by"]),
            seed=int(a["seed"]),
            ties_at_k=int(a["ties_at_k"]),
            params=params,
            draws=draws,
            info=json.loads(a.get("info", "{}")),
            fingerprint=art.fingerprint,
            provenance=provenance(art),
            doc=art.doc,
            arrays={k: v for k, v in art.arrays.items() if k != "params" and not k.startswith("draws/")},
            path=art.path,
        )
        if n < 1 or sel.k < 1 or sel.mode not in ("global", "per_layer") or len(set(params)) != len(params):
            raise ValueError("bad n_draws, k, mode or params")
        if not isinstance(sel.info, dict):
            raise ValueError("bad info")
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{art.path}: malformed selection artifact ({e})") from None
    return sel


def _read_draw(art: H5Artifact, d: int, n_params: int):
    """Draw d of a selection, checked: 1-D integer indices of one length, parameter
    indices in range, flat indices non-negative, no entry twice (ValueError otherwise).
    Bounds inside each tensor are checked where its shape is known (perturb, control)."""
    import numpy as np

    from cwa.ranking import Draw

    pi, fi, sc = (np.asarray(art.arrays[f"draws/{d}/{k}"]) for k in ("param_index", "flat_index", "score"))
    if pi.ndim != 1 or fi.ndim != 1 or sc.ndim != 1 or pi.dtype.kind not in "iu" or fi.dtype.kind not in "iu":
        raise ValueError(f"draw {d}: indices are not 1-D integer arrays")
    if sc.dtype.kind != "f":
        raise ValueError(f"draw {d}: scores are not floating point")
    if len(pi) and (pi.min() < 0 or pi.max() >= n_params or fi.min() < 0 or fi.max() >= 1 << 40):
        raise ValueError(f"draw {d}: index out of range")
    if len(pi) and len(np.unique((pi.astype(np.int64) << 40) | fi.astype(np.int64))) != len(pi):
        raise ValueError(f"draw {d}: lists an entry twice")
    return Draw(param_index=pi, flat_index=fi, score=sc)


def provenance(art: H5Artifact) -> dict[str, Any]:
    """The provenance attribute as a dict ({} when absent or not a JSON object)."""
    p = art.attrs.get("provenance", "{}")
    try:
        p = json.loads(p) if isinstance(p, str) else p
    except json.JSONDecodeError:
        return {}
    return p if isinstance(p, dict) else {}


# --------------------------------------------------------------------------- results


@dataclass
class _Document:
    """An HDF5 result read whole: `doc` (its JSON report), `arrays`, `attrs` (the record:
    fingerprint, model and data fingerprints, provenance), `path`. Subclasses name their
    `SCHEMA` and what their document must hold."""

    doc: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    SCHEMA = ""
    REQUIRED = ""  # a key the document must hold ("" none)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))

    def save(self, path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> Path:
        """Write the artifact (and, with `json_path`, its JSON document)."""
        self.path = write_h5(path, self.SCHEMA, self.attrs, self.arrays, doc=self.doc)
        if json_path is not None:
            write_json(json_path, self.doc)
        return self.path

    @classmethod
    def from_artifact(cls, art: H5Artifact):
        """The result of an artifact already read (`read_h5`), checked."""
        if art.schema != cls.SCHEMA:
            raise ArtifactError(f"{art.path}: expected a {cls.SCHEMA} artifact, found {art.schema or 'no schema'}")
        if not isinstance(art.doc, dict) or (cls.REQUIRED and not isinstance(art.doc.get(cls.REQUIRED), list)):
            what = f"no {cls.REQUIRED}" if cls.REQUIRED else "no document"
            raise ArtifactError(f"{art.path}: malformed {cls.SCHEMA.split('/')[0]} artifact ({what}); recompute it with --force")
        return cls(doc=art.doc, arrays=art.arrays, attrs=art.attrs, path=art.path)


@dataclass
class Results(_Document):
    """Perturbation results (`perturbation/1`): `doc` is `perturbation_results.json`
    (baseline, conditions, summary, ...), `arrays` the per-window NLLs and flipped bits,
    `attrs` the record (fingerprint, method, model and data fingerprints, seed)."""

    SCHEMA = PERTURBATION_SCHEMA
    REQUIRED = "conditions"

    @property
    def summary(self) -> dict[str, Any]:
        return self.doc.get("summary") or {}

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.doc.get("conditions") or [])

    @property
    def baseline(self) -> dict[str, Any]:
        return self.doc.get("baseline") or {}

    @property
    def tasks(self) -> list[dict[str, Any]]:
        """The lm-eval task metrics (`cwa perturb --eval-tasks`, `cwa.tasks`), one row per
        (condition, task, metric), the baseline first: `condition` ("baseline" or the
        condition's name), `seed`, `draw`, `k`, `task`, `metric`, `value`, `stderr`
        (lm-eval's, None where it gives none). Empty without tasks. The documents hold the
        same as `baseline["tasks"]` and each condition's `tasks`: {task: {metric: value,
        metric_stderr: value}}; `doc["task_eval"]` says what was evaluated."""
        from cwa.tasks import metric_names, stderr_key

        rows: list[dict[str, Any]] = []
        records = [({"name": "baseline"}, self.baseline.get("tasks"))]
        records += [(c, c.get("tasks")) for c in self.conditions]
        for c, tasks in records:
            for task, metrics in (tasks or {}).items():
                for m in metric_names(metrics):
                    rows.append({"condition": c.get("name"), "seed": c.get("seed"), "draw": c.get("draw"),
                                 "k": c.get("k"), "task": task, "metric": m, "value": metrics.get(m),
                                 "stderr": metrics.get(stderr_key(m))})
        return rows

    def to_pandas(self):
        """One row per condition (the fields of `conditions`; lm-eval task metrics as
        columns `tasks.{task}.{metric}`)."""
        import pandas as pd

        rows = []
        for c in self.conditions:
            row = {k: v for k, v in c.items() if k != "tasks"}
            for task, metrics in (c.get("tasks") or {}).items():
                row.update({f"tasks.{task}.{m}": v for m, v in metrics.items()})
            rows.append(row)
        return pd.DataFrame(rows)


@dataclass
class Stability(_Document):
    """Stability results (`stability/1`): `doc` is `stability_results.json` (Jaccard,
    Spearman, the chance level, per-tensor overlap), `arrays` the matrices."""

    SCHEMA = STABILITY_SCHEMA

    @property
    def mean_jaccard(self) -> float | None:
        return self.doc.get("mean_jaccard")

    @property
    def random_jaccard(self) -> float | None:
        return self.doc.get("random_jaccard")

    @property
    def mean_spearman(self) -> float | None:
        return self.doc.get("mean_spearman")

    def to_pandas(self):
        """One row per pair of inputs: a, b, jaccard (and spearman where computed)."""
        import numpy as np
        import pandas as pd

        labels = [str(x) for x in self.doc.get("labels") or []]
        jac = np.asarray(self.doc.get("jaccard_matrix") or [], dtype=float)
        sp = self.doc.get("spearman_matrix")
        sp = np.asarray(sp, dtype=float) if sp is not None else None
        rows = []
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                row = {"a": labels[i], "b": labels[j], "jaccard": float(jac[i, j]) if jac.size else float("nan")}
                if sp is not None and sp.size:
                    row["spearman"] = float(sp[i, j])
                rows.append(row)
        return pd.DataFrame(rows)


def read_results(path: str | os.PathLike) -> Results:
    return Results.from_artifact(read_h5(path, PERTURBATION_SCHEMA))


def read_stability(path: str | os.PathLike) -> Stability:
    return Stability.from_artifact(read_h5(path, STABILITY_SCHEMA))


# --------------------------------------------------------------------------- describe


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What `cwa info` shows of any artifact, read once: `schema`, `fields` (name,
    value-as-text pairs), a `table` (columns, rows) and `notes` (lines)."""
    path = Path(path)
    _check_exists(path)
    with open(path, "rb") as f:
        is_h5 = f.read(len(_MAGIC)) == _MAGIC
    if not is_h5:
        if path.suffix == ".json":
            return describe_json(path)
        return _describe_scores(open_scores(path))
    return _describe_h5(read_h5(path))


def describe_json(path: str | os.PathLike, max_rows: int = 40) -> dict[str, Any]:
    """`describe` of a JSON report: `cwa eval`'s baseline metrics (schema "eval (JSON)"),
    `perturbation_results.json` ("perturbation results (JSON)": its conditions as the
    table, the summary as notes), or any other JSON object cwa writes ("JSON": its
    top-level values)."""
    path = Path(path)
    _check_exists(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable JSON report ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: not a cwa JSON report (a JSON {type(doc).__name__}, not an object)")
    if isinstance(doc.get("conditions"), list) and isinstance(doc.get("baseline"), dict):
        return _describe_results_json(doc, max_rows)
    if "nll" in doc and "perplexity" in doc:
        return _describe_eval_json(doc)
    fields = [(k, _short(v)) for k, v in doc.items() if not isinstance(v, (dict, list))]
    rows = [(k, _shape_of(v)) for k, v in doc.items() if isinstance(v, (dict, list))]
    return {"schema": "JSON", "fields": fields, "table": {"columns": ("key", "holds"), "rows": rows[:max_rows]},
            "notes": [f"… {len(rows) - max_rows} more keys"] if len(rows) > max_rows else []}


_EVAL_METRICS = ("nll", "perplexity", "token_accuracy", "bits_per_byte", "n_tokens", "n_windows")


def _describe_eval_json(doc: dict) -> dict[str, Any]:
    fields = [(k, _short(v)) for k, v in doc.items() if k not in _EVAL_METRICS and k != "eval_windows"]
    fields.append(("eval_windows", _windows_text(doc.get("eval_windows"))))
    rows = [(k, _num(doc[k])) for k in _EVAL_METRICS if k in doc]
    return {"schema": "eval (JSON)", "fields": fields, "table": {"columns": ("metric", "value"), "rows": rows},
            "notes": []}


# the conditions' table (`kl` is kl_from_baseline); the method is one per file, a field
_CONDITION_COLUMNS = ("name", "seed", "draw", "k", "n_changed", "delta_nll", "kl", "restored")


def _describe_results_json(doc: dict, max_rows: int) -> dict[str, Any]:
    skip = ("baseline", "conditions", "eval_windows")
    fields = [(k, _short(v)) for k, v in doc.items() if k not in skip and not k.startswith("summary")]
    fields.append(("eval_windows", _windows_text(doc.get("eval_windows"))))
    fields.append(("baseline", ", ".join(f"{k} {_num(v)}" for k, v in doc["baseline"].items())))
    conds = [c for c in doc["conditions"] if isinstance(c, dict)]
    methods = sorted({str(c.get("method")) for c in conds})
    fields.append(("method", ", ".join(methods)))
    rows = [tuple(_num(c.get("kl_from_baseline" if col == "kl" else col)) for col in _CONDITION_COLUMNS)
            for c in conds[:max_rows]]
    notes = [f"{len(conds)} conditions" + (f", the first {max_rows} shown" if len(conds) > max_rows else "")]
    for name, s in (doc.get("summary") or {}).items():
        if isinstance(s, dict):
            notes.append(f"summary {name}: " + ", ".join(f"{k} {_num(v)}" for k, v in s.items()))
    notes += [f"{k}: {_shape_of(doc[k])}" for k in doc if k.startswith("summary_")]
    return {"schema": "perturbation results (JSON)", "fields": fields,
            "table": {"columns": _CONDITION_COLUMNS, "rows": rows}, "notes": notes}


def _num(v: Any) -> str:
    """A JSON value for a table cell: floats to 4 significant digits, lists of numbers
    as `[lo, hi]`; the strings of non-finite numbers ("inf", "nan") as they are."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return "" if v is None else str(v)


def _short(v: Any, limit: int = 300) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text[:limit] + ("…" if len(text) > limit else "")


def _shape_of(v: Any) -> str:
    if isinstance(v, list):
        return f"a list of {len(v)}"
    keys = list(v)
    return f"an object of {len(keys)}: {', '.join(map(str, keys[:8]))}{' …' if len(keys) > 8 else ''}"


def _windows_text(windows: Any) -> str:
    if not isinstance(windows, list):
        return _short(windows)
    return f"{len(windows)} windows {windows[:8]}{' …' if len(windows) > 8 else ''}"


def _describe_scores(sc: ScoresFile) -> dict[str, Any]:
    skip = ("cwa.param_order", "cwa.sha256", "cwa.windows")
    fields = [(k, sc.meta[k]) for k in sorted(sc.meta) if k not in skip]
    windows = sc.json_meta("cwa.windows", [])
    fields.append(("cwa.windows", f"{len(windows)} windows {windows[:8]}{' …' if len(windows) > 8 else ''}"))
    rows = [(n, "x".join(map(str, sc.shape(n))), str(sc.numel(n))) for n in sc.names]
    total = sum(sc.numel(n) for n in sc.names)
    return {"schema": SCORES_SCHEMA, "fields": fields, "table": {"columns": ("param", "shape", "numel"), "rows": rows},
            "notes": [f"{len(sc.names)} tensors, {total} scores"]}


def _describe_h5(art: H5Artifact, max_rows: int = 40) -> dict[str, Any]:
    fields = []
    for k in sorted(art.attrs):
        v = art.attrs[k]
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        fields.append((k, f"{text[:300]}{'…' if len(text) > 300 else ''}"))
    items = sorted(art.arrays.items())
    rows = [(k, str(getattr(a, "shape", "")), str(getattr(a, "dtype", ""))) for k, a in items[:max_rows]]
    notes = [f"… {len(items) - max_rows} more datasets"] if len(items) > max_rows else []
    if isinstance(art.doc, dict):
        notes.append(f"document keys: {', '.join(art.doc)}")
        if "baseline" in art.doc:
            notes.append(f"baseline: {json.dumps(art.doc['baseline'])}")
        if "summary" in art.doc:
            notes.append(f"summary: {json.dumps(art.doc['summary'])[:600]}")
    return {"schema": art.schema, "fields": fields, "table": {"columns": ("dataset", "shape", "dtype"), "rows": rows},
            "notes": notes}


# --------------------------------------------------------------------------- parameter names


BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.(.+)$")


def param_group(name: str) -> tuple[int | None, str]:
    """(block number or None, module type) of a parameter name:
    `transformer.h.3.attn.c_attn.weight` -> (3, "attn.c_attn"), `lm_head.weight` ->
    (None, "lm_head"), `transformer.ln_f.bias` -> (None, "ln_f.bias")."""
    m = BLOCK_RE.search(name)
    if m:
        rest = m.group(2)
        return int(m.group(1)), rest[: -len(".weight")] if rest.endswith(".weight") else rest
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = base.split(".")
    if base != name or len(parts) == 1:
        return None, parts[-1]
    return None, ".".join(parts[-2:])  # e.g. "ln_f.bias"


def layer_of(name: str) -> str:
    """The block number in a parameter name (`transformer.h.3.attn...` -> "3"), or ""."""
    b = param_group(name)[0]
    return "" if b is None else str(b)


# --------------------------------------------------------------------------- top-K table

TOPK_COLUMNS = ("rank", "param", "layer", "coords", "flat_index", "score", "value")


def _selection_rows(sel: Any, draw: int, lm: Any) -> list[tuple]:
    """(rank, param, layer, coords, flat_index, score, value) for every selected weight;
    coords from the shapes the selection was made for, value from `lm` (None without)."""
    import numpy as np

    d = sel.draws[draw]
    shapes = sel.shapes
    values = None
    if lm is not None:
        named = dict(lm.model.named_parameters()) if hasattr(lm, "model") else dict(lm.named_parameters())
        values = np.empty(len(d.flat_index), dtype=np.float64)
        for pi in np.unique(d.param_index):
            p = named[sel.params[pi]].detach().reshape(-1)
            mask = d.param_index == pi
            values[mask] = p[np.asarray(d.flat_index[mask])].double().cpu().numpy()
    rows = []
    for r, (pi, fi, sc) in enumerate(zip(d.param_index, d.flat_index, d.score, strict=True), 1):
        name = sel.params[pi]
        shape = shapes.get(name)
        coords = ",".join(str(int(c)) for c in np.unravel_index(int(fi), shape)) if shape else ""
        rows.append((r, name, layer_of(name), coords, int(fi), float(sc), None if values is None else float(values[r - 1])))
    return rows


def selection_table(sel: Any, draw: int = 0, lm: Any = None):
    """The selection as a pandas DataFrame, one row per weight (`TOPK_COLUMNS`)."""
    import pandas as pd

    rows = _selection_rows(sel, draw, lm)
    df = pd.DataFrame(rows, columns=list(TOPK_COLUMNS))
    df["value"] = df["value"].astype(float)
    return df


def write_topk_csv(path: str | os.PathLike, sel: Any, lm: Any = None) -> Path:
    """top_weights.csv: rank, param, layer, coords, flat_index, score, value (empty
    without a model), floats as Python's shortest round-trip repr."""
    import csv as _csv
    import io

    buf = io.StringIO()
    w = _csv.writer(buf)
    w.writerow(TOPK_COLUMNS)
    for r, name, layer, coords, fi, sc, val in _selection_rows(sel, 0, lm):
        w.writerow([r, name, layer, coords, fi, repr(sc), "" if val is None else repr(val)])
    return write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- cache


def cached(path: Path, fingerprint: str, opener: Callable[[Path], str]) -> bool:
    """True when `path` holds an intact cwa artifact carrying `fingerprint`.

    Verifies what it would reuse: `opener` reads the fingerprint (an HDF5 opener goes
    through `read_h5`, whose user-block hash covers the whole file), and a scores file
    then has every tensor checked against its recorded SHA-256, streamed. A damaged cwa
    artifact (hash mismatch, truncation, bad header) is logged as "note: PATH is damaged
    (reason); recomputing" and is not a hit, so the stage rewrites it; an intact one of
    another fingerprint or kind is not a hit either (the write notes the replacement).
    Something at `path` that is not a cwa artifact, or not a regular file, is refused
    (`UsageError`): it is never overwritten."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    kind = _check_target(path, str(path), artifact=True)
    if kind in (None, "empty"):
        return False
    try:
        got = opener(path)
    except UsageError:
        raise
    except CwaError:
        problem = _damage(path, kind)
        if problem:
            log(f"note: {path} is damaged ({problem}); recomputing")
        return False
    if got != fingerprint:
        return False
    if kind == "scores":
        try:
            open_scores(path).verify()
        except CwaError as e:
            log(f"note: {path} is damaged ({_reason(path, e)}); recomputing")
            return False
    return True


def _damage(path: Path, kind: str) -> str | None:
    """Why the cwa artifact at `path` is damaged, or None when it is intact on its own
    terms (then it is merely another kind of result)."""
    try:
        if kind == "h5":
            read_h5(path)
        elif kind == "scores":
            open_scores(path).verify()
    except CwaError as e:
        return _reason(path, e)
    return None


def _reason(path: Path, e: Exception) -> str:
    """An error line without its path prefix and "recompute it" advice."""
    msg = str(e)
    prefix = f"{path}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    for advice in ("; recompute it with --force", ", recompute it with --force"):
        msg = msg.replace(advice, "")
    return msg


def scores_fingerprint_of(path: Path) -> str:
    return open_scores(path).fingerprint


def h5_fingerprint_of(path: Path) -> str:
    return read_h5(path).fingerprint


def resolve_output(
    output: str | os.PathLike | None, stage: str, fingerprint: str, ext: str
) -> Path:
    """The primary artifact's path: `-o` or the default name under ./cwa-out/, checked
    with `check_output` (a directory, special file, link or non-cwa file is refused)."""
    if output is None:
        p = default_output(stage, fingerprint, ext)
        check_output(p, "", artifact=True, ext=ext)
        return p
    return check_output(Path(output), "-o", artifact=True, ext=ext)
