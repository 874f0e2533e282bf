"""Several runs side by side.

* `metric_comparison(results)` — bars of mean ΔNLL per (metric, K, method, mode, model).
* `comparison_dose_response(cmp)` — ΔNLL against K, one panel per metric (and mode,
  perturbation, model where runs differ in them): the top-K's mean over seeds (each seed
  a dot) and each control's mean with the 2.5–97.5 percentile band over its draws and
  seeds (an error bar where a panel has one K). Runs of one metric pool their K.
* `topk_jaccard(cmp)` — the Jaccard matrix of the runs' top-K sets at the common K.
* `topk_location(cmp)` — where each run's top-K lies: share per block and per module type.
* `headline_table(cmp)` — the headline numbers as a table figure.

The last four take a `cwa.comparison.Comparison` (or the run directories, compared
with the defaults of `cwa.compare`); a comparison that mixes models or evaluation
windows says so in each title.

`metric_comparison`: one group of bars per (metric, K, perturbation method, mode, model) found in the results
— typically one run per metric — and in each group one bar per condition: the mean ΔNLL
of top-K and of every control over its draws and seeds, each finite value a dot. A metric
that finds critical weights has a top-K bar far above its controls; comparing the groups
shows which metric's top-K hurts the model most at the same K and perturbation. The
groups' baselines may differ (other data, other models), so the bars are ΔNLL, not NLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cwa.errors import UsageError
from cwa.plots import style as S
from cwa.plots.perturbation import Cond, ResultsLike, as_results, conditions, effects_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cwa.comparison import Comparison


def metric_comparison(results: ResultsLike | Sequence[ResultsLike]) -> Figure:
    """Mean ΔNLL of top-K and the controls, one group of bars per metric/K/method.

    Raises `UsageError` when the results hold no conditions."""
    conds = conditions(as_results(results))
    if not conds:
        raise UsageError("no metric comparison: the results hold no conditions")
    return _comparison(conds)


def _group_labels(keys: list[tuple], conds: list[Cond]) -> list[str]:
    """`metric\\nK = k`, plus the method, mode or model where the groups differ in it."""
    names = {c.model: Path(c.model_name.rstrip("/")).name or c.model[:8] for c in conds}
    labels = []
    for metric, k, method, mode, model in keys:
        lab = f"{metric}\nK = {k}"
        for i, extra in ((2, method), (3, mode), (4, names.get(model, model))):
            if len({key[i] for key in keys}) > 1:
                lab += f"\n{extra}"
        labels.append(lab)
    return labels


@S.styled
def _comparison(conds: list[Cond]) -> Figure:
    keys = list(dict.fromkeys(effects_key(c) for c in conds))
    names = S.order(c.name for c in conds)
    width = 0.8 / len(names)
    wide = min(13.0, max(S.FIGSIZE[0], 0.45 * len(keys) * len(names) + 2))
    fig, axes = S.new_figure(1, 1, figsize=(wide, S.FIGSIZE[1]))
    ax = axes[0][0]
    allv: list[float] = []
    n_bad = 0
    for j, name in enumerate(names):
        xs, means = [], []
        for gi, key in enumerate(keys):
            v = np.array([c.delta_nll for c in conds if c.name == name and effects_key(c) == key])
            fin = v[np.isfinite(v)]
            n_bad += int(v.size - fin.size)
            if fin.size == 0:
                continue
            x = gi + (j - (len(names) - 1) / 2) * width
            xs.append(x)
            means.append(float(fin.mean()))
            allv.extend(fin.tolist())
            if fin.size > 1:
                ax.plot([x] * fin.size, fin, "o", color="black", ms=2.5, alpha=0.7, mec="none")
        ax.bar(xs, means, width=0.95 * width, color=S.cond_color(name, names), alpha=0.85,
               label=S.cond_label(name))
    ax.axhline(0, color="black", lw=0.8, ls=":")
    S.scale_y(ax, np.array(allv + [0.0]))
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(_group_labels(keys, conds))
    ax.set_ylabel("ΔNLL vs baseline (nats/token)")
    ax.set_title("mean over draws and seeds; dots: each value", fontsize=8.5)
    fig.legend(loc="outside right center")
    if n_bad:
        S.corner_note(ax, f"{n_bad} non-finite result(s) not shown")
    fig.suptitle("Top-K against the controls")
    return fig



# --------------------------------------------------------------------------- comparisons


def _as_comparison(cmp) -> Comparison:
    from cwa.comparison import Comparison, compare

    return cmp if isinstance(cmp, Comparison) else compare(cmp)


def _mixed_note(cmp: Comparison) -> str:
    return f" [MIXED: {', '.join(cmp.mixed)}]" if cmp.mixed else ""


def _dose_groups(cmp: Comparison) -> dict[tuple, list[int]]:
    """Runs that share one panel: same metric, mode and perturbation (and model and
    evaluation windows, which differ only in a mixed comparison)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(cmp.runs):
        key = (r.metric, r.mode, r.perturbation_text, r.model_fingerprint, r.eval_fingerprint)
        if any(p["run"] == i for p in cmp.points):
            groups.setdefault(key, []).append(i)
    return groups


