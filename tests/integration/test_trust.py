"""Every number belongs to the model, data and seed it claims (issue 10): selections carry
their scores' seed so every seed has its control comparison, artifacts without a model
fingerprint or made for other shapes are refused, plots never mix models, the manifest
keeps the timings of the run that computed an artifact and names cwa's own commit, and
`magnitude_matched` reports how well it matched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cwa import artifacts as A
from tests.integration.reliability_util import SEQ, assert_clean_error, assert_ok, invoke

TINY = ["--calib-samples", "4", "--eval-samples", "3", "--seq-len", SEQ, "--control-draws", "3"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(k, out: Path, *extra: str) -> Path:
    assert_ok(invoke(["run", "--model", k.model, "--data", k.text, *TINY, "--out-dir", out,
                      "--no-save-plots", *extra]))
    return out


# --------------------------------------------------------------------------- seeds


def test_a_single_nonzero_seed_has_its_control_comparison(k, tmp_path):
    """`cwa run --seeds 42` (the seed document's example 2): the top-K selection stores
    seed 42, so the summary compares it with the controls of seed 42."""
    out = _run(k, tmp_path / "s42", "--seeds", "42")
    sel = A.read_selection(out / "artifacts" / "topk_seed42.h5")
    assert sel.seed == 42
    res = json.loads((out / "perturbation_results.json").read_text())
    assert res["summary"]["topk"]["seed"] == 42
    rk = res["summary"]["random_k"]
    assert rk["n_draws"] == 3 and rk["topk_p_value"] is not None
    deltas = [c["delta_nll"] for c in res["conditions"] if c["name"] == "random_k"]
    top = next(c["delta_nll"] for c in res["conditions"] if c["name"] == "topk")
    assert rk["topk_p_value"] == pytest.approx((1 + sum(d >= top for d in deltas)) / (len(deltas) + 1))
    cb = json.loads((out / "control_baselines.json").read_text())
    assert cb["random_k"]["effect"] == rk and cb["bottom_k"]["effect"] is not None


def test_every_seed_of_a_multi_seed_run_has_its_controls(k, tmp_path):
    out = _run(k, tmp_path / "s12", "--seeds", "1,2")
    res = json.loads((out / "perturbation_results.json").read_text())
    cb = json.loads((out / "control_baselines.json").read_text())
    for s in ("1", "2"):
        summ = res["summary_by_seed"][s]
        assert summ["topk"]["seed"] == int(s)
        assert summ["random_k"]["topk_p_value"] is not None and "bottom_k" in summ
        assert cb["by_seed"][s]["random_k"]["effect"] == summ["random_k"]
        assert cb["by_seed"][s]["random_k"]["seed"] == int(s)
    # every condition's seed is the seed of the perturb artifact it came from
    for s in (1, 2):
        doc = A.read_h5(out / "artifacts" / f"perturb_seed{s}.h5").doc
        assert {c["seed"] for c in doc["conditions"]} == {s}


def test_the_plots_of_a_run_show_every_seed(k, tmp_path, monkeypatch):
    import cwa.plots as P

    seen: list[Path] = []
    real = P.plot_artifacts

    def spy(paths, out_dir):
        seen.extend(Path(p) for p in paths)
        return real(paths, out_dir)

    monkeypatch.setattr(P, "plot_artifacts", spy)
    out = tmp_path / "plots"
    assert_ok(invoke(["run", "--model", k.model, "--data", k.text, *TINY, "--out-dir", out, "--seeds", "0,1"]))
    names = {p.name for p in seen}
    assert {"topk_seed0.h5", "topk_seed1.h5", "perturb_seed0.h5", "perturb_seed1.h5"} <= names


def test_rank_records_the_scores_seed_and_caches_per_seed(k, tmp_path):
    """Magnitude scores of two seeds are the same numbers (one fingerprint) but not the
    same experiment: each ranking carries its own seed, also through ./cwa-out's cache."""
    by_seed = {s: Path(assert_ok(invoke(["score", "--model", k.model, "--metric", "magnitude", "--seed", s])))
               for s in (0, 5)}
    assert by_seed[0] != by_seed[5] and A.open_scores(by_seed[5]).meta["cwa.seed"] == "5"
    s5 = tmp_path / "s5.safetensors"
    assert_ok(invoke(["score", "--model", k.model, "--metric", "magnitude", "--seed", "5", "-o", s5]))
    s0 = tmp_path / "s0.safetensors"
    assert_ok(invoke(["score", "--model", k.model, "--metric", "magnitude", "--seed", "0", "-o", s0]))
    r0 = Path(assert_ok(invoke(["rank", s0, "--topk", "5"])))
    r5 = Path(assert_ok(invoke(["rank", s5, "--topk", "5"])))
    assert r0 != r5
    assert A.read_selection(r0).seed == 0 and A.read_selection(r5).seed == 5
    c5 = Path(assert_ok(invoke(["control", s5, "--ref", r5, "--kind", "bottom_k"])))
    assert A.read_selection(c5).seed == 5


# --------------------------------------------------------------------------- foreign artifacts


def _reseal_selection(src: Path, dst: Path, edit) -> Path:
    """A copy of a selection with its provenance edited and a valid user-block hash: a
    well-formed artifact whose content says something else."""
    import h5py

    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        f.attrs["provenance"] = edit(prov)
    A._seal_userblock(dst)
    return dst


def test_a_selection_without_model_fingerprint_is_refused(k, tmp_path):
    def drop(prov):
        prov.pop("model_fingerprint")
        return json.dumps(prov)

    sel = _reseal_selection(k.topk, tmp_path / "nofp.h5", drop)
    r = invoke(["perturb", sel, "--model", k.model, *k.data(), "--eval-samples", "2", "-o", tmp_path / "p.h5"])
    assert_clean_error(r, 1, "nofp.h5", "no model fingerprint")
    unreadable = _reseal_selection(k.topk, tmp_path / "garbled.h5", lambda prov: "{not json")
    r = invoke(["perturb", unreadable, "--model", k.model, *k.data(), "--eval-samples", "2"])
    assert_clean_error(r, 1, "garbled.h5", "no model fingerprint")
    assert not (tmp_path / "p.h5").exists()


def test_scores_without_model_fingerprint_are_refused_with_a_model(k, tmp_path):
    sc = A.open_scores(k.scores)
    meta = {key: v for key, v in sc.meta.items() if key != "cwa.model_fingerprint"}
    bare = A.write_scores(tmp_path / "bare.safetensors", {n: sc.get(n) for n in sc.names}, meta)
    r = invoke(["rank", bare, "--topk", "5", "--model", k.model, "--csv", tmp_path / "t.csv"])
    assert_clean_error(r, 1, "bare.safetensors", "no model fingerprint")
    assert not (tmp_path / "t.csv").exists()
    assert_ok(invoke(["rank", bare, "--topk", "5", "-o", tmp_path / "ok.h5"]))  # no --model: nothing to check


def test_a_selection_made_for_other_shapes_is_refused(k, tmp_path):
    def transpose(prov):
        name = next(n for n, s in prov["shapes"].items() if len(s) == 2 and s[0] != s[1])
        prov["shapes"][name] = prov["shapes"][name][::-1]
        return json.dumps(prov)

    sel = _reseal_selection(k.topk, tmp_path / "transposed.h5", transpose)
    r = invoke(["perturb", sel, "--model", k.model, *k.data(), "--eval-samples", "2"])
    assert_clean_error(r, 1, "transposed.h5", "shape")


def test_scores_with_transposed_shapes_never_reach_the_csv(k, tmp_path):
    """Scores whose tensor has the model's name but a transposed shape: the CSV would write
    coordinates from one shape and values from another."""
    sc = A.open_scores(k.scores)
    name = next(n for n in sc.names if len(sc.shape(n)) == 2 and sc.shape(n)[0] != sc.shape(n)[1])
    tensors = {n: (sc.get(n).T.contiguous() if n == name else sc.get(n)) for n in sc.names}
    bad = A.write_scores(tmp_path / "t.safetensors", tensors, dict(sc.meta))
    r = invoke(["rank", bad, "--topk", "5", "--model", k.model, "--csv", tmp_path / "t.csv", "-o", tmp_path / "r.h5"])
    assert_clean_error(r, 1, "t.safetensors", name, "shape")
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "r.h5").exists()


