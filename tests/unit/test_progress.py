"""`cwa.console.progress`: which display each place gets (terminal, notebook, log), and
the log lines' timing and numbers under a fake clock (no real-time thresholds here)."""

from __future__ import annotations

import io
import signal
import sys
import types

import pytest

from cwa import console


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0  # an arbitrary origin: only differences count

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(console, "_clock", c)
    monkeypatch.delenv("CWA_PROGRESS_INTERVAL", raising=False)
    monkeypatch.setattr(console, "_verbose", False)
    return c


@pytest.fixture
def no_kernel(monkeypatch):
    """A plain process: no IPython, no ipykernel, no Jupyter parent."""
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)


def _lines(capsys) -> list[str]:
    out = capsys.readouterr()
    assert out.out == ""  # stdout is for artifact paths only
    return [x for x in out.err.splitlines() if x.strip()]


def test_line_format():
    line = console.progress_line("score hutchinson_diag", 40, 128, "windows", 19.0)
    assert line == "score hutchinson_diag: 40/128 windows (31%), 2.1 windows/s, 19 s elapsed"
    assert "(99%)" in console.progress_line("eval", 127, 128, "windows", 1.0)  # rounded down
    assert "(100%)" in console.progress_line("eval", 128, 128, "windows", 1.0)
    # a slow loop (an 8 B model on a CPU) reads in seconds each, not "0.0 windows/s"
    assert console.progress_line("score grad_x_weight", 1, 8, "windows", 185.2) == (
        "score grad_x_weight: 1/8 windows (12%), 185.2 s/window, 185 s elapsed")
    assert console.rate_text(3, 7.5, "batches") == "2.5 s/batch" and console.rate_text(0, 5.0, "windows") == ""


def test_log_lines_only_after_the_interval_and_a_final_line(clock, no_kernel, capsys):
    # 1 step per second for 25 s: lines at 10 s and 20 s (not at 15 s), then the last one.
    with console.progress("score magnitude", 30, unit="batches") as advance:
        for _ in range(25):
            clock.t += 1.0
            advance(1)
            if clock.t - 1000.0 < 10.0:
                assert _lines(capsys) == []
        clock.t += 5.0  # the end comes later than the last step
    assert _lines(capsys) == [
        "score magnitude: 10/30 batches (33%), 1.0 batches/s, 10 s elapsed",
        "score magnitude: 20/30 batches (66%), 1.0 batches/s, 20 s elapsed",
        "score magnitude: 25/30 batches (83%), 1.2 s/batch, 30 s elapsed",
    ]


def test_interval_is_measured_from_the_last_line(clock, no_kernel, capsys, monkeypatch):
    monkeypatch.setattr(console, "LOG_INTERVAL_S", 4.0)
    times = [3.0, 4.0, 7.0, 8.25, 12.25]  # lines at 4 s, 8.25 s (4.25 after 4), 12.25 s
    with console.progress("eval", 100) as advance:
        for t in times:
            clock.t = 1000.0 + t
            advance(8)
    lines = _lines(capsys)
    # the last periodic line already says 40/100 at 12 s: the end adds no copy of it
    assert [x.split(", ")[-1] for x in lines] == ["4 s elapsed", "8 s elapsed", "12 s elapsed"]
    assert lines[0] == "eval: 16/100 windows (16%), 4.0 windows/s, 4 s elapsed"
    assert lines[-1] == "eval: 40/100 windows (40%), 3.3 windows/s, 12 s elapsed"


def test_short_loop_is_silent_unless_verbose(clock, no_kernel, capsys, monkeypatch):
    with console.progress("eval", 4) as advance:
        for _ in range(4):
            clock.t += 2.0
            advance(1)
    assert _lines(capsys) == []  # a short command's stderr keeps its one-line contract

    monkeypatch.setattr(console, "_verbose", True)
    with console.progress("eval", 4) as advance:
        for _ in range(4):
            clock.t += 2.0
            advance(1)
    assert _lines(capsys) == ["eval: 4/4 windows (100%), 2.0 s/window, 8 s elapsed"]


def test_no_final_line_when_the_loop_raises(clock, no_kernel, capsys):
    with pytest.raises(RuntimeError), console.progress("eval", 10) as advance:
        clock.t += 11.0
        advance(1)
        raise RuntimeError("boom")
    assert _lines(capsys) == ["eval: 1/10 windows (10%), 11.0 s/window, 11 s elapsed"]


