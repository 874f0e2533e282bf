"""benchmarks/gpu_check.py --tiny: the prepared GPU check runs the same code on the CPU,
and is built to come back with numbers from its one try on a GPU."""

from __future__ import annotations

import gc
import json
import random
import sys
import weakref
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("gpu_check", None)
    import gpu_check

    return gpu_check


def test_gpu_check_tiny_runs_every_metric(gpu_check, tmp_path):
    assert gpu_check.main(["--tiny", "--json", str(tmp_path / "g.json")]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["complete"] and [m["metric"] for m in doc["metrics"]] == list(gpu_check.METRICS)
    assert all("error" not in m and m["seconds_per_window"] > 0 and m["plan_likely_bytes"] > 0 for m in doc["metrics"])
    assert doc["perturb"] is not None and doc["perturb"]["delta_nll"] == doc["perturb"]["delta_nll"]  # not NaN
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_check_builds_bf16_as_on_the_gpu(gpu_check, tmp_path):
    """The GPU's model dtype through the same code (default dtype switched while building)."""
    import torch

    assert gpu_check.main(["--tiny", "--dtype", "bfloat16", "--metrics", "magnitude,hutchinson_diag",
                           "--json", str(tmp_path / "g.json")]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["dtype"] == "torch.bfloat16" and all("error" not in m for m in doc["metrics"])
    assert doc["perturb"]["delta_nll"] == doc["perturb"]["delta_nll"]
    assert torch.get_default_dtype() == torch.float32  # restored


def test_gpu_check_holds_no_metric_scores_past_its_row(gpu_check, tmp_path, monkeypatch):
    """On Llama-3.1-8B each metric's float32 scores are 32 GB of host memory: the check must
    drop them before the next metric starts (keeping all six would be 192 GB); the JSON is
    on disk with every finished row by then."""
    import cwa.stages

    real, seen, rows_on_disk = cwa.stages.score_stage, [], []

    def score_stage(*args, **kw):
        gc.collect()
        assert all(ref() is None for ref in seen), "an earlier metric's scores are still alive"
        rows_on_disk.append(len(json.loads((tmp_path / "g.json").read_text())["metrics"]))
        r = real(*args, **kw)
        seen.append(weakref.ref(next(iter(r.value._tensors.values()))))
        return r

    monkeypatch.setattr(cwa.stages, "score_stage", score_stage)
    assert gpu_check.main(["--tiny", "--json", str(tmp_path / "g.json")]) == 0
    assert len(seen) == len(gpu_check.METRICS) and rows_on_disk == list(range(len(gpu_check.METRICS)))


def test_gpu_check_goes_on_after_a_failing_metric_and_stops_at_its_budget(gpu_check, tmp_path, monkeypatch):
    import cwa.stages

    real = cwa.stages.score_stage

    def score_stage(lm, data, *, metric, **kw):
        if metric == "hutchinson_diag":
            raise RuntimeError("CUDA error: an illegal memory access\nmore lines")
        return real(lm, data, metric=metric, **kw)

    monkeypatch.setattr(cwa.stages, "score_stage", score_stage)
    assert gpu_check.main(["--tiny", "--json", str(tmp_path / "g.json")]) == 0
    rows = {m["metric"]: m for m in json.loads((tmp_path / "g.json").read_text())["metrics"]}
    assert rows["hutchinson_diag"]["error"] == "RuntimeError: CUDA error: an illegal memory access"
    assert all("error" not in r and r["seconds"] > 0 for m, r in rows.items() if m != "hutchinson_diag")

    assert gpu_check.main(["--tiny", "--budget-s", "0", "--json", str(tmp_path / "b.json")]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["complete"] and all("time budget" in m["skipped"] for m in doc["metrics"]) and doc["perturb"] is None


def test_busy_seconds_is_the_union_of_intervals(gpu_check):
    rnd = random.Random(0)
    for _ in range(200):
        iv = [(a, a + rnd.randint(0, 30)) for a in (rnd.randint(0, 100) for _ in range(rnd.randint(0, 12)))]
        covered = {t for a, b in iv for t in range(a, b)}  # unit cells [t, t+1)
        assert gpu_check.busy_seconds([(float(a), float(b)) for a, b in iv]) == len(covered)


def test_profiler_intervals_as_the_gpu_path_reads_them(gpu_check):
    """The profiler API the idle share uses (events' device type and time range), read
    here from a CPU trace: on this torch version it gives intervals inside the wall time."""
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(256, 256)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            x = torch.tanh(x @ x)
    wall = time.perf_counter() - t0
    iv = gpu_check.device_intervals_s(prof, DeviceType.CPU)
    assert len(iv) >= 10 and all(0 <= a <= b for a, b in iv)
    assert 0 < gpu_check.busy_seconds(iv) <= wall
    assert gpu_check.device_intervals_s(prof, DeviceType.CUDA) == []  # no GPU events in a CPU trace


def test_a_failing_profiler_costs_only_the_idle_share(gpu_check, monkeypatch):
    """On the GPU every metric runs under the profiler: if it cannot start, stop or be
    read there, the metric's run and wall time must survive (shown here with the CPU
    profiler, the same code)."""
    import torch
    import torch.profiler
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    ran = []

    def work():
        x = torch.randn(128, 128)
        for _ in range(3):
            x = torch.tanh(x @ x)
        ran.append(1)

    wall, share, why = gpu_check.profiled(work, ProfilerActivity.CPU, DeviceType.CPU)
    assert ran == [1] and wall > 0 and 0.0 <= share <= 1.0 and why is None

    real = torch.profiler.profile

    def broken_start(*a, **k):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(torch.profiler, "profile", broken_start)
    wall, share, why = gpu_check.profiled(work, ProfilerActivity.CPU, DeviceType.CPU)
    assert ran == [1, 1] and wall > 0 and share is None and "did not start" in why and "CUPTI" in why

    class BrokenStop(real):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            raise RuntimeError("trace parse failed")

    monkeypatch.setattr(torch.profiler, "profile", BrokenStop)
    wall, share, why = gpu_check.profiled(work, ProfilerActivity.CPU, DeviceType.CPU)
    assert ran == [1, 1, 1] and share is None and "did not stop" in why

    monkeypatch.setattr(torch.profiler, "profile", real)
    with pytest.raises(ZeroDivisionError):
        gpu_check.profiled(lambda: 1 / 0, ProfilerActivity.CPU, DeviceType.CPU)
    assert not torch.autograd._profiler_enabled()  # stopped although fn failed
