"""Stopping (`cwa.stop`): a pending-stop flag set by the SIGTERM / Ctrl-C handler and
checked between Hessian-vector products, label draws, windows and batches; the `CWA_DEBUG`
switch (`cwa.console.debug_enabled`); one error line for an unexpected exception.

The subprocess cases are real `cwa.cli.main` processes that get real signals. They are
placed by hooks, not by timing: a log of the Hutchinson probes started (so "how far did
it get after the signal" is a count, not a duration), a finalizer that swallows the
handler's exception, and a cleanup that waits for the test's second signal before it
removes the temporary file. No assertion depends on how fast this machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.reliability_util import REPO, assert_clean_error, invoke, tmp_files

PROBES = 400  # Hutchinson probes in the one batch: far more than a stop may let through

CHILD = r"""
import os, pathlib, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores SIGINT
hook, marker = os.environ["CWA_TEST_HOOK"], os.environ["CWA_TEST_MARKER"]


def touch(path):
    open(path, "w").close()


if hook.startswith("probes"):  # log every probe started; optionally swallow a SIGTERM
    import cwa.metrics.hutchinson_diag as H

    real, log = H.probe_dot, open(marker + ".probes", "a", buffering=1)
    swallow_at = int(hook.split(":")[1]) if ":" in hook else -1

    class SwallowingFinalizer:  # like a weakref callback or __del__ during a backward pass
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here; its exception is discarded

    def probe_dot(g, seed, probe, param_index):
        if param_index == 0:
            log.write(f"{probe}\n")
            if probe == 0:
                touch(marker)
            if probe == swallow_at:
                SwallowingFinalizer()  # created and finalized at once
        return real(g, seed, probe, param_index)

    H.probe_dot = probe_dot
elif hook.startswith("cleanup"):  # park with the temp file written; hold the cleanup open
    import safetensors.torch as st

    real_save, real_unlink = st.save_file, pathlib.Path.unlink

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        touch(marker)
        time.sleep(600)  # the first signal ends this
        sys.exit("parked child was never signalled")

    def unlink(self, *a, **kw):
        if self.name.endswith(".tmp"):  # the cleanup of the interrupted write
            touch(marker + ".cleaning")
            go, t0 = pathlib.Path(marker + ".go"), time.monotonic()
            while hook == "cleanup-hang" or (not go.exists() and time.monotonic() - t0 < 120):
                if hook == "cleanup-hang":
                    import cwa.stop

                    pathlib.Path(marker + ".count").write_text(str(cwa.stop.signals_received()))
                time.sleep(0.01)  # bytecodes run here: a second signal's handler runs here
        return real_unlink(self, *a, **kw)

    st.save_file = save_file
    pathlib.Path.unlink = unlink

from cwa.cli import main

main(sys.argv[1:])
"""


@dataclass
class Child:
    name: str
    hook: str
    out: Path
    marker: Path
    proc: subprocess.Popen
    result: tuple | None = field(default=None)

    def wait_for(self, path: Path, timeout: float = 240.0) -> None:
        t0 = time.monotonic()
        while not path.exists():
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                rc = self.proc.returncode
                pytest.fail(f"{self.name}: child exited {rc} before {path.name}:\n{err}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{self.name}: no {path.name} after {timeout}s")
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def probes(self) -> list[int]:
        p = Path(str(self.marker) + ".probes")
        return [int(x) for x in p.read_text().split()] if p.exists() else []


@pytest.fixture(scope="module")
def children(tiny_gpt2, tmp_path_factory):
    """Start every child at once (their imports overlap); each test drives its own."""
    from tests.integration.conftest import make_text

    root = tmp_path_factory.mktemp("stop")
    text = root / "calib.txt"
    text.write_text(make_text(2000, 3))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CWA_DEBUG", None)
    specs = {
        "latency": "probes",
        "swallowed": "probes:3",
        "cleanup-SIGTERM": "cleanup",
        "cleanup-SIGINT": "cleanup",
        "cleanup-hang": "cleanup-hang",
    }
    kids = {}
    for name, hook in specs.items():
        d = root / name
        d.mkdir()
        out = d / "scores.safetensors"
        metric = []
        if hook.startswith("probes"):
            metric = ["--metric", "hutchinson_diag", "--hutchinson-samples", str(PROBES)]
        args = ["score", "--model", tiny_gpt2, "--data", text, "--seq-len", "16",
                "--calib-samples", "8", "--batch-size", "8", *metric, "-o", out]
        marker = root / f"{name}.marker"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)], cwd=d,
            env={**env, "CWA_TEST_HOOK": hook, "CWA_TEST_MARKER": str(marker)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        kids[name] = Child(name, hook, out, marker, proc)
    yield kids
    for c in kids.values():
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


def _assert_interrupted(c: Child, rc: int, out: str, err: str, sig: int = signal.SIGTERM) -> None:
    """The stop contract: exit 128 + the signal (143 SIGTERM, 130 Ctrl-C), one line,
    nothing on stdout, no artifact, no temporary file."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], (c.name, rc, err)
    assert lines == ["error: interrupted; no partial artifact was left"], f"{c.name}: {err}"
    assert out == "", f"{c.name}: a path was printed for an unfinished stage: {out!r}"
    assert not c.out.exists(), f"{c.name}: partial artifact {c.out}"
    assert not tmp_files(c.out.parent), f"{c.name}: stray temporary files {tmp_files(c.out.parent)}"