# --------------------------------------------------------------------------- plots


def test_plot_of_a_directory_keeps_models_apart(k, tmp_path):
    """Top-K selections of two models in one folder are two groups, never two "seeds"."""
    d = tmp_path / "mixed"
    d.mkdir()
    assert_ok(invoke(["rank", k.scores, "--topk", "10", "-o", d / "a.h5"]))
    assert_ok(invoke(["rank", k.other_scores, "--topk", "10", "-o", d / "b.h5"]))
    paths = assert_ok(invoke(["plot", d, "-o", tmp_path / "plots"])).split()
    layer = sorted(Path(p).name for p in paths if p.endswith("layer_comparison.png"))
    metrics = {A.read_selection(d / f).metric for f in ("a.h5", "b.h5")}
    assert len(layer) == 2, layer  # one figure per model (also when the metrics differ)
    assert metrics  # grad_x_weight and magnitude


def test_plot_groups_one_metric_of_two_models_apart(k, tmp_path):
    d = tmp_path / "same-metric"
    d.mkdir()
    for name, model in (("a", k.model), ("b", k.other)):
        s = d / f"{name}.safetensors"
        assert_ok(invoke(["score", "--model", model, "--metric", "magnitude", "-o", s]))
        assert_ok(invoke(["rank", s, "--topk", "10", "-o", d / f"{name}.h5"]))
    paths = assert_ok(invoke(["plot", d, "-o", tmp_path / "plots"])).split()
    layer = [p for p in paths if p.endswith("layer_comparison.png")]
    assert len(layer) == 2, layer


