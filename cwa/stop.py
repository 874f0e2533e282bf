"""Stopping on SIGTERM / Ctrl-C: a pending-stop flag set by the signal handler, and
`check_stop()` at the safe points of the long loops (between Hessian-vector products,
label draws, windows and batches).

Why a flag as well as an exception. CPython runs a Python signal handler only in the main
thread and only between bytecodes, so

- while the main thread is inside one C++ call (a backward pass, a Hessian-vector
  product) nothing can stop it; the handler runs when the call returns. The longest
  uninterruptible step is therefore one backward or one HVP of one batch (a smaller
  `--batch-size` makes it shorter); every loop around such steps calls `check_stop()`.
- when the handler happens to run inside a finalizer (`__del__`, a weakref callback, such
  as the ones `torch.utils.checkpoint` registers for every recomputed tensor, or the
  garbage collector), the exception it raises is discarded ("Exception ignored in ..."),
  and a bare `except:` in third-party code would discard it too. The flag survives that:
  the next `check_stop()` raises again.

The handler still raises at once: pure-Python code (data loading, evaluation, writing
artifacts) stops at the next bytecode without needing a check, and `finally` blocks
remove temporary files as on Ctrl-C. Only the first signal raises. A second one while
that stop is being cleaned up is ignored, so it cannot interrupt the removal of a
temporary file (unless the first exception was discarded by a finalizer: then it raises
again); a third one exits at once (`os._exit`), for a cleanup that hangs.

SIGTERM raises `Terminated`, SIGINT `KeyboardInterrupt`; the process then exits with
`exit_code(signal)` = 128 + the signal number, the shell's convention for a process ended
by a signal: 143 after SIGTERM, 130 after Ctrl-C. `handling()` installs the
handlers for the console script (`cwa.cli.main`); without it (library use, `CliRunner`)
nothing is ever pending and `check_stop()` is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

FORCE_AFTER = 3  # the signal that exits at once, even during cleanup


class Terminated(BaseException):
    """SIGTERM as an exception, so `finally` blocks clean up temporary files."""


_pending: int | None = None  # the signal of the first stop request, or None
_count = 0  # stop signals received since the handlers were installed
_discarded = False  # the first stop's exception was swallowed by a finalizer


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def exit_code(signum: int) -> int:
    """The exit status after a stop by signal `signum`: 128 + its number (SIGINT 130,
    SIGTERM 143), what a shell reports for a process the signal ended."""
    return 128 + int(signum)


def pending() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _pending


def signals_received() -> int:
    """How many stop signals arrived since `handling()` began (for tests)."""
    return _count


def request(signum: int = signal.SIGTERM) -> None:
    """Mark a stop as pending without raising (what the handler does before it raises);
    the next `check_stop()` raises it. A later request does not replace the first."""
    global _pending
    if _pending is None:
        _pending = int(signum)


def check_stop() -> None:
    """Raise the pending stop (`Terminated` or `KeyboardInterrupt`), if any. Call it
    between long uninterruptible steps, never in cleanup code."""
    if _pending is not None:
        raise _exception(_pending)


def reset() -> None:
    global _pending, _count, _discarded
    _pending, _count, _discarded = None, 0, False


def _handler(signum, frame) -> None:
    global _pending, _count, _discarded
    _count += 1
    if _pending is None:
        request(signum)
        raise _exception(signum)
    if _discarded:  # the first exception never reached the command: raise this one
        _discarded = False
        raise _exception(_pending)
    if _count >= FORCE_AFTER:
        with contextlib.suppress(Exception):
            print("error: interrupted again; exiting at once", file=sys.stderr, flush=True)
        os._exit(exit_code(_pending))
    # otherwise a stop is already unwinding: let its cleanup finish


def _unraisable_hook(previous):
    def hook(unraisable) -> None:
        global _discarded
        exc_type = getattr(unraisable, "exc_type", None)
        ours = isinstance(exc_type, type) and issubclass(exc_type, (Terminated, KeyboardInterrupt))
        if _pending is not None and ours:
            _discarded = True  # silently: check_stop() (or the next signal) raises it again
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install the stop handlers for SIGTERM and SIGINT (SIGINT only if it is not ignored,
    as in a background job); restore the previous handlers and clear the state on exit.
    A no-op outside the main thread (signal handlers can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(sig)
        if sig == signal.SIGINT and old is signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, _handler)
    old_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook(old_hook)
    reset()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        sys.unraisablehook = old_hook
        reset()
