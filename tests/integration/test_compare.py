"""`cwa compare` / `cwa.compare`: the files and figures, every CSV number against the
runs' own perturbation_results.json (and the summary statistics recomputed from its
conditions), the Jaccard matrix against a plain set computation (and a brute-force top-K
from the scores for a run that holds only a larger K), the location counts against a
count of parameter names, the mixed-run refusal, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cwa
from cwa import artifacts as A
from cwa.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
SMALL = dict(calib_samples=3, eval_samples=4, seq_len=32)
FIGURES = ["dose_response.png", "metric_comparison.png", "topk_jaccard_k20.png", "topk_location_k20.png",
           "headline_table.png"]


def build_runs(base: Path, gpt2: Path, llama: Path, docs: Path) -> dict[str, Path]:
    """Five small `cwa run` outputs on tiny models, built once per session directory
    (test_report.py uses them too): a = grad_x_weight K 10,20 seeds 0,1; b = magnitude
    K 20; c = act_mag K 30 seed 1 (no K 20: its top-20 is the first 20 of its top-30);
    d = magnitude on another model; e = magnitude on other evaluation windows. Only a
    draws its figures."""
    from cwa.pipeline import RunConfig
    from cwa.stages import DataOptions

    root = base / "compare_runs"
    specs = {
        "a": dict(model=gpt2, metric="grad_x_weight", topk=[10, 20], seeds=[0, 1]),
        "b": dict(model=gpt2, metric="magnitude", topk=[20], seeds=[0], save_plots=False),
        "c": dict(model=gpt2, metric="act_mag", topk=[30], seeds=[1], save_plots=False),
        "d": dict(model=llama, metric="magnitude", topk=[20], seeds=[0], controls=[], save_plots=False),
        "e": dict(model=gpt2, metric="magnitude", topk=[20], seeds=[0], controls=[], eval_samples=3,
                  save_plots=False),
    }
    if not (root / "done").is_file():
        for name, spec in specs.items():
            spec = dict(spec)
            data = DataOptions(data=str(docs), calib_samples=SMALL["calib_samples"], seq_len=SMALL["seq_len"],
                               eval_samples=spec.pop("eval_samples", SMALL["eval_samples"]))
            spec.setdefault("controls", ["random_k", "bottom_k"])
            cwa.run(RunConfig(model=str(spec.pop("model")), data=data, control_draws=4, out_dir=root / name, **spec))
        (root / "done").write_text("")
    return {n: root / n for n in specs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama, text_docs):
    return build_runs(tmp_path_factory.getbasetemp(), tiny_gpt2, tiny_llama, text_docs[0])


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "abc"
    r = runner.invoke(app, ["compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    return out, r


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(text: str) -> float | None:
    return None if text == "" else float(text)


def jvals(x):
    return None if x is None else float(x)


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# --------------------------------------------------------------------------- files


def test_compare_writes_the_files_and_figures(compared):
    out, r = compared
    assert r.stdout.strip() == str(out)
    for f in ("comparison.json", "comparison.csv", "report.html"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(FIGURES)
    for f in FIGURES:
        assert (out / "plots" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["schema"] == "comparison/1" and doc["mixed"] == []
    assert [r["label"] for r in doc["runs"]] == ["grad_x_weight", "magnitude", "act_mag"]
    assert doc["figures"] == [f"plots/{f}" for f in FIGURES]
    assert doc["overlap"]["k"] == 20 and doc["overlap"]["truncated"] == [False, False, True]
    assert doc["overlap"]["seeds"] == [0, 0, 1]  # no seed common to all: each run's first


def test_examples_09_and_10_end_with_compare():
    for name in ("09_compare_metrics.sh", "10_k_sweep.sh"):
        lines = [x for x in (REPO / "examples" / name).read_text().splitlines() if x.strip() and not x.startswith("#")]
        assert lines[-1].lstrip().startswith("cwa compare "), name


# --------------------------------------------------------------------------- rows


def test_csv_rows_equal_the_stored_results(compared, runs):
    out, _ = compared
    rows = read_csv(out / "comparison.csv")
    for name in ("a", "b", "c"):
        doc = json.loads((runs[name] / "perturbation_results.json").read_text())
        mine = [r for r in rows if r["run"] == str(runs[name])]
        conds = doc["conditions"]
        assert {(int(r["seed"]), int(r["k"]), r["condition"]) for r in mine} == {
            (c["seed"], c["k"], c["name"]) for c in conds}
        stored = _stored_summaries(doc)
        assert stored, name
        for r in mine:
            seed, k, cond = int(r["seed"]), int(r["k"]), r["condition"]
            same = [c for c in conds if (c["seed"], c["k"], c["name"]) == (seed, k, cond)]
            top = [c for c in conds if (c["seed"], c["k"], c["name"]) == (seed, k, "topk")][0]
            d = np.array([float(c["delta_nll"]) for c in same])
            # every row against the json's conditions (an independent reference)
            assert num(r["kl_from_baseline"]) == pytest.approx(np.mean([c["kl_from_baseline"] for c in same]), rel=1e-12)
            assert num(r["top1_agreement"]) == pytest.approx(np.mean([c["top1_agreement"] for c in same]), rel=1e-12)
            assert num(r["baseline_nll"]) == doc["baseline"]["nll"]
            assert int(r["n_draws"]) == len(same)
            assert r["perturbation"] == same[0]["method"] and float(r["scale"]) == same[0]["scale"]
            if len(same) > 1:  # a random control: mean, std, percentiles, p, z over its draws
                assert num(r["delta_nll"]) == pytest.approx(d.mean(), rel=1e-9, abs=1e-15)
                assert num(r["std"]) == pytest.approx(d.std(ddof=1), rel=1e-9, abs=1e-15)
                assert [num(r["ci95_lo"]), num(r["ci95_hi"])] == pytest.approx(
                    [np.percentile(d, 2.5), np.percentile(d, 97.5)], rel=1e-9, abs=1e-15)
                assert num(r["p_value"]) == pytest.approx((1 + (d >= top["delta_nll"]).sum()) / (len(d) + 1))
                assert num(r["z"]) == pytest.approx((top["delta_nll"] - d.mean()) / d.std(ddof=1), rel=1e-9)
            else:
                assert num(r["delta_nll"]) == float(same[0]["delta_nll"])
                assert r["std"] == r["p_value"] == r["z"] == ""
            # and, where the json holds this seed and K's summary, exactly its values
            s = stored.get((seed, k), {}).get(cond)
            if s is not None:
                assert num(r["delta_nll"]) == jvals(s.get("mean", s.get("delta_nll")))
                assert [num(r["ci95_lo"]), num(r["ci95_hi"])] == [jvals(x) for x in s["ci95"]]
                assert num(r["p_value"]) == jvals(s.get("topk_p_value"))
                assert num(r["z"]) == jvals(s.get("topk_z"))
                assert num(r["std"]) == jvals(s.get("std"))


def _stored_summaries(doc) -> dict[tuple[int, int], dict]:
    """(seed, K) -> summary, from summary, summary_by_seed (first K) and summary_by_k (first seed)."""
    ks = list(dict.fromkeys(c["k"] for c in doc["conditions"]))
    seeds = list(dict.fromkeys(c["seed"] for c in doc["conditions"]))
    out = {(seeds[0], ks[0]): doc["summary"]}
    out.update({(int(s), ks[0]): v for s, v in (doc.get("summary_by_seed") or {}).items()})
    out.update({(seeds[0], int(k)): v for k, v in (doc.get("summary_by_k") or {}).items()})
    return out


def test_api_compare_matches_the_cli_and_saves_again(compared, runs, tmp_path):
    out, _ = compared
    cmp = cwa.compare([runs["a"], runs["b"], runs["c"]])
    assert isinstance(cmp, cwa.Comparison) and cmp.path is None
    df = cmp.to_pandas()
    rows = read_csv(out / "comparison.csv")
    assert len(df) == len(rows) and list(df.columns) == list(rows[0])
    for got, want in zip(df.to_dict("records"), rows, strict=True):
        for col in ("delta_nll", "ci95_lo", "ci95_hi", "kl_from_baseline"):
            assert got[col] == num(want[col])
    target = tmp_path / "again"
    assert cmp.save(target, plots=False) == target and cmp.path == target
    (target / "plots" / "stale.png").write_bytes(b"x")
    cmp.save(target, plots=False)  # an earlier comparison's directory is reused, stale figures removed
    assert list((target / "plots").iterdir()) == []
    assert (target / "comparison.csv").read_text() == (out / "comparison.csv").read_text()
    assert "<img" not in (target / "report.html").read_text()


# --------------------------------------------------------------------------- overlap


def _set_of(path: Path) -> set[tuple[str, int]]:
    sel = A.read_selection(path)
    d = sel.draws[0]
    return {(sel.params[p], int(f)) for p, f in zip(d.param_index.tolist(), d.flat_index.tolist(), strict=True)}


def _brute_topk(scores_path: Path, k: int) -> set[tuple[str, int]]:
    """The top-K by |score| from a stable descending sort of the concatenation in
    param_order: the SPEC's tie rule, computed the plain way."""
    sc = A.open_scores(scores_path)
    order = sc.json_meta("cwa.param_order")
    vals = np.concatenate([np.abs(sc.get(n).float().numpy().ravel()) for n in order])
    owner = np.concatenate([np.full(sc.numel(n), i) for i, n in enumerate(order)])
    flat = np.concatenate([np.arange(sc.numel(n)) for n in order])
    idx = np.argsort(-vals, kind="stable")[:k]
    return {(order[owner[i]], int(flat[i])) for i in idx}


