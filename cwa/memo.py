"""Memos of work on files that need not be redone while a file is unchanged: the SHA-256
of a model file (`cwa.models.file_sha256`) and the verification of a scores file against
its recorded hashes (`cwa.artifacts.ScoresFile`).

Each memo is a JSON file in the cache directory (`$CWA_CACHE_DIR`, else
`$XDG_CACHE_HOME/cwa`, else `~/.cache/cwa`) mapping a file's real path to an entry that
holds the file's stamp (what `os.stat` says of it) and the memoized result. An entry is
used only while the file's stamp is the one recorded. A file modified within
2 s of the work is not memoized: on a file system with coarse timestamps it could be
rewritten within the same tick, same size, and look unchanged (git's "racily clean"
rule); it is memoized next time, once it is older. A missing, unreadable or corrupt memo
is an empty one, and a memo that cannot be written is left as it is: it only saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

RACY_NS = 2_000_000_000
MEMO_MAX = 4096  # entries per memo; the oldest go first


def cache_dir() -> Path:
    d = os.environ.get("CWA_CACHE_DIR")
    if not d:
        xdg = os.environ.get("XDG_CACHE_HOME")
        d = os.path.join(xdg, "cwa") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "cwa")
    return Path(d)


def stamp(st: os.stat_result) -> dict:
    """What identifies a file's content short of reading it: device, inode, size, and
    the modification and status-change times (a write, a truncation, a copy over it, a
    rename onto it or `os.utime` changes at least one; the ctime cannot be set back)."""
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def old_enough(st: os.stat_result, started_ns: int) -> bool:
    """True when the file was last modified more than `RACY_NS` before `started_ns` (a
    rewrite moves the mtime and the ctime alike; the mtime is the one a test can age)."""
    return st.st_mtime_ns < started_ns - RACY_NS


def read_memo(path: Path) -> dict:
    """The memo's entries; a missing, unreadable or corrupt memo is an empty one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc.get("files") if doc.get("version") == 1 else None
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def write_memo(path: Path, key: str, entry: dict) -> None:
    """Add one entry, atomically (temporary file + rename), merged with what other
    processes wrote meanwhile; an error leaves the memo as it is."""
    files = read_memo(path)
    files.pop(key, None)
    files[key] = entry
    for old in list(files)[: max(0, len(files) - MEMO_MAX)]:
        del files[old]
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "files": files}, f)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
