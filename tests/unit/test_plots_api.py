"""`cwa.plots`: each figure function takes API objects and returns a Figure whose content
is the objects' numbers (checked against sums computed here from the parameter names and
shapes), refuses what it cannot draw with a one-line `UsageError`, `save` is atomic, and
`plot_artifacts` reads and verifies each file once."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cwa import artifacts as A
from cwa import plots
from cwa.errors import UsageError
from cwa.ranking import Draw, Selection
from tests.unit import test_plotting as TP

run_dir = TP.run_dir  # the artifacts of test_plotting: 2 seeds, K 10 and 20, a control, stability
METRIC = TP.METRIC
BLOCK_TYPES = ["attn.c_attn", "mlp.c_fc"]


@pytest.fixture(scope="module")
def objs(run_dir):
    art = run_dir / "artifacts"
    return {
        "sel": {(s, k): A.read_selection(art / f"topk_seed{s}_k{k}.h5") for s in (0, 1) for k in (10, 20)},
        "control": A.read_selection(art / "random_k_seed0.h5"),
        "res": [A.read_results(art / f"perturb_seed{s}.h5") for s in (0, 1)],
        "st": A.read_stability(art / "stability_k10.h5"),
        "dir": art,
    }


def _figure_type():
    from matplotlib.figure import Figure

    return Figure


def _texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def _counts_by(sel: Selection, key) -> dict:
    """Top-K entries of draw 0 per key(parameter name), a plain loop."""
    out: dict = {}
    for pi in sel.draws[0].param_index:
        k = key(sel.params[int(pi)])
        out[k] = out.get(k, 0) + 1
    return out


def _block(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[1] == "h" else parts[-2]  # transformer.h.<b>... / <name>.weight


# --------------------------------------------------------------------------- selections


def test_sensitivity_distribution_draws_the_stored_histograms(objs):
    sel = objs["sel"][0, 10]
    fig = plots.sensitivity_distribution(sel)
    assert isinstance(fig, _figure_type())
    assert fig.get_suptitle() == f"Sensitivity distribution: {METRIC} (seed 0)"
    ax0, ax1 = fig.axes
    assert (ax0.get_title(), ax1.get_title()) == ("All scored weights", "By module type")
    assert ax0.get_xscale() == "log" and ax0.get_xlabel() == "|score|"
    values, edges, _ = ax0.patches[0].get_data()
    np.testing.assert_array_equal(edges, sel.arrays["stats/edges"])
    np.testing.assert_array_equal(values, np.asarray(sel.arrays["stats/counts"]).sum(axis=0))
    cutoff = [ln for ln in ax0.lines if ln.get_label() == "top-10 cutoff"]
    assert len(cutoff) == 1 and cutoff[0].get_xdata()[0] == pytest.approx(sel.info["kth_key"])
    # per module type: each group's histogram is normalised
    assert {t.get_text() for t in ax1.get_legend().get_texts()} == {"wte", "lm_head", *BLOCK_TYPES}
    for patch in ax1.patches:
        assert patch.get_data()[0].sum() == pytest.approx(1.0)


def test_a_figure_also_takes_the_artifact_path(objs):
    fig = plots.sensitivity_distribution(objs["dir"] / "topk_seed1_k20.h5")
    assert fig.get_suptitle() == f"Sensitivity distribution: {METRIC} (seed 1)"


def test_a_control_has_no_distribution(objs):
    with pytest.raises(UsageError, match="no score histograms"):
        plots.sensitivity_distribution(objs["control"])


def test_layer_comparison_bars_are_the_mean_count_over_seeds(objs):
    sels = [objs["sel"][0, 10], objs["sel"][1, 10]]
    fig = plots.layer_comparison(sels)
    assert fig.get_suptitle() == f"Where the top-10 weights are: {METRIC} (seeds 0,1)"
    ax0, ax1 = fig.axes
    cols = ["wte", "0", "1", "2", "lm_head"]
    assert _texts(ax0.get_xticklabels()) == cols
    per_seed = [_counts_by(s, _block) for s in sels]
    want = [np.mean([c.get(col, 0) for c in per_seed]) for col in cols]
    assert [p.get_height() for p in ax0.patches] == pytest.approx(want)
    # the uniform-random expectation: K x the tensor's share of all scored weights
    shapes = TP._shapes()
    total = sum(a * b for a, b in shapes.values())
    exp = {c: 0.0 for c in cols}
    for n, (a, b) in shapes.items():
        exp[_block(n)] += 10 * a * b / total
    uniform = next(ln for ln in ax0.lines if ln.get_label() == "uniform random")
    assert list(uniform.get_ydata()) == pytest.approx([exp[c] for c in cols])
    assert _texts(ax1.get_yticklabels()) == ["wte", *BLOCK_TYPES, "lm_head"]
    types = [_counts_by(s, lambda n: A.param_group(n)[1]) for s in sels]
    want_t = [np.mean([c.get(t, 0) for c in types]) for t in ["wte", *BLOCK_TYPES, "lm_head"]]
    assert [p.get_width() for p in ax1.patches] == pytest.approx(want_t)


def test_layer_comparison_refuses_selections_of_different_k(objs):
    with pytest.raises(UsageError, match="differ in metric, K"):
        plots.layer_comparison([objs["sel"][0, 10], objs["sel"][0, 20]])


def test_sensitivity_heatmap_counts_per_block_and_type(objs):
    sel = objs["sel"][0, 20]
    fig = plots.sensitivity_heatmap(sel)
    top, scores = fig.axes[0], fig.axes[1]  # then the two colour bars
    assert top.get_title() == "Top-20 weights per block and module type"
    assert scores.get_title() == "Mean |score| per tensor group"
    assert _texts(top.get_yticklabels()) == BLOCK_TYPES
    assert _texts(scores.get_xticklabels()) == ["0", "1", "2"]
    got = top.images[0].get_array()
    counts = _counts_by(sel, lambda n: n)
    for i, t in enumerate(BLOCK_TYPES):
        for b in range(3):
            assert got[i, b] == counts.get(f"transformer.h.{b}.{t}.weight", 0)
    pt = sel.doc["stats"]["per_tensor"]
    np.testing.assert_allclose(
        scores.images[0].get_array()[1],
        [pt[f"transformer.h.{b}.mlp.c_fc.weight"]["abs_mean"] for b in range(3)],
    )
    outside = ", ".join(f"{t} {counts.get(f'{n}.weight', 0)}" for n, t in
                        (("transformer.wte", "wte"), ("lm_head", "lm_head")))
    assert fig.get_suptitle().endswith(f"(seed 0) — outside blocks: {outside}")


def test_no_heatmap_without_numbered_blocks():
    sel = Selection("topk", 2, "global", "m", "abs", 0, 0, ["wte.weight", "lm_head.weight"],
                    [Draw([0, 1], [0, 0], [1.0, 1.0])])
    with pytest.raises(UsageError, match="no parameter name has a block number"):
        plots.sensitivity_heatmap(sel)


# --------------------------------------------------------------------------- perturbations


def _conds(res: A.Results, name: str, k: int, field: str = "delta_nll") -> np.ndarray:
    return np.array([float(c[field]) for c in res.conditions if c["name"] == name and c["k"] == k])


def _mean_line(ax, i: int) -> float:
    """The y of the mean bar (a horizontal segment from i-0.32 to i+0.32)."""
    for coll in ax.collections:
        for seg in coll.get_segments():
            xs = [seg[0][0], seg[-1][0]] if len(seg) == 2 else None
            if xs == pytest.approx([i - 0.32, i + 0.32]):
                return float(seg[0][1])
    raise AssertionError(f"no mean bar at {i}")


def test_perturbation_effects_of_one_k(objs):
    res = objs["res"][0]
    fig = plots.perturbation_effects(res, k=10)
    ax0, ax1 = fig.axes
    # the document names no metric and its selections are gone: "unknown"
    assert fig.get_suptitle() == "Perturbing K = 10 weights (unknown, sign_flip (scale 1))"
    assert ax0.get_title() == "baseline NLL 3.000, perplexity 20.1"
    assert _texts(ax0.get_xticklabels()) == ["top-K", "random_k\n(6 draws)\np = 0.143", "bottom_k"]
    assert ax0.get_ylabel() == "ΔNLL vs baseline (nats/token)"
    assert _mean_line(ax0, 0) == pytest.approx(_conds(res, "topk", 10)[0])
    assert _mean_line(ax0, 1) == pytest.approx(_conds(res, "random_k", 10).mean())
    assert _mean_line(ax1, 1) == pytest.approx(_conds(res, "random_k", 10, "kl_from_baseline").mean())
    # top-K's error bar (the first drawn) is the summary's bootstrap CI
    from matplotlib.container import ErrorbarContainer

    bars = [c for c in ax0.containers if isinstance(c, ErrorbarContainer)]
    (x0, lo), (x1, hi) = bars[0].lines[2][0].get_segments()[0]
    assert x0 == x1 == pytest.approx(0.36)
    assert (lo, hi) == pytest.approx(tuple(res.summary["topk"]["ci95"]))
    assert "1 NaN result(s) not shown" in _texts(ax0.texts)  # bottom_k's NaN


def test_the_metric_of_a_condition_comes_from_its_selection(objs):
    doc = copy.deepcopy(objs["res"][0].doc)
    doc["selections"] = [str(objs["dir"] / "topk_seed0_k10.h5")] * 3  # still on disk
    fig = plots.perturbation_effects(A.Results(doc=doc), k=10)
    assert fig.get_suptitle() == f"Perturbing K = 10 weights ({METRIC}, sign_flip (scale 1))"


def test_perturbation_effects_marks_infinite_results(objs):
    fig = plots.perturbation_effects(objs["res"], k=20)  # seed 1's top-K at K = 20 is inf
    ax0 = fig.axes[0]
    assert "inf" in _texts(ax0.texts)
    assert _texts(ax0.get_xticklabels())[0] == "top-K\n(2 seeds)"
    assert _mean_line(ax0, 0) == pytest.approx(_conds(objs["res"][0], "topk", 20)[0])  # the finite one


def test_perturbation_effects_needs_one_k(objs):
    with pytest.raises(UsageError, match=r"K = 10, 20; pass k="):
        plots.perturbation_effects(objs["res"][0])
    with pytest.raises(UsageError, match="no conditions"):
        plots.perturbation_effects(objs["res"][0], k=99)


def test_dose_response_means_against_k(objs):
    res = objs["res"]
    fig = plots.dose_response(res)
    (ax,) = fig.axes
    assert fig.get_suptitle() == "Dose response: unknown, sign_flip (scale 1)"
    assert ax.get_xlabel() == "K (weights perturbed)"
    lines = {ln.get_label(): ln for ln in ax.lines if not ln.get_label().startswith("_")}
    assert set(lines) == {"top-K", "random_k"}  # bottom_k is NaN throughout
    assert list(lines["top-K"].get_xdata()) == [10, 20]
    assert list(lines["top-K"].get_ydata()) == pytest.approx([0.5, 1.0])  # seed 1's inf left out
    want = [np.mean(np.concatenate([_conds(r, "random_k", k) for r in res])) for k in (10, 20)]
    assert list(lines["random_k"].get_ydata()) == pytest.approx(want)
    assert "5 non-finite result(s) not shown" in _texts(ax.texts)  # 4 bottom_k NaN, 1 inf


def test_dose_response_needs_two_k(objs):
    doc = copy.deepcopy(objs["res"][0].doc)
    doc["conditions"] = [c for c in doc["conditions"] if c["k"] == 10]
    with pytest.raises(UsageError, match="one K"):
        plots.dose_response(A.Results(doc=doc))


# --------------------------------------------------------------------------- stability


def test_stability_shows_the_jaccard_matrix_and_overlap_against_k(objs):
    st = objs["st"]
    fig = plots.stability(st)
    ax0, ax1 = fig.axes[0], fig.axes[1]
    assert fig.get_suptitle() == f"Stability of the top-10 across seeds: {METRIC}"
    np.testing.assert_allclose(ax0.images[0].get_array(), st.doc["jaccard"])
    want = f"Jaccard: mean {st.mean_jaccard:.3f}, random {st.random_jaccard:.2g}"
    assert ax0.get_title().startswith(want)
    assert ax1.get_title() == "Overlap against K"
    mean = next(ln for ln in ax1.lines if ln.get_label() == "mean Jaccard")
    vs = st.doc["jaccard_vs_k"]
    ks = sorted(vs, key=int)
    assert list(mean.get_xdata()) == [int(k) for k in ks]
    assert list(mean.get_ydata()) == pytest.approx([vs[k] for k in ks])


def test_stability_without_a_jaccard_matrix_is_refused():
    with pytest.raises(UsageError, match="no Jaccard matrix"):
        plots.stability(A.Stability(doc={"k": 10}))


# --------------------------------------------------------------------------- comparison


def _metric_results(res: A.Results, metric: str, factor: float) -> A.Results:
    doc = copy.deepcopy(res.doc)
    doc["metric"] = metric
    doc["conditions"] = [c for c in doc["conditions"] if c["k"] == 10]
    for c in doc["conditions"]:
        c["delta_nll"] = float(c["delta_nll"]) * factor
    return A.Results(doc=doc)


def test_metric_comparison_puts_the_runs_side_by_side(objs):
    a = _metric_results(objs["res"][0], METRIC, 1.0)
    b = _metric_results(objs["res"][0], "magnitude", 3.0)
    fig = plots.metric_comparison([a, b])
    (ax,) = fig.axes
    assert fig.get_suptitle() == "Top-K against the controls"
    assert _texts(ax.get_xticklabels()) == [f"{METRIC}\nK = 10", "magnitude\nK = 10"]
    bars = {c.get_label(): [p.get_height() for p in c] for c in ax.containers}
    assert bars["top-K"] == pytest.approx([0.5, 1.5])
    rk = _conds(objs["res"][0], "random_k", 10).mean()
    assert bars["random_k"] == pytest.approx([rk, 3 * rk])
    assert bars["bottom_k"] == []  # NaN: noted, not drawn
    assert "2 non-finite result(s) not shown" in _texts(ax.texts)


def test_metric_comparison_needs_conditions():
    with pytest.raises(UsageError, match="no conditions"):
        plots.metric_comparison([A.Results(doc={"conditions": []})])


# --------------------------------------------------------------------------- saving


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_save_writes_a_png_atomically(objs, tmp_path):
    fig = plots.sensitivity_distribution(objs["sel"][0, 10])
    out = plots.save(fig, tmp_path / "figs" / "d.png")
    assert out == tmp_path / "figs" / "d.png"
    assert out.read_bytes()[:8] == TP.PNG_SIGNATURE and _pixels(out).shape[:2] == (675, 1050)
    assert [p.name for p in out.parent.iterdir()] == ["d.png"]

    def broken(*args, **kwargs):
        Path(args[0]).write_bytes(b"\x89PNG partial")
        raise RuntimeError("disk on fire")

    out.write_bytes(b"the old figure")
    fig.savefig = broken
    with pytest.raises(RuntimeError, match="disk on fire"):
        plots.save(fig, out)
    assert out.read_bytes() == b"the old figure"  # untouched, and no temporary file left
    assert [p.name for p in out.parent.iterdir()] == ["d.png"]


def test_a_figure_looks_the_same_under_other_rcparams(objs, tmp_path):
    """The house style is the figure's own: fig.savefig under a notebook's rcParams gives
    the image `save` gives (tick labels and their number are made at draw time)."""
    import matplotlib

    sel = objs["sel"][0, 10]
    a = plots.save(plots.sensitivity_distribution(sel), tmp_path / "a.png")
    fig = plots.sensitivity_distribution(sel)
    with matplotlib.rc_context({"xtick.labelsize": 20, "ytick.labelsize": 20, "font.size": 20}):
        fig.savefig(tmp_path / "b.png", format="png", dpi=150)
    np.testing.assert_array_equal(_pixels(a), _pixels(tmp_path / "b.png"))


# --------------------------------------------------------------------------- plot_artifacts


def test_plot_artifacts_reads_each_file_once(run_dir, tmp_path, monkeypatch):
    reads: dict[str, int] = {}
    real = A.read_h5

    def counting(path, *args, **kwargs):
        reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(A, "read_h5", counting)
    written = plots.plot_artifacts([run_dir / "artifacts"], tmp_path / "p")
    h5 = sorted(p.name for p in (run_dir / "artifacts").glob("*.h5"))
    assert reads == {name: 1 for name in h5}  # the scores files are not read at all
    assert len(written) == 10


def test_the_selection_read_with_the_plots_is_read_selection(run_dir):
    """`plot_artifacts` builds selections from the one read; they equal the typed reader's."""
    from cwa.plots.files import _selection_of

    for p in sorted((run_dir / "artifacts").glob("*.h5")):
        if A.artifact_schema(p) != A.SELECTION_SCHEMA:
            continue
        a, b = _selection_of(A.read_h5(p)), A.read_selection(p)
        for f in ("kind", "k", "mode", "metric", "rank_by", "seed", "ties_at_k", "params", "info",
                  "fingerprint", "provenance", "doc", "path"):
            assert getattr(a, f) == getattr(b, f), (p.name, f)
        assert a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
        for da, db in zip(a.draws, b.draws, strict=True):
            for f in ("param_index", "flat_index", "score"):
                np.testing.assert_array_equal(getattr(da, f), getattr(db, f))


def test_import_is_cheap_and_names_stay_functions():
    code = (
        "import sys, cwa.plots as P\n"
        "assert 'matplotlib' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
        "import cwa.plots.stability_analysis, cwa.plots.selection\n"
        "assert callable(P.stability) and callable(P.sensitivity_distribution)\n"
        "assert P.param_group('transformer.h.3.attn.c_attn.weight') == (3, 'attn.c_attn')\n"
        "assert sorted(P.__all__) == sorted(P._WHERE)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