def test_jaccard_is_a_plain_set_computation(compared, runs):
    out, _ = compared
    ov = json.loads((out / "comparison.json").read_text())["overlap"]
    sets = [_set_of(runs["a"] / "artifacts" / "topk_seed0_k20.h5"),
            _set_of(runs["b"] / "artifacts" / "topk_seed0.h5"),
            _brute_topk(runs["c"] / "artifacts" / "scores_seed1.safetensors", 20)]
    assert [len(s) for s in sets] == ov["sizes"] == [20, 20, 20]
    J = np.array(ov["jaccard"], dtype=float)
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            assert J[i, j] == pytest.approx(len(a & b) / len(a | b), abs=0), (i, j)
    n = sum(A.open_scores(runs["b"] / "artifacts" / "scores_seed0.safetensors").numel(x)
            for x in A.open_scores(runs["b"] / "artifacts" / "scores_seed0.safetensors").names)
    assert ov["random_jaccard"] == pytest.approx(20 / (2 * n - 20))
    # where each top-K lies: counts of parameter names by block and by module type
    loc = ov["location"]
    for s, blocks, types in zip(sets, loc["per_block"], loc["per_type"], strict=True):
        by_col = dict(zip(loc["columns"], blocks, strict=True))
        by_type = dict(zip(loc["types"], types, strict=True))
        for col, cnt in by_col.items():
            want = sum(1 for name, _ in s if (re.search(r"\.h\.(\d+)\.", name) or [None, None])[1] == col
                       or (col in ("wte", "wpe") and name == f"transformer.{col}.weight"))
            assert cnt == want, col
        for t, cnt in by_type.items():
            want = sum(1 for name, _ in s if re.sub(r"^transformer\.(h\.\d+\.)?", "", name).removesuffix(".weight") == t)
            assert cnt == want, t


