"""benchmarks/gpu_check.py --tiny: the prepared GPU check runs the same code on the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_every_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("gpu_check", None)
    import gpu_check

    assert gpu_check.main(["--tiny", "--json", str(tmp_path / "g.json")]) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert [m["metric"] for m in doc["metrics"]] == list(gpu_check.METRICS)
    assert all("error" not in m and m["seconds_per_window"] > 0 and m["plan_likely_bytes"] > 0 for m in doc["metrics"])
    assert doc["perturb"] is not None and doc["perturb"]["delta_nll"] == doc["perturb"]["delta_nll"]  # not NaN
