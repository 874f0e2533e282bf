"""Where output goes: artifact paths on stdout (one line each), everything else on stderr.

`log()` writes to stderr; `progress()` reports a loop's progress in the form its reader can
see: a rich bar on stderr in a terminal, a rich display in a Jupyter notebook, and plain
log lines on stderr elsewhere (batch logs, pipes, CI): one every `LOG_INTERVAL_S` seconds
at most (`CWA_PROGRESS_INTERVAL` overrides it), e.g. `score hutchinson_diag: 40/128 windows (31%), 2.1 windows/s, 19 s elapsed`
(below one a second, the seconds each takes: `1/8 windows (12%), 185.0 s/window`), and a
last one at the end. A loop shorter than `LOG_INTERVAL_S` writes no line unless
`--verbose`, so a short command's stderr holds only what it has to say (one error line).
`--quiet` (`set_quiet`) silences both, log lines and progress, whatever `--verbose` says;
errors are printed by `cwa.cli`, never through `log()`, so they still show.
`emit()` prints an artifact path on stdout. `debug_enabled()` reads `CWA_DEBUG`, the one
switch that shows tracebacks. A progress bar's `advance()` is also a stop point
(`cwa.stop.check_stop()`), so every loop that reports progress ends at its next step
after SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from cwa.stop import check_stop

if TYPE_CHECKING:
    from rich.console import Console

_verbose = False
_quiet = False

LOG_INTERVAL_S = 10.0  # the least time between two progress lines in a log
_clock: Callable[[], float] = time.perf_counter  # seconds; a test puts a fake clock here

_DEBUG_ON = ("1", "true", "yes", "on")


def debug_enabled() -> bool:
    """Whether `CWA_DEBUG` asks for tracebacks: 1/true/yes/on (any case, surrounding
    spaces ignored) turn it on; anything else (unset, empty, 0/false/no/off, typos) is off."""
    return os.environ.get("CWA_DEBUG", "").strip().lower() in _DEBUG_ON


def set_verbose(v: bool) -> None:
    global _verbose
    _verbose = v


def set_quiet(q: bool) -> None:
    """`cwa --quiet`: no log lines and no progress on stderr (errors still show)."""
    global _quiet
    _quiet = bool(q)


def is_quiet() -> bool:
    return _quiet


def log(msg: str, *, verbose_only: bool = False) -> None:
    if _quiet or (verbose_only and not _verbose):
        return
    print(msg, file=sys.stderr, flush=True)


def emit(path) -> None:
    print(str(path), file=sys.stdout, flush=True)


def in_notebook() -> bool:
    """Whether this process is a Jupyter (IPython) kernel, where stderr is no terminal but
    rich can still draw. The shell's class is the sure sign; `ipykernel` imported with
    `JPY_PARENT_PID` set is the fallback. `JPY_PARENT_PID` alone is not enough: a
    `!cwa ...` subprocess started from a notebook cell inherits it without being a kernel."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        return True
    return "ipykernel" in sys.modules and "JPY_PARENT_PID" in os.environ


def _rich_in_notebook() -> bool:
    """rich draws a live display in a notebook through ipywidgets; without it it only
    warns, so a notebook without ipywidgets gets log lines instead."""
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def progress_line(description: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """One log line: description, done/total, percent (rounded down, so 100% means done),
    rate and elapsed time."""
    pct = f" ({done * 100 // total}%)" if total > 0 else ""
    rate = rate_text(done, elapsed, unit)
    return f"{description}: {done}/{total} {unit}{pct}, {rate + ', ' if rate else ''}{elapsed:.0f} s elapsed"


def rate_text(done: int, elapsed: float, unit: str) -> str:
    """`2.1 windows/s`, or below one per second the seconds each takes (`185.0 s/window`:
    a slow loop's rate would read 0.0 windows/s); empty before anything is done."""
    if done <= 0 or elapsed <= 0:
        return ""
    if done >= elapsed:
        return f"{done / elapsed:.1f} {unit}/s"
    one = unit[:-2] if unit.endswith(("ches", "shes", "xes")) else unit.removesuffix("s")
    return f"{elapsed / done:.1f} s/{one}"


@contextlib.contextmanager
def progress(description: str, total: int, unit: str = "windows") -> Iterator[Callable[[int], None]]:
    """Progress of a loop of `total` steps; yields `advance(n)`. A rich bar on stderr in a
    terminal, a rich display in a notebook, log lines on stderr otherwise (see the module
    docstring). `advance` raises a pending stop (SIGTERM / Ctrl-C) after counting the step;
    a loop that ends by an exception writes no final line. Quiet (`set_quiet`): nothing,
    but `advance` is still a stop point."""
    if _quiet:

        def advance(n: int) -> None:
            check_stop()

        yield advance
    elif in_notebook() and _rich_in_notebook():  # first: a kernel's stderr may claim a tty
        from rich.console import Console

        with _rich_progress(description, total, unit, Console(force_jupyter=True)) as advance:
            yield advance
    elif sys.stderr.isatty():
        from rich.console import Console

        with _rich_progress(description, total, unit, Console(stderr=True)) as advance:
            yield advance
    else:
        with _log_progress(description, total, unit) as advance:
            yield advance


@contextlib.contextmanager
def _log_progress(description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """Plain lines on stderr, at most one per `LOG_INTERVAL_S` of `_clock`, and a last one
    at the end when a line was written before or `--verbose` asks for it."""
    start = last = _clock()
    done, logged, every = 0, -1, log_interval()

    def advance(n: int) -> None:
        nonlocal done, last, logged
        done += n
        check_stop()
        now = _clock()
        if now - last >= every:
            last, logged = now, done
            log(progress_line(description, done, total, unit, now - start))

    yield advance
    if (logged >= 0 or _verbose) and logged != done:  # never the same line twice
        log(progress_line(description, done, total, unit, _clock() - start))


def log_interval() -> float:
    """Seconds between progress lines in a log: `CWA_PROGRESS_INTERVAL` (e.g. 60 for a long
    batch job, `inf` for none until the end), else `LOG_INTERVAL_S`."""
    v = os.environ.get("CWA_PROGRESS_INTERVAL", "").strip()
    try:
        got = float(v) if v else LOG_INTERVAL_S
    except ValueError:
        got = LOG_INTERVAL_S
    return got if got > 0 else LOG_INTERVAL_S


@contextlib.contextmanager
def _rich_progress(
    description: str, total: int, unit: str, console: Console
) -> Iterator[Callable[[int], None]]:
    """A rich bar on `console` (stderr, or a notebook's output) with the rate in `unit`/s."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, rate="")
        start = _clock()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            dt = _clock() - start
            bar.update(task, advance=n, rate=rate_text(done, dt, unit))
            check_stop()

        yield advance