def test_dose_response_figure_draws_the_stored_values(runs):
    cmp = cwa.compare([runs["a"], runs["b"]])
    fig = cwa.plots.comparison_dose_response(cmp)
    doc = json.loads((runs["a"] / "perturbation_results.json").read_text())
    ax = [a for a in fig.axes if a.get_title() == "grad_x_weight"][0]
    line = [ln for ln in ax.get_lines() if ln.get_label() == "top-K"][0]
    want = [np.mean([c["delta_nll"] for c in doc["conditions"] if c["name"] == "topk" and c["k"] == k])
            for k in (10, 20)]
    assert list(line.get_xdata()) == [10, 20]
    assert list(line.get_ydata()) == pytest.approx(want, rel=1e-12)
    rnd = [ln for ln in ax.get_lines() if ln.get_label() == "random_k"][0]
    want = [np.mean([c["delta_nll"] for c in doc["conditions"] if c["name"] == "random_k" and c["k"] == k])
            for k in (10, 20)]
    assert list(rnd.get_ydata()) == pytest.approx(want, rel=1e-12)
    band = ax.collections[0].get_paths()[0].vertices  # the random_k 2.5-97.5% band over draws and seeds
    for k in (10, 20):
        d = [c["delta_nll"] for c in doc["conditions"] if c["name"] == "random_k" and c["k"] == k]
        at = band[np.isclose(band[:, 0], k), 1]
        assert [at.min(), at.max()] == pytest.approx([np.percentile(d, 2.5), np.percentile(d, 97.5)], rel=1e-12)
    assert {a.get_title() for a in fig.axes if a.get_visible()} == {"grad_x_weight", "magnitude"}


# --------------------------------------------------------------------------- mixed


def test_runs_of_different_models_are_refused_unless_allowed(runs, tmp_path):
    args = ["compare", str(runs["a"]), str(runs["d"]), "-o", str(tmp_path / "m")]
    line = one_line_error(runner.invoke(app, args), 2)
    assert "different models" in line and "--allow-mixed" in line
    assert not (tmp_path / "m").exists()
    r = runner.invoke(app, [*args, "--allow-mixed", "--no-save-plots"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads((tmp_path / "m" / "comparison.json").read_text())
    assert doc["mixed"] == ["model"]
    cmp = cwa.compare([runs["a"], runs["d"]], allow_mixed=True)
    for figure in (cwa.plots.topk_jaccard, cwa.plots.headline_table):
        assert "[MIXED: model]" in figure(cmp).get_suptitle()
    assert {row["mixed"] for row in read_csv(tmp_path / "m" / "comparison.csv")} == {"model"}
    J = doc["overlap"]["jaccard"]
    assert J[0][1] == J[1][0] == "nan" and J[0][0] == J[1][1] == 1.0  # not the same weights
    assert "Mixed comparison (model)" in (tmp_path / "m" / "report.html").read_text()


def test_runs_on_different_evaluation_windows_are_refused_unless_allowed(runs, tmp_path):
    args = ["compare", str(runs["b"]), str(runs["e"]), "-o", str(tmp_path / "m")]
    line = one_line_error(runner.invoke(app, args), 2)
    assert "different evaluation windows" in line and "--allow-mixed" in line
    r = runner.invoke(app, [*args, "--allow-mixed", "--no-save-plots"])
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "m" / "comparison.json").read_text())["mixed"] == ["eval_data"]
    assert {row["mixed"] for row in read_csv(tmp_path / "m" / "comparison.csv")} == {"eval_data"}
    assert list((tmp_path / "m" / "plots").iterdir()) == []


