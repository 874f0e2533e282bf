"""Where output goes: artifact paths on stdout (one line each), everything else on stderr.

`log()` writes to stderr; `progress()` returns a rich progress bar on stderr (quiet when
stderr is not a terminal, so pipelines and CI logs stay clean); `emit()` prints an
artifact path on stdout. `debug_enabled()` reads `CWA_DEBUG`, the one switch that shows
tracebacks. A progress bar's `advance()` is also a stop point (`cwa.stop.check_stop()`),
so every loop that reports progress ends at its next step after SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from cwa.stop import check_stop

_verbose = False

_DEBUG_ON = ("1", "true", "yes", "on")


def debug_enabled() -> bool:
    """Whether `CWA_DEBUG` asks for tracebacks: 1/true/yes/on (any case, surrounding
    spaces ignored) turn it on; anything else (unset, empty, 0/false/no/off, typos) is off."""
    return os.environ.get("CWA_DEBUG", "").strip().lower() in _DEBUG_ON


def set_verbose(v: bool) -> None:
    global _verbose
    _verbose = v


def log(msg: str, *, verbose_only: bool = False) -> None:
    if verbose_only and not _verbose:
        return
    print(msg, file=sys.stderr, flush=True)


def emit(path) -> None:
    print(str(path), file=sys.stdout, flush=True)


@contextlib.contextmanager
def progress(description: str, total: int, unit: str = "windows") -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields `advance(n)`. Shows the rate in `unit`/s.
    `advance` raises a pending stop (SIGTERM / Ctrl-C) after counting the step."""
    if not sys.stderr.isatty():
        start = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            check_stop()

        yield advance
        if _verbose:
            dt = time.perf_counter() - start
            rate = done[0] / dt if dt > 0 else float("inf")
            log(f"{description}: {done[0]} {unit} in {dt:.1f}s ({rate:.1f} {unit}/s)")
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, rate="")
        start = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            dt = time.perf_counter() - start
            rate = f"{done[0] / dt:.1f} {unit}/s" if dt > 0 else ""
            bar.update(task, advance=n, rate=rate)
            check_stop()

        yield advance