def _panel_title(key: tuple, keys: list[tuple], cmp: Comparison, runs: list[int]) -> str:
    parts = [key[0]]
    for j in (1, 2):
        if len({k[j] for k in keys}) > 1:
            parts.append(str(key[j]))
    if len({k[3] for k in keys}) > 1:
        parts.append(cmp.runs[runs[0]].model_name or key[3][:12])
    if len({k[4] for k in keys}) > 1:
        parts.append(f"eval {key[4][:8]}")
    return ", ".join(parts)


def comparison_dose_response(cmp) -> Figure:
    """ΔNLL against K of every run, one panel per metric (see the module docstring).
    Raises `UsageError` when no run holds perturbation results."""
    cmp = _as_comparison(cmp)
    groups = _dose_groups(cmp)
    if not groups:
        raise UsageError("no dose response: no run holds perturbation results")
    return _dose_comparison(cmp, groups)


@S.styled
def _dose_comparison(cmp: Comparison, groups: dict[tuple, list[int]]) -> Figure:
    keys = list(groups)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = S.new_figure(nrows, ncols, figsize=(min(13.0, 4.4 * ncols + 1.8), 3.4 * nrows + 0.9), sharey=True)
    names = S.order(p["condition"] for p in cmp.points)
    allv: list[float] = [0.0]
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [p for p in cmp.points if p["run"] in groups[key]]
        allv += _dose_panel(ax, pts, names, cmp.runs[groups[key][0]].mode)
        ax.set_title(_panel_title(key, keys, cmp, groups[key]))
        ax.yaxis.set_tick_params(labelleft=True)
    S.scale_y(axes[0][0], np.array(allv))  # one y scale: the panels compare at a glance
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("ΔNLL vs baseline (nats/token)")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="outside right center",
               title="bands: 2.5–97.5%\nover draws", title_fontsize=8)
    fig.suptitle("ΔNLL against K: top-K and controls" + _mixed_note(cmp))
    return fig


def _dose_panel(ax: Axes, pts: list[dict], names: list[str], mode: str) -> list[float]:
    """One panel's lines, bands and dots; returns the finite values drawn."""
    ks = sorted({p["k"] for p in pts})
    allv: list[float] = []
    n_bad = 0
    for name in names:
        color = S.cond_color(name, names)
        xs, means, los, his = [], [], [], []
        for k in ks:
            v = np.array([p["delta_nll"] for p in pts if p["condition"] == name and p["k"] == k], dtype=float)
            fin = v[np.isfinite(v)]
            n_bad += int(v.size - fin.size)
            if fin.size == 0:
                continue
            lo, hi = S.pct(fin) if fin.size >= 2 else (float(fin[0]), float(fin[0]))
            xs.append(k)
            means.append(float(fin.mean()))
            los.append(lo)
            his.append(hi)
            allv.extend(fin.tolist())
            if name == "topk" and fin.size > 1:
                ax.plot([k] * fin.size, fin, "o", color=color, ms=3, alpha=0.6, mec="none", label="_seeds")
        if not xs:
            continue
        ax.plot(xs, means, "-o", color=color, ms=4, lw=1.6, label=S.cond_label(name))
        if name != "topk" and any(h > lo for lo, h in zip(los, his, strict=True)):
            if len(xs) > 1:
                ax.fill_between(xs, los, his, color=color, alpha=0.15, lw=0)
            else:
                ax.errorbar(xs, means, yerr=[[means[0] - los[0]], [his[0] - means[0]]], color=color,
                            capsize=3, lw=1.0, label="_band")
    ax.axhline(0, color="black", lw=0.8, ls=":", label="_zero")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    if len(ks) == 1:
        ax.set_xlim(ks[0] / 1.6, ks[0] * 1.6)
    ax.set_xlabel("K" + (" (per tensor)" if mode == "per_layer" else ""))
    if n_bad:
        S.corner_note(ax, f"{n_bad} non-finite not shown", where="bottom")
    return allv


def _need_overlap(cmp: Comparison, what: str, runs: int = 1):
    if cmp.overlap is None:
        raise UsageError(f"no {what}: the runs hold no common K")
    if len(cmp.runs) < runs:
        raise UsageError(f"no {what}: it needs {runs} or more runs")
    return cmp.overlap


