"""Helpers shared by the command modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cwa.console import emit, log, set_verbose
from cwa.errors import ArtifactError, UsageError
from cwa.stages import DataOptions, ModelOptions


def read_paths(args: list[str] | list[Path] | None, what: str = "artifact") -> list[Path]:
    """Expand `-` into the paths read from stdin, one per line (see `_stdin_paths`)."""
    out: list[Path] = []
    for a in args or []:
        if str(a) == "-":
            out.extend(_stdin_paths(what))
        else:
            _check_not_unmatched_glob(str(a), what)
            out.append(Path(a))
    return out


def _stdin_paths(what: str) -> list[Path]:
    """Paths on stdin, one per line: a path may hold spaces; surrounding whitespace,
    blank lines and a `\r\n` line end are ignored. Bytes that are not UTF-8 text (or
    hold NUL) are refused without echoing them; a line that names no existing file is
    refused naming it, printably (`printable`)."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        raw = b""
    else:
        buf = getattr(stdin, "buffer", None)
        data = buf.read() if buf is not None else stdin.read()
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise UsageError(f"'-': stdin did not hold {what} paths (one per line)")
    got = [Path(line.strip()) for line in text.split("\n") if line.strip()]
    if not got:
        raise UsageError(f"'-' given but no {what} path arrived on stdin")
    for p in got:
        if not os.path.exists(p):  # False, not an error, for a name too long for the system
            raise ArtifactError(f"{printable(str(p))}: no such file (read from stdin '-')")
    return got


def printable(s: str, limit: int = 200) -> str:
    """`s` for a one-line message: control and other non-printable characters escaped as
    Python writes them (`\\x1b`, `\\n`), cut to `limit` characters with an ellipsis."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return out if len(out) <= limit else out[:limit] + "…"


def _check_not_unmatched_glob(arg: str, what: str) -> None:
    """A shell passes a pattern that matches nothing through unchanged: say so, before a
    command complains about the number or kind of its inputs."""
    if any(c in arg for c in "*?[") and not Path(arg).exists():
        raise ArtifactError(f"{arg}: no {what} file matches this pattern; check the path")


def one_path(arg: str | Path, what: str) -> Path:
    paths = read_paths([arg], what)
    if len(paths) != 1:
        shown = printable(" ".join(map(str, paths)))
        raise UsageError(f"expected one {what} path, got {len(paths)}: {shown}")
    return paths[0]


def model_options(model, revision, dtype, device, device_map=None, trust_remote_code=False,
                  allow_pickle=False) -> ModelOptions:
    return ModelOptions(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle)


def data_options(data, eval_data, data_seed, calib_samples, eval_samples, seq_len, batch_size) -> DataOptions:
    return DataOptions(data, eval_data, data_seed, calib_samples, eval_samples, seq_len, batch_size)


def report(result, verbose: bool = False) -> None:
    set_verbose(verbose)
    if result.cached:
        log(f"cache hit: {result.path}", verbose_only=True)
    else:
        log(f"wrote {result.path} ({result.seconds:.1f}s)", verbose_only=True)
    emit(result.path)


def out_path(output: Path | None):
    """`-o PATH`, or (no `-o`) the default path under ./cwa-out/ named by fingerprint."""
    from cwa.stages import AUTO

    return AUTO if output is None else output