# --------------------------------------------------------------------------- manifest


def test_a_cache_hit_rerun_keeps_the_first_runs_timings(k, tmp_path):
    out = _run(k, tmp_path / "m", "--seeds", "0")
    first = json.loads((out / "experiment_manifest.json").read_text())
    _run(k, out, "--seeds", "0")
    second = json.loads((out / "experiment_manifest.json").read_text())
    assert second["all_cache_hits"] and len(second["runs"]) == 2
    assert second["runs"][0]["started"] == first["started"]
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert b["cache_hit"] and b["compute_seconds"] == a["seconds"], (a, b)
        assert b["computed"] == first["started"]


def test_git_commit_is_cwas_own_not_the_working_directory(k, tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    proj = tmp_path / "someone-elses-repo"
    proj.mkdir()
    env = {"GIT_AUTHOR_NAME": "x", "GIT_AUTHOR_EMAIL": "x@y", "GIT_COMMITTER_NAME": "x", "GIT_COMMITTER_EMAIL": "x@y"}
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(proj), *cmd], check=True, env={**__import__("os").environ, **env})
    other = subprocess.run(["git", "-C", str(proj), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(proj)
    out = _run(k, tmp_path / "g", "--seeds", "0", "--perturb", "none", "--controls", "none")
    got = json.loads((out / "experiment_manifest.json").read_text())["git_commit"]
    if (repo / ".git").exists():
        ours = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert got is not None and got.startswith(ours)
    assert got is None or not got.startswith(other)


# --------------------------------------------------------------------------- magnitude_matched


def test_magnitude_matched_reports_its_achieved_match(k, tmp_path):
    """When the top-K are the largest weights there is no partner of their size outside
    the top-K: the control says how far off it is (independently recomputed here) and
    warns on stderr."""
    from safetensors.torch import load_file

    mag = tmp_path / "mag.safetensors"
    assert_ok(invoke(["score", "--model", k.model, "--metric", "magnitude", "-o", mag]))
    top = tmp_path / "top.h5"
    assert_ok(invoke(["rank", mag, "--topk", "30", "-o", top]))
    r = invoke(["control", mag, "--ref", top, "--kind", "magnitude_matched", "--model", k.model,
                "--control-draws", "2", "-o", tmp_path / "mm.h5"])
    assert r.exit_code == 0, r.stderr
    assert "warning: magnitude_matched" in r.stderr and "other |w| bins" in r.stderr
    sel = A.read_selection(tmp_path / "mm.h5")
    ref = A.read_selection(top)
    match = sel.info["achieved_match"]
    weights = load_file(str(Path(k.model) / "model.safetensors"))

    def absw(s, d):
        return np.array([abs(float(weights[s.params[p]].reshape(-1)[f])) for p, f in
                         zip(d.param_index, d.flat_index, strict=True)])

    t = np.sort(absw(ref, ref.draws[0]))
    ratios = np.concatenate([np.sort(absw(sel, d)) / t for d in sel.draws])
    assert match["ratio_quantiles"]["0.5"] == pytest.approx(float(np.quantile(ratios, 0.5)), rel=1e-6)
    assert match["ratio_quantiles"]["1.0"] == pytest.approx(float(ratios.max()), rel=1e-6)
    assert match["ratio_quantiles"]["0.5"] < 1.0  # partners are smaller than the largest weights
    assert sel.info["n_fallback"] > 3  # > 10% of 30


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("stage", ["eval", "perturb"])
def test_a_result_of_an_older_evaluation_definition_is_not_a_cache_hit(k, tmp_path, monkeypatch, stage):
    """bits_per_byte changed definition (counted in context): an `eval` or `perturb`
    result cached under the old definition must be recomputed, not returned."""
    from cwa import evaluation as evaluate
    from cwa.commands.common import data_options, model_options
    from cwa.stages import eval_stage, perturb_stage

    lm = model_options(str(k.model), None, "auto", "cpu", None, False, False).load()
    d = data_options(str(k.text), None, None, 4, 3, int(SEQ), 8)

    def once():
        if stage == "eval":
            return eval_stage(lm, d, output=tmp_path / "eval.json")
        return perturb_stage(lm, d, [k.topk], method="zero", output=tmp_path / "p.h5")

    first = once()
    assert once().cached and not first.cached
    monkeypatch.setattr(evaluate, "EVAL_VERSION", evaluate.EVAL_VERSION - 1)
    again = once()
    assert not again.cached and again.fingerprint != first.fingerprint