def test_advance_is_a_stop_point_before_the_line(clock, no_kernel, capsys):
    from cwa import stop

    try:
        with pytest.raises(KeyboardInterrupt), console.progress("eval", 10) as advance:
            clock.t += 20.0
            stop.request(signal.SIGINT)
            advance(1)
    finally:
        stop.reset()
    assert _lines(capsys) == []


# -- which display ---------------------------------------------------------------------


class _Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _record_rich(monkeypatch) -> list:
    """Replace the rich display by a recorder of the rich Console it would draw on."""
    import contextlib

    seen = []

    @contextlib.contextmanager
    def fake(description, total, unit, rich_console):
        seen.append(rich_console)
        yield lambda n: None

    monkeypatch.setattr(console, "_rich_progress", fake)
    return seen


def _shell(name: str):
    return type(name, (), {})()


def _ipython(monkeypatch, shell) -> None:
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))


def test_notebook_detection(no_kernel, monkeypatch):
    assert not console.in_notebook()
    _ipython(monkeypatch, None)  # IPython imported, no shell running
    assert not console.in_notebook()
    _ipython(monkeypatch, _shell("TerminalInteractiveShell"))
    assert not console.in_notebook()
    _ipython(monkeypatch, _shell("ZMQInteractiveShell"))
    assert console.in_notebook()

    monkeypatch.delitem(sys.modules, "IPython")
    monkeypatch.setenv("JPY_PARENT_PID", "123")  # a `!cwa` subprocess of a notebook
    assert not console.in_notebook()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert console.in_notebook()


def test_terminal_gets_a_rich_bar_on_stderr(no_kernel, monkeypatch):
    seen = _record_rich(monkeypatch)
    monkeypatch.setattr(sys, "stderr", _Stderr(tty=True))
    with console.progress("eval", 3) as advance:
        advance(1)
    assert len(seen) == 1 and seen[0].stderr and not seen[0].is_jupyter


def test_notebook_gets_a_rich_display(no_kernel, monkeypatch, capsys):
    seen = _record_rich(monkeypatch)
    _ipython(monkeypatch, _shell("ZMQInteractiveShell"))
    monkeypatch.setattr(console, "_rich_in_notebook", lambda: True)
    with console.progress("eval", 3) as advance:
        advance(1)
    assert _lines(capsys) == []
    monkeypatch.setattr(sys, "stderr", _Stderr(tty=True))  # a kernel whose stderr claims a tty
    with console.progress("eval", 3) as advance:
        advance(1)
    assert len(seen) == 2 and all(c.is_jupyter for c in seen)


def test_notebook_without_ipywidgets_and_a_pipe_get_log_lines(clock, no_kernel, monkeypatch, capsys):
    seen = _record_rich(monkeypatch)
    _ipython(monkeypatch, _shell("ZMQInteractiveShell"))
    monkeypatch.setattr(console, "_rich_in_notebook", lambda: False)
    for _ in range(2):
        with console.progress("eval", 3) as advance:
            clock.t += 10.0
            advance(3)
        monkeypatch.delitem(sys.modules, "IPython", raising=False)  # then: a plain pipe
    assert seen == []
    assert _lines(capsys) == ["eval: 3/3 windows (100%), 3.3 s/window, 10 s elapsed"] * 2


def test_rich_bar_draws_count_and_rate(clock):
    from rich.console import Console

    buf = io.StringIO()
    rc = Console(file=buf, force_terminal=True, width=120)
    with console._rich_progress("score magnitude", 4, "batches", rc) as advance:
        for _ in range(4):
            clock.t += 0.5
            advance(1)
    text = buf.getvalue()
    assert "score magnitude" in text and "4/4" in text and "2.0 batches/s" in text


def test_interval_from_the_environment_and_no_line_twice(clock, no_kernel, capsys, monkeypatch):
    """`CWA_PROGRESS_INTERVAL` sets the interval; a loop whose last periodic line already
    said done/total does not repeat it at the end."""
    monkeypatch.setenv("CWA_PROGRESS_INTERVAL", "3")
    with console.progress("x", 2) as adv:
        clock.t += 3.0
        adv(1)
        clock.t += 3.0
        adv(1)
    got = _lines(capsys)
    assert got == ["x: 1/2 windows (50%), 3.0 s/window, 3 s elapsed", "x: 2/2 windows (100%), 3.0 s/window, 6 s elapsed"]
    monkeypatch.setenv("CWA_PROGRESS_INTERVAL", "not a number")
    assert console.log_interval() == console.LOG_INTERVAL_S