def test_sigterm_between_probes_stops_after_the_current_hvp(children):
    """A real SIGTERM while the probes run: at most the probe in flight (one HVP) and the
    next one may start after the signal, out of PROBES."""
    c = children["latency"]
    c.wait_for(c.marker)
    while len(c.probes()) < 3 and c.proc.poll() is None:
        time.sleep(0.01)
    seen = max(c.probes())
    c.proc.send_signal(signal.SIGTERM)
    rc, out, err = c.finish()
    _assert_interrupted(c, rc, out, err)
    assert max(c.probes()) <= seen + 2 < PROBES - 1, (seen, max(c.probes()))


def test_sigterm_swallowed_by_a_finalizer_still_stops_at_the_next_probe(children):
    """The handler runs inside a `__del__` at probe 3, where Python discards its exception
    ("Exception ignored in ..."); the pending flag makes the next probe's check raise it.
    Before the flag, the stop was lost: all PROBES ran and the artifact was written."""
    c = children["swallowed"]
    rc, out, err = c.finish(timeout=240)
    _assert_interrupted(c, rc, out, err)
    assert "Exception ignored" not in err
    assert max(c.probes()) == 3, c.probes()[-5:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_during_cleanup_leaves_no_temp_file(children, sig):
    """The first signal interrupts the write; a second one arrives while the temporary file
    is being removed. It is ignored, so the removal completes."""
    c = children[f"cleanup-{sig.name}"]
    c.wait_for(c.marker)
    assert tmp_files(c.out.parent), "no temporary file to clean up"
    c.proc.send_signal(sig)
    c.wait_for(Path(str(c.marker) + ".cleaning"))
    c.proc.send_signal(sig)
    Path(str(c.marker) + ".go").touch()  # after the signal was sent: the child is in its loop
    rc, out, err = c.finish()
    _assert_interrupted(c, rc, out, err, sig)


def test_third_signal_exits_a_hanging_cleanup_at_once(children):
    c = children["cleanup-hang"]
    c.wait_for(c.marker)
    c.proc.send_signal(signal.SIGTERM)
    c.wait_for(Path(str(c.marker) + ".cleaning"))
    count = Path(str(c.marker) + ".count")
    c.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    while not (count.exists() and count.read_text() == "2"):  # the second one was handled
        assert c.proc.poll() is None and time.monotonic() - t0 < 120, "second signal not seen"
        time.sleep(0.02)
    assert c.proc.poll() is None, "the second signal must not end the cleanup"
    c.proc.send_signal(signal.SIGTERM)
    rc, out, err = c.finish()
    assert rc == 143, err  # 128 + SIGTERM, the first stop's signal
    assert err.strip().splitlines()[-1] == "error: interrupted again; exiting at once", err


# -- in process: every long loop checks the flag --------------------------------------


@pytest.fixture
def lm(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gpt2), attn_implementation="eager")


@pytest.fixture(autouse=True)
def _clear_stop():
    from cwa import stop

    stop.reset()
    yield
    stop.reset()


