"""Where output goes: artifact paths on stdout (one line each), everything else on stderr.

`log()` writes to stderr; `progress()` returns a rich progress bar on stderr (quiet when
stderr is not a terminal, so pipelines and CI logs stay clean); `emit()` prints an
artifact path on stdout.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

_verbose = False


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
    """A progress bar on stderr; yields `advance(n)`. Shows the rate in `unit`/s."""
    if not sys.stderr.isatty():
        start = time.perf_counter()
        done = [0]

        def advance(n: int) -> None:
            done[0] += n

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

        yield advance