# --------------------------------------------------------------------------- input


def test_labels_and_stdin(runs, tmp_path):
    out = tmp_path / "l"
    r = runner.invoke(app, ["compare", "-", "-o", str(out), "--labels", "G,M", "--topk", "20", "--no-save-plots"],
                      input=f"{runs['a']}\n{runs['b']}\n")
    assert r.exit_code == 0, r.stderr
    assert {row["label"] for row in read_csv(out / "comparison.csv")} == {"G", "M"}


def test_a_sweep_alone_is_compared(runs, tmp_path):
    cmp = cwa.compare(runs["a"])
    assert cmp.labels == ["grad_x_weight"] and cmp.overlap.k == 20
    assert {r["k"] for r in cmp.rows} == {10, 20}
    cmp.save(tmp_path / "one")
    assert not (tmp_path / "one" / "plots" / "topk_jaccard_k20.png").exists()  # one run: no matrix
    assert (tmp_path / "one" / "plots" / "dose_response.png").is_file()


@pytest.mark.parametrize("case", ["missing", "no_manifest", "file", "twice", "labels", "topk_absent",
                                  "topk_zero", "foreign_out", "out_is_input", "bad_manifest"])
def test_bad_input_is_one_line(case, runs, tmp_path):
    a, b = str(runs["a"]), str(runs["b"])
    out = str(tmp_path / "o")
    (tmp_path / "plain").mkdir()
    (tmp_path / "f.txt").write_text("x")
    code, args, want = {
        "missing": (1, [a, str(tmp_path / "nope")], "no such run directory"),
        "no_manifest": (1, [a, str(tmp_path / "plain")], "not a `cwa run` output directory"),
        "file": (2, [a, str(tmp_path / "f.txt")], "not a directory"),
        "twice": (2, [a, a], "given twice"),
        "labels": (2, [a, b, "--labels", "x"], "1 labels for 2 runs"),
        "topk_absent": (2, [a, b, "--topk", "1000"], "--topk 1000: not held by"),
        "topk_zero": (2, [a, b, "--topk", "0"], "--topk 0"),
        "foreign_out": (2, [a, b], "did not write"),
        "out_is_input": (2, [a, b, "-o", a], "is an input run directory"),
        "bad_manifest": (1, [a, str(tmp_path / "bad")], "unreadable"),
    }[case]
    if case == "foreign_out":
        Path(out).mkdir()
        (Path(out) / "keep.txt").write_text("mine")
    if case == "bad_manifest":
        shutil.copytree(runs["b"], tmp_path / "bad")
        (tmp_path / "bad" / "experiment_manifest.json").write_text("{not json")
    if "-o" not in args:
        args = [*args, "-o", out]
    line = one_line_error(runner.invoke(app, ["compare", *args]), code)
    assert want in line, line
    if case == "foreign_out":
        assert sorted(p.name for p in Path(out).iterdir()) == ["keep.txt"]


def test_compare_has_help_with_examples():
    r = runner.invoke(app, ["compare", "--help"])
    assert r.exit_code == 0 and "Examples" in r.stdout and "cwa compare" in r.stdout


def test_jaccard_agrees_with_the_stability_stage(runs):
    """`cwa stability` over the runs' scores is a second, separate implementation."""
    cmp = cwa.compare([runs["a"], runs["b"]])
    st = cwa.stability([runs["a"] / "artifacts" / "scores_seed0.safetensors",
                        runs["b"] / "artifacts" / "scores_seed0.safetensors"], topk=20)
    assert np.array(cmp.overlap.jaccard) == pytest.approx(np.array(st.doc["jaccard"], dtype=float), abs=0)
    assert cmp.overlap.random_jaccard == pytest.approx(st.random_jaccard)


def test_without_output_it_writes_under_cwa_out(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["compare", str(runs["b"]), "--no-save-plots"])
    assert r.exit_code == 0, r.stderr
    out = Path(r.stdout.strip())
    fp = json.loads((tmp_path / out / "comparison.json").read_text())["fingerprint"]
    assert out == Path("cwa-out") / f"compare-{fp[:16]}"