def topk_jaccard(cmp) -> Figure:
    """The runs' pairwise Jaccard overlap of their top-K sets at the common K (grey:
    runs of different models). Raises `UsageError` with fewer than two runs."""
    cmp = _as_comparison(cmp)
    return _jaccard_figure(cmp, _need_overlap(cmp, "top-K Jaccard matrix", runs=2))


@S.styled
def _jaccard_figure(cmp: Comparison, ov) -> Figure:
    from cwa.comparison import fmt

    n = len(cmp.runs)
    side = min(11.0, 2.8 + 0.8 * n)
    fig, axes = S.new_figure(1, 1, figsize=(side + 1.2, side))
    ax = axes[0][0]
    J = np.ma.masked_invalid(np.array(ov.jaccard, dtype=float))
    cmap = __import__("matplotlib").colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(J, vmin=0, vmax=1, cmap=cmap)
    for i in range(n):
        for j in range(n):
            v = ov.jaccard[i][j]
            txt = "—" if not math.isfinite(v) else fmt(v, 2)
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if math.isfinite(v) and v < 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(cmp.labels)
    ax.set_yticklabels(cmp.labels)
    S.slant(ax.get_xticklabels(), 30)
    S.colorbar(fig, im, ax, label="Jaccard", shrink=0.8)
    seeds = f"seed {ov.seeds[0]}" if len(set(ov.seeds)) == 1 else "seeds " + ", ".join(map(str, ov.seeds))
    chance = f"; chance K/(2n−K) = {fmt(ov.random_jaccard)}" if ov.random_jaccard is not None else ""
    ax.set_title(f"{seeds}{chance}", fontsize=8.5)
    fig.suptitle(f"Top-{ov.k} overlap (Jaccard)" + _mixed_note(cmp))
    return fig


def topk_location(cmp) -> Figure:
    """Where each run's top-K lies: the share of its weights per block and per module
    type (counts written in the cells)."""
    cmp = _as_comparison(cmp)
    return _location_figure(cmp, _need_overlap(cmp, "top-K location"))


@S.styled
def _location_figure(cmp: Comparison, ov) -> Figure:
    n = len(cmp.runs)
    height = min(12.0, 2.2 + 0.9 * n)
    fig, axes = S.new_figure(2, 1, figsize=(min(13.0, max(7.0, 0.55 * max(len(ov.columns), len(ov.types)) + 3)), height))
    for ax, cols, counts, what in ((axes[0][0], ov.columns, ov.per_block, "block"),
                                   (axes[1][0], ov.types, ov.per_type, "module type")):
        c = np.array(counts, dtype=float)
        share = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, vmin=0, vmax=1, cmap="Reds", aspect="auto")
        if c.size <= 400:
            for i in range(c.shape[0]):
                for j in range(c.shape[1]):
                    if c[i, j]:
                        ax.text(j, i, str(int(c[i, j])), ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols)
        if what != "block" or max((len(x) for x in cols), default=0) > 3:
            S.slant(ax.get_xticklabels(), 30)
        ax.set_yticks(range(n))
        ax.set_yticklabels(cmp.labels)
        ax.set_title(f"per {what}", fontsize=9)
        S.colorbar(fig, im, ax, label="share of top-K")
    fig.suptitle(f"Where each top-{ov.k} lies (counts in the cells)" + _mixed_note(cmp))
    return fig


def headline_table(cmp) -> Figure:
    """The headline numbers (`cwa.comparison.headline_table`) as a table figure."""
    from cwa.comparison import headline_table as rows_of

    cmp = _as_comparison(cmp)
    cols, rows = rows_of(cmp)
    if not rows:
        raise UsageError("no headline table: no run holds perturbation results")
    return _table_figure(cmp, cols, rows)


@S.styled
def _table_figure(cmp: Comparison, cols: list[str], rows: list[list[str]]) -> Figure:
    chars = [max(len(c), *(len(r[i]) for r in rows)) + 2 for i, c in enumerate(cols)]
    width = min(18.0, max(6.0, 0.068 * sum(chars)))
    fig, axes = S.new_figure(1, 1, figsize=(width, 0.75 + 0.26 * (len(rows) + 1)))
    ax = axes[0][0]
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=cols, cellLoc="center", bbox=[0, 0, 1, 1],
                   colWidths=[c / sum(chars) for c in chars])
    tab.auto_set_font_size(False)
    tab.set_fontsize(7.5)
    for (r, _c), cell in tab.get_celld().items():
        if r == 0:
            cell.set_facecolor("#e8edf5")
            cell.set_text_props(weight="bold")
    fig.suptitle("Headline numbers (each run's first seed)" + _mixed_note(cmp))
    return fig
