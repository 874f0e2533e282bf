"""Adding a method is one registration: a metric, a control and a perturbation defined
in this file alone run through score -> rank -> control -> perturb from the Python API
and from the CLI, with no other change to cwa (the stages read the registries' facts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cwa
from cwa import artifacts as A
from cwa.controls import CONTROLS, Control
from cwa.losses import window_losses
from cwa.metrics import METRICS
from cwa.metrics.base import Metric, as_float32_cpu
from cwa.perturbation import PERTURBATIONS, Perturbation
from tests.integration.reliability_util import assert_ok, invoke


class GradAbs(Metric):
    """|dL/dw| summed over windows: a made-up metric for this test."""

    name = "grad_abs_test"
    summary = "|g| (test only)"
    options = ("mc_samples",)  # read from the registry: recorded in the fingerprint

    def accumulate(self, ids, window_indices, n_total) -> None:
        objective = window_losses(self.model, ids).sum() / n_total
        for acc, g in zip(self.acc.values(), self._grads(objective), strict=True):
            if g is not None:
                acc.add_(g.float())

    def finish(self):
        return {name: as_float32_cpu(acc.abs()) for name, acc in self.acc.items()}


def _halve(old, scale, prob, bit, u):
    return (old.to(torch.float64) * 0.5).to(old.dtype), None


def _first_k(scores, ref, draws, seed, weights, chunk_elems):
    """The first K entries of the first tensor that is not in the top-K (deterministic)."""
    from cwa.controls import _finish  # the shared finishing step: counts, info, population

    k = len(ref.draws[0].flat_index)
    taken = set(ref.draws[0].flat_index[ref.draws[0].param_index == 0].tolist())
    flat = [i for i in range(scores.numel(scores.names[0])) if i not in taken][:k]
    part = (np.zeros(len(flat), dtype=np.int64), np.asarray(flat, dtype=np.int64))
    return _finish("first_k_test", scores, ref, seed, [part], {})


@pytest.fixture
def registered():
    METRICS.add("grad_abs_test", GradAbs)
    PERTURBATIONS.add("halve_test", Perturbation("halve_test", _halve, None, (), "w -> w/2"))
    CONTROLS.add("first_k_test", Control("first_k_test", _first_k, stochastic=False))
    yield
    METRICS.remove("grad_abs_test")
    PERTURBATIONS.remove("halve_test")
    CONTROLS.remove("first_k_test")


def _check(res: A.Results, k: int) -> None:
    names = [c["name"] for c in res.conditions]
    assert names == ["topk", "first_k_test"]
    assert all(c["method"] == "halve_test" and c["restored"] for c in res.conditions)
    assert all(c["n_selected"] == k and c["n_changed"] == k for c in res.conditions)
    assert res.summary["first_k_test"]["n_draws"] == 1


def test_a_metric_control_and_perturbation_defined_here_run_from_the_api(registered, tiny_gpt2, tmp_path):
    lm = cwa.load_model(tiny_gpt2, device="cpu")
    text = tmp_path / "t.txt"
    from tests.integration.conftest import make_text

    text.write_text(make_text(3000, 1))
    sc = cwa.score(lm, metric="grad_abs_test", calib_samples=4, seq_len=16, data=text)
    # the metric's definition, against a plain loop over windows: |sum_n dL_n/dw| / N
    calib = cwa.DataOptions(data=str(text), calib_samples=4, seq_len=16).split(
        lm, seed=0, calib=True, evaluation=False).calibration
    name = sc.names[0]
    p = dict(lm.model.named_parameters())[name]
    total = torch.zeros_like(p, dtype=torch.float64)
    was = p.requires_grad
    p.requires_grad_(True)
    for n in range(len(calib)):
        (g,) = torch.autograd.grad(window_losses(lm.model, calib.ids[n : n + 1]).sum(), [p])
        total += g.double()
    p.requires_grad_(was)
    torch.testing.assert_close(sc.get(name).double(), (total / len(calib)).abs(), rtol=1e-4, atol=1e-9)
    top = cwa.rank(sc, topk=6)
    assert top.metric == "grad_abs_test" and len(top.draws[0].flat_index) == 6
    ctl = cwa.control(sc, kind="first_k_test", ref=top)
    assert ctl.kind == "first_k_test" and ctl.n_draws == 1
    res = cwa.perturb(lm, [top, ctl], method="halve_test", eval_samples=3, seq_len=16, data=text)
    _check(res, 6)
    assert "mc_samples" in sc.json_meta("cwa.options")  # the registry's `options` fact was read
    assert sc.get(name).shape == dict(lm.model.named_parameters())[name].shape


def test_the_same_methods_run_from_the_cli(registered, tiny_gpt2, tmp_path):
    from tests.integration.conftest import make_text

    text = tmp_path / "t.txt"
    text.write_text(make_text(3000, 1))
    common = ["--model", tiny_gpt2, "--data", text, "--seq-len", "16"]
    s, t, c, p = (tmp_path / n for n in ("s.safetensors", "t.h5", "c.h5", "p.h5"))
    assert_ok(invoke(["score", *common, "--metric", "grad_abs_test", "--calib-samples", "4", "-o", s]))
    assert_ok(invoke(["rank", s, "--topk", "6", "-o", t]))
    assert_ok(invoke(["control", s, "--kind", "first_k_test", "--ref", t, "-o", c]))
    assert_ok(invoke(["perturb", t, c, *common, "--perturb", "halve_test", "--eval-samples", "3", "-o", p]))
    _check(A.read_results(p), 6)
    assert Path(s).exists() and A.open_scores(s).metric == "grad_abs_test"
