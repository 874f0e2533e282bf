"""Helpers shared by the command modules."""

from __future__ import annotations

import sys
from pathlib import Path

from cwa.console import emit, log, set_verbose
from cwa.errors import ArtifactError, UsageError
from cwa.stages import DataOptions, ModelOptions


def read_paths(args: list[str] | list[Path] | None, what: str = "artifact") -> list[Path]:
    """Expand `-` into the paths read from stdin (whitespace separated)."""
    out: list[Path] = []
    for a in args or []:
        if str(a) == "-":
            text = sys.stdin.read() if not sys.stdin.closed else ""
            got = [Path(x) for x in text.split()]
            if not got:
                raise UsageError(f"'-' given but no {what} path arrived on stdin")
            out.extend(got)
        else:
            _check_not_unmatched_glob(str(a), what)
            out.append(Path(a))
    return out


def _check_not_unmatched_glob(arg: str, what: str) -> None:
    """A shell passes a pattern that matches nothing through unchanged: say so, before a
    command complains about the number or kind of its inputs."""
    if any(c in arg for c in "*?[") and not Path(arg).exists():
        raise ArtifactError(f"{arg}: no {what} file matches this pattern; check the path")


def one_path(arg: str | Path, what: str) -> Path:
    paths = read_paths([arg], what)
    if len(paths) != 1:
        raise UsageError(f"expected one {what} path, got {len(paths)}: {' '.join(map(str, paths))}")
    return paths[0]


def model_options(model, revision, dtype, device, device_map=None, trust_remote_code=False) -> ModelOptions:
    return ModelOptions(model, revision, dtype, device, device_map, trust_remote_code)


def data_options(data, eval_data, data_seed, calib_samples, eval_samples, seq_len, batch_size) -> DataOptions:
    return DataOptions(data, eval_data, data_seed, calib_samples, eval_samples, seq_len, batch_size)


def report(result, verbose: bool = False) -> None:
    set_verbose(verbose)
    if result.cached:
        log(f"cache hit: {result.path}", verbose_only=True)
    else:
        log(f"wrote {result.path} ({result.seconds:.1f}s)", verbose_only=True)
    emit(result.path)
