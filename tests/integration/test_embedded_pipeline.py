"""The stages on the embedded model: every metric from the CLI, a shell pipeline through
stdin paths, and the central claim — the top-K by grad_x_weight matters far more than
random-K and bottom-K — checked against the controls' own computed spread."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from cwa import artifacts as A
from cwa.cli import app
from cwa.metrics import METRICS

runner = CliRunner()
SMALL = ["--calib-samples", "4", "--seq-len", "64", "--batch-size", "4"]


def ok(args, **kw):
    r = runner.invoke(app, args, **kw)
    assert r.exit_code == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("metric", METRICS.names())
def test_every_metric_scores_the_embedded_model(metric, tmp_path):
    extra = ["--hutchinson-samples", "2"] if metric == "hutchinson_diag" else []
    path = ok(["score", "--metric", metric, *SMALL, *extra, "-o", str(tmp_path / "s.safetensors")])
    sc = A.open_scores(path)
    assert sc.metric == metric and sc.meta["cwa.model"] == "cwa-embedded-gpt2"
    assert "transformer.wte.weight" in sc.names and "transformer.h.0.attn.c_attn.weight" in sc.names
    t = sc.get("transformer.h.0.mlp.c_fc.weight")
    assert t.shape == (128, 512) and torch.isfinite(t).all() and t.abs().sum() > 0
    windows = sc.json_meta("cwa.windows")
    assert len(windows) == (0 if metric == "magnitude" else 4)


def test_bf16_tiny_model_scores_in_float32(tmp_path):
    from tests.integration.conftest import build_tiny, make_text

    model = build_tiny(tmp_path / "m", "gpt2", tied=True, dtype=torch.bfloat16)
    data = tmp_path / "d.txt"
    data.write_text(make_text(3000, 3))
    for metric in ("grad_x_weight", "hessian_diag", "act_mag"):
        path = ok(["score", "--model", str(model), "--dtype", "bfloat16", "--data", str(data), "--metric", metric,
                   "--seq-len", "16", "--calib-samples", "3", "-o", str(tmp_path / f"{metric}.safetensors")])
        sc = A.open_scores(path)
        assert sc.meta["cwa.model_dtype"] == "bfloat16"
        for n in sc.names:
            t = sc.get(n)
            assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_shell_pipeline_through_stdin(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cwa = f"{sys.executable} -m cwa"
    cmd = (f"{cwa} score --metric grad_x_weight {' '.join(SMALL)} | {cwa} rank - --topk 20 "
           f"| {cwa} perturb - --perturb zero --eval-samples 4 --seq-len 64")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) == 1 and out[0].endswith(".h5")
    art = A.read_h5(tmp_path / out[0], A.PERTURBATION_SCHEMA)
    cond = art.doc["conditions"]
    assert len(cond) == 1 and cond[0]["name"] == "topk" and cond[0]["n_changed"] == 20 and cond[0]["restored"]


def test_zeroing_the_topk_hurts_far_more_than_controls(tmp_path):
    scores = ok(["score", "--metric", "grad_x_weight", "--calib-samples", "16", "-o", str(tmp_path / "s.safetensors")])
    top = ok(["rank", scores, "--topk", "50", "-o", str(tmp_path / "top.h5")])
    rnd = ok(["control", scores, "--kind", "random_k", "--ref", top, "--control-draws", "10", "-o", str(tmp_path / "r.h5")])
    bot = ok(["control", scores, "--kind", "bottom_k", "--ref", top, "-o", str(tmp_path / "b.h5")])
    js = tmp_path / "pr.json"
    ok(["perturb", top, rnd, bot, "--perturb", "zero", "--eval-samples", "16", "--json", str(js),
        "-o", str(tmp_path / "p.h5")])
    res = json.loads(js.read_text())
    s = res["summary"]
    deltas = {c["name"]: [] for c in res["conditions"]}
    for c in res["conditions"]:
        deltas[c["name"]].append(c["delta_nll"])
    topk = deltas["topk"][0]
    # the top-K's whole bootstrap interval lies above every random draw and the bottom-K
    assert s["topk"]["ci95"][0] > max(deltas["random_k"])
    assert s["topk"]["ci95"][0] > s["bottom_k"]["delta_nll"]
    # and its effect dwarfs the random draws' spread (computed, not a stored number)
    spread = max(abs(d) for d in deltas["random_k"]) + 1e-12
    assert topk > 10 * spread
    assert s["random_k"]["topk_p_value"] == pytest.approx(1 / 11)
    assert all(c["restored"] for c in res["conditions"])