def _counting(monkeypatch, module, attr, request_at: int = 1) -> list[int]:
    """Wrap `module.attr` to count its calls and request a stop during call `request_at`."""
    from cwa import stop

    real, calls = getattr(module, attr), []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == request_at:
            stop.request(signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(module, attr, wrapped)
    return calls


@pytest.mark.parametrize(
    "metric, module, attr, extra",
    [
        # between windows, between label draws, between probes
        ("grad_squared", "cwa.metrics.grad_squared", "window_losses", {}),
        ("hessian_diag", "cwa.metrics.hessian_diag", "token_nll", {"mc_samples": 4}),
        ("hutchinson_diag", "cwa.metrics.hutchinson_diag", "probe_dot",
         {"hutchinson_samples": 50}),
    ],
)
def test_metric_loops_stop_at_the_next_step(lm, monkeypatch, metric, module, attr, extra):
    """One batch of 6 windows: the stop requested during the first step is raised before
    the second (no batch boundary would come before the batch's end)."""
    import importlib

    import torch

    from cwa import stop
    from cwa.metrics import MetricOptions, compute_scores, select_params

    calls = _counting(monkeypatch, importlib.import_module(module), attr)
    ids = torch.randint(0, 100, (6, 16))
    params = select_params(lm)
    n_first = len(params) if attr == "probe_dot" else 1  # one probe = one node per parameter
    with pytest.raises(stop.Terminated):
        compute_scores(lm, params, ids, None, metric, MetricOptions(**extra), batch_size=6)
    assert len(calls) <= n_first, (len(calls), n_first)
    assert all(p.requires_grad for p in lm.parameters()), "scoring mode was not restored"


def test_compute_scores_stops_between_batches(lm, monkeypatch):
    import torch

    from cwa import stop
    from cwa.metrics import compute_scores, select_params
    from cwa.metrics.grad_x_weight import GradXWeight

    calls = _counting(monkeypatch, GradXWeight, "accumulate")
    ids = torch.randint(0, 100, (8, 16))
    with pytest.raises(stop.Terminated):
        compute_scores(lm, select_params(lm), ids, None, "grad_x_weight", batch_size=2)
    assert len(calls) == 1


def test_progress_advance_is_a_stop_point():
    from cwa import stop
    from cwa.console import progress

    steps = 0
    with pytest.raises(KeyboardInterrupt), progress("eval", 10) as advance:
        for _ in range(10):
            steps += 1
            if steps == 2:
                stop.request(signal.SIGINT)
            advance(1)
    assert steps == 2


def test_check_stop_is_a_no_op_without_a_request():
    from cwa import stop

    stop.check_stop()
    assert stop.pending() is None


# -- CWA_DEBUG ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, on",
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" on ", True),
     ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
     ("OFF", False), ("", False), ("2", False), ("debug", False), (None, False)],
)
def test_debug_flag_values(monkeypatch, value, on):
    from cwa.console import debug_enabled

    if value is None:
        monkeypatch.delenv("CWA_DEBUG", raising=False)
    else:
        monkeypatch.setenv("CWA_DEBUG", value)
    assert debug_enabled() is on


def test_debug_flag_in_a_real_process(tmp_path):
    """A CwaError (a missing scores file) prints a traceback only when the flag is on."""
    from tests.integration.reliability_util import cwa_subprocess

    args = ["rank", tmp_path / "missing.safetensors", "--topk", "3"]
    values = ("false", "off", "0", "yes", "1")
    procs = {v: cwa_subprocess(args, env={"CWA_DEBUG": v}, cwd=tmp_path) for v in values}
    for v, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1, (v, p.returncode, err)
        lines = [x for x in err.splitlines() if x.strip()]
        if v in ("yes", "1"):
            assert "Traceback" in err, (v, err)
        else:
            assert "Traceback" not in err, (v, err)
            assert len(lines) == 1 and lines[0].startswith("error: "), (v, err)
            assert "missing.safetensors" in lines[0]


# -- an unexpected exception: one line on both paths ------------------------------------


def _boom(*a, **kw):
    raise RuntimeError("boom\nsecond line of a torch-style message")


def test_unexpected_exception_is_one_line_in_cli_runner_and_main(monkeypatch, tmp_path, capsys):
    import cwa.stages
    from cwa import cli

    monkeypatch.setattr(cwa.stages, "rank_stage", _boom)
    monkeypatch.delenv("CWA_DEBUG", raising=False)
    scores = tmp_path / "s.safetensors"
    scores.write_bytes(b"")
    args = ["rank", str(scores), "--topk", "3"]

    line = assert_clean_error(invoke(args), 1, "RuntimeError: boom second line")
    assert "CWA_DEBUG" in line

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 1
    got = capsys.readouterr()
    assert got.err.strip() == line and got.out == ""

    r = invoke(args, env={"CWA_DEBUG": "1"})  # debug: the exception itself, with its traceback
    assert isinstance(r.exception, RuntimeError)
