"""Where the top-K weights are: the score distribution, blocks and module types.

* `sensitivity_distribution(sel)` — histograms of |score| over every scored weight and
  per module type, from the histograms `cwa rank` stores (``stats/``), with the top-K
  cutoff (the K-th |score|) where it is one number (global mode, ranked by |score|).
* `layer_comparison(sels)` — top-K count per block and per module type; over several
  seeds the bar is the mean and each seed a dot. The red ticks are what a uniformly
  random K would put there (K × the tensor's share of all scored weights): a bar above
  its tick is a block holding more than its share of the sensitive weights.
* `sensitivity_heatmap(sel)` — module type × block: the top-K count, and the mean
  |score| per tensor group when the selection stores per-tensor statistics.

Each takes a `cwa.ranking.Selection` (as `cwa rank` / `cwa.rank` / `cwa.read_selection`
give it) or the path of a selection artifact, and returns a `Figure`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cwa import artifacts as A
from cwa.errors import UsageError
from cwa.plots import style as S

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cwa.ranking import Selection


# --------------------------------------------------------------------------- the view


@dataclass
class SelView:
    """What the figures read of a selection, checked once."""

    sel: Selection
    metric: str
    seed: int  # the scores' seed (the selection's own where the provenance has none)
    model: str  # model fingerprint: selections of different models never share a figure
    model_name: str
    counts: np.ndarray  # entries per tensor in draw 0
    stats: dict | None  # the sensitivity stats document
    hist: dict | None  # edges, counts [P, B], zeros, nonfinite, params
    kth_key: float | None

    @property
    def params(self) -> list[str]:
        return self.sel.params


def view(sel: Selection) -> SelView:
    prov = sel.provenance if isinstance(sel.provenance, dict) else {}
    try:
        seed = int(prov.get("scores_seed", sel.seed))
    except (TypeError, ValueError):
        seed = int(sel.seed or 0)
    n = len(sel.params)
    counts = sel.draws[0].counts(n) if sel.draws else np.zeros(n, np.int64)
    stats = sel.doc.get("stats") if isinstance(sel.doc, dict) else None
    kth = sel.info.get("kth_key") if isinstance(sel.info, dict) else None
    return SelView(
        sel=sel,
        metric=str(sel.metric or prov.get("metric") or "unknown"),
        seed=seed,
        model=str(prov.get("model_fingerprint") or ""),
        model_name=str(prov.get("model") or "unknown"),
        counts=np.asarray(counts, dtype=np.int64),
        stats=stats if isinstance(stats, dict) else None,
        hist=_histograms(sel.arrays or {}, sel.params),
        kth_key=S.fnum(kth) if kth is not None else None,
    )


def _histograms(arrays: dict[str, Any], params: list[str]) -> dict | None:
    """The stored histograms when they are well-formed (increasing finite edges, one row
    of counts per tensor), else None."""
    edges = arrays.get("stats/edges")
    if edges is None or "stats/counts" not in arrays:
        return None
    e = np.asarray(edges)
    if not (e.dtype.kind == "f" and e.ndim == 1 and len(e) >= 2 and bool(np.all(np.isfinite(e)))):
        return None
    if not bool(np.all(np.diff(e.astype(np.float64)) > 0)):
        return None
    if np.asarray(arrays["stats/counts"]).shape != (len(arrays.get("stats/params", params)), len(e) - 1):
        return None
    return {
        "edges": e.astype(np.float64),
        "counts": np.asarray(arrays["stats/counts"], dtype=np.float64),
        "zeros": np.asarray(arrays.get("stats/zeros", np.zeros(len(params))), dtype=np.int64),
        "nonfinite": np.asarray(arrays.get("stats/nonfinite", np.zeros(len(params))), dtype=np.int64),
        "params": [str(x) for x in arrays.get("stats/params", params)],
    }


def _as_selection(sel: Selection | str | os.PathLike) -> Selection:
    return A.read_selection(sel) if isinstance(sel, str | os.PathLike) else sel


def _title_seeds(views: list[SelView]) -> str:
    seeds = sorted({v.seed for v in views})
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ",".join(map(str, seeds))


# --------------------------------------------------------------------------- distribution


def sensitivity_distribution(sel: Selection | str | os.PathLike) -> Figure:
    """Histogram of |score| overall and per module type, from the stored histograms.

    Raises `UsageError` when the selection stores no histograms (a control)."""
    v = view(_as_selection(sel))
    if v.hist is None or v.hist["counts"].sum() == 0:
        raise UsageError("no sensitivity distribution: the selection stores no score histograms")
    return _distribution(v)


@S.styled
def _distribution(v: SelView) -> Figure:
    fig, axes = S.new_figure(1, 2)
    ax0, ax1 = axes[0]
    _all_weights_panel(ax0, v)
    _by_type_panel(ax1, v.hist)
    fig.suptitle(f"Sensitivity distribution: {v.metric} ({_title_seeds([v])})")
    return fig


def _all_weights_panel(ax: Axes, v: SelView) -> None:
    h = v.hist
    edges, total = h["edges"], h["counts"].sum(axis=0)
    ax.stairs(total, edges, fill=True, color=S.BAR_COLOR, alpha=0.85, label="all scored weights")
    ax.set_xscale("log")
    ax.set_yscale("log")
    sel = v.sel
    if v.kth_key is not None and sel.mode == "global" and sel.rank_by == "abs" and v.kth_key > 0:
        red = S.COND_COLORS["topk"]
        ax.axvline(v.kth_key, color=red, ls="--", lw=1.2, label=f"top-{sel.k} cutoff")
        ax.axvspan(v.kth_key, edges[-1], color=red, alpha=0.08)
    ax.set_xlabel("|score|")
    ax.set_ylabel("weights per bin")
    ax.set_title("All scored weights")
    n_zero, n_bad = int(h["zeros"].sum()), int(h["nonfinite"].sum())
    extra = [f"{n_zero:,} exact zeros"] if n_zero else []
    if n_bad:
        extra.append(f"{n_bad:,} non-finite")
    ax.legend(loc="best", title=("not shown: " + ", ".join(extra)) if extra else None, title_fontsize=8)


def _by_type_panel(ax: Axes, h: dict) -> None:
    """One normalised histogram per module type: the 6 largest, the rest pooled."""
    edges, counts = h["edges"], h["counts"]
    by_type: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(counts.shape[1]))
    for i, n in enumerate(h["params"]):
        by_type[A.param_group(n)[1]] += counts[i]
    ranked = sorted(by_type, key=lambda t: -by_type[t].sum())
    shown, rest = ranked[:6], ranked[6:]
    groups = [(t, by_type[t]) for t in shown]
    if rest:
        groups.append((f"other ({len(rest)} types)", sum(by_type[t] for t in rest)))
    colors = S.EXTRA_COLORS + list(S.COND_COLORS.values())
    for j, (t, c) in enumerate(groups):
        if c.sum() > 0:
            ax.stairs(c / c.sum(), edges, color=colors[j % len(colors)], lw=1.4, label=t)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|score|")
    ax.set_ylabel("fraction of the group per bin")
    ax.set_title("By module type")
    ax.legend(loc="best", fontsize=7.5)


# --------------------------------------------------------------------------- layer comparison


def layer_comparison(sels: Selection | str | os.PathLike | list) -> Figure:
    """Top-K count per block (outside params in their own columns) and per module type;
    bars are the mean over the selections (seeds), dots each one, red ticks the
    uniform-random expectation. The selections must share metric, K, mode and model."""
    items = sels if isinstance(sels, list | tuple) else [sels]
    views = [view(_as_selection(s)) for s in items]
    if not views:
        raise UsageError("no layer comparison: no selection given")
    keys = {(v.metric, v.sel.k, v.sel.mode, v.sel.rank_by, v.model) for v in views}
    if len(keys) > 1:
        raise UsageError(
            "no layer comparison: the selections differ in metric, K, mode, rank_by or model"
        )
    return _layer_comparison(views)


def _sizes(v: SelView) -> np.ndarray | None:
    """Entries per tensor from the stats document or the histograms."""
    if v.stats and isinstance(v.stats.get("per_tensor"), dict):
        pt = v.stats["per_tensor"]
        if all(isinstance(pt.get(n), dict) and "count" in pt[n] for n in v.params):
            return np.array([int(pt[n]["count"]) for n in v.params], dtype=np.float64)
    if v.hist is not None and v.hist["params"] == v.params:
        return v.hist["counts"].sum(axis=1) + v.hist["zeros"] + v.hist["nonfinite"]
    return None


def _layer_counts(views: list[SelView], cols: list[str], col_of: dict[str, str], types: list[str]):
    """Top-K counts [selection, column] and [selection, module type]."""
    per_col = np.zeros((len(views), len(cols)))
    per_type = np.zeros((len(views), len(types)))
    for si, v in enumerate(views):
        for n, c in zip(v.params, v.counts, strict=True):
            if n in col_of:
                per_col[si, cols.index(col_of[n])] += c
                per_type[si, types.index(A.param_group(n)[1])] += c
    return per_col, per_type


def _expected(ref: SelView, cols: list[str], col_of: dict[str, str], types: list[str]):
    """The uniform-random expectation per column and per type (global mode), or Nones."""
    sizes = _sizes(ref) if ref.sel.mode == "global" else None
    if sizes is None or sizes.sum() <= 0:
        return None, None
    k_total = ref.counts.sum()
    exp_col, exp_type = np.zeros(len(cols)), np.zeros(len(types))
    for n, sz in zip(ref.params, sizes, strict=True):
        exp_col[cols.index(col_of[n])] += k_total * sz / sizes.sum()
        exp_type[types.index(A.param_group(n)[1])] += k_total * sz / sizes.sum()
    return exp_col, exp_type


@S.styled
def _layer_comparison(views: list[SelView]) -> Figure:
    ref = views[0]
    cols, col_of = S.layer_columns(ref.params)
    types = S.module_types(ref.params)
    per_col, per_type = _layer_counts(views, cols, col_of, types)
    exp_col, exp_type = _expected(ref, cols, col_of, types)
    fig, axes = S.new_figure(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax0, ax1 = axes[0]
    _per_block_panel(ax0, cols, per_col, exp_col)
    fig.legend(loc="outside lower center", ncol=3)
    _per_type_panel(ax1, types, per_type, exp_type)
    mode = ", per tensor" if ref.sel.mode == "per_layer" else ""
    fig.suptitle(f"Where the top-{ref.sel.k}{mode} weights are: {ref.metric} ({_title_seeds(views)})")
    return fig


def _block_x(cols: list[str]) -> np.ndarray:
    """Column positions: a half-column gap around the numbered blocks."""
    x = np.arange(len(cols), dtype=np.float64)
    first_block = next((i for i, c in enumerate(cols) if c.isdigit()), None)
    if first_block is not None:
        last_block = max(i for i, c in enumerate(cols) if c.isdigit())
        x[first_block:] += 0.5 if first_block > 0 else 0.0
        x[last_block + 1 :] += 0.5
    return x


def _per_block_panel(ax: Axes, cols: list[str], per_col: np.ndarray, exp_col: np.ndarray | None) -> None:
    x = _block_x(cols)
    ax.bar(x, per_col.mean(axis=0), color=S.BAR_COLOR, alpha=0.85, label="top-K weights (mean)")
    if len(per_col) > 1:
        for si in range(len(per_col)):
            ax.plot(x, per_col[si], "o", color="black", ms=2.5, alpha=0.7,
                    label="each seed" if si == 0 else None)
    if exp_col is not None:
        ax.plot(x, exp_col, "_", color=S.COND_COLORS["topk"], ms=9, mew=2, label="uniform random")
    n_blocks = sum(c.isdigit() for c in cols)
    step = max(1, math.ceil(n_blocks / 16))
    shown = [i for i, c in enumerate(cols) if not c.isdigit() or int(c) % step == 0]
    ax.set_xticks([x[i] for i in shown])
    ax.set_xticklabels([cols[i] for i in shown])
    # names rotated, block numbers upright
    S.slant([lab for i, lab in zip(shown, ax.get_xticklabels(), strict=True) if not cols[i].isdigit()], 35)
    ax.set_xlabel("block (outside params by name)")
    ax.set_ylabel("weights in the top-K")
    ax.set_title("Per block")


def _per_type_panel(ax: Axes, types: list[str], per_type: np.ndarray, exp_type: np.ndarray | None) -> None:
    y = np.arange(len(types))
    ax.barh(y, per_type.mean(axis=0), color=S.BAR_COLOR, alpha=0.85)
    if len(per_type) > 1:
        for si in range(len(per_type)):
            ax.plot(per_type[si], y, "o", color="black", ms=2.5, alpha=0.7)
    if exp_type is not None:
        ax.plot(exp_type, y, "|", color=S.COND_COLORS["topk"], ms=9, mew=2)
    ax.set_yticks(y)
    ax.set_yticklabels(types)
    ax.invert_yaxis()
    ax.set_xlabel("weights in the top-K")
    ax.set_title("Per module type")


# --------------------------------------------------------------------------- heatmap


def sensitivity_heatmap(sel: Selection | str | os.PathLike) -> Figure:
    """Module type × block: top-K count, and mean |score| when the stats are stored.

    Raises `UsageError` when no parameter name has a block number."""
    v = view(_as_selection(sel))
    if not any(A.param_group(n)[0] is not None for n in v.params):
        raise UsageError("no sensitivity heatmap: no parameter name has a block number")
    return _heatmap(v)


def _heatmap_matrices(v: SelView):
    """(blocks, types, counts [type, block], mean |score| [type, block], outside counts)."""
    groups = [A.param_group(n) for n in v.params]
    blocks = sorted({b for b, _ in groups if b is not None})
    types = list(dict.fromkeys(t for b, t in groups if b is not None))
    counts = np.full((len(types), len(blocks)), np.nan)
    mean_abs = np.full((len(types), len(blocks)), np.nan)
    weight = np.zeros_like(mean_abs)
    pt = (v.stats or {}).get("per_tensor") or {}
    outside: dict[str, int] = defaultdict(int)
    for n, (b, t), c in zip(v.params, groups, v.counts, strict=True):
        if b is None:
            outside[t] += int(c)
            continue
        i, j = types.index(t), blocks.index(b)
        counts[i, j] = (0 if np.isnan(counts[i, j]) else counts[i, j]) + c
        st = pt.get(n) if isinstance(pt, dict) else None
        am = S.fnum(st.get("abs_mean")) if isinstance(st, dict) else math.nan
        cnt = S.fnum(st.get("count")) if isinstance(st, dict) else math.nan
        if math.isfinite(am) and math.isfinite(cnt) and cnt > 0:
            prev = 0.0 if np.isnan(mean_abs[i, j]) else mean_abs[i, j] * weight[i, j]
            weight[i, j] += cnt
            mean_abs[i, j] = (prev + am * cnt) / weight[i, j]
    return blocks, types, counts, mean_abs, outside


@S.styled
def _heatmap(v: SelView) -> Figure:
    from matplotlib.colors import LogNorm, Normalize

    blocks, types, counts, mean_abs, outside = _heatmap_matrices(v)
    has_scores = np.isfinite(mean_abs).any() and np.nanmax(mean_abs) > 0
    fig, axes = S.new_figure(2 if has_scores else 1, 1, sharex=True)
    # Counts start at 0 (an all-zero panel would otherwise get a -0.1..0.1 colour bar).
    top = np.nanmax(counts) if np.isfinite(counts).any() else 0
    _heatmap_panel(fig, axes[0][0], counts, types, "top-K weights", "viridis", Normalize(0, max(1.0, top)),
                   annotate=len(blocks) * len(types) <= 120)
    if has_scores:
        pos = mean_abs[np.isfinite(mean_abs) & (mean_abs > 0)]
        norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.max() > 10 * pos.min() else None
        _heatmap_panel(fig, axes[1][0], mean_abs, types, "mean |score|", "magma", norm, annotate=False)
    last = axes[-1][0]
    step = max(1, math.ceil(len(blocks) / 16))
    last.set_xticks(range(0, len(blocks), step))
    last.set_xticklabels([str(b) for b in blocks[::step]])
    last.set_xlabel("block")
    axes[0][0].set_title(f"Top-{v.sel.k} weights per block and module type")
    if has_scores:
        axes[1][0].set_title("Mean |score| per tensor group")
    sub = ""
    if outside:
        sub = " — outside blocks: " + ", ".join(f"{t} {c}" for t, c in outside.items())
    fig.suptitle(f"Sensitivity heatmap: {v.metric} ({_title_seeds([v])}){sub}")
    return fig


def _heatmap_panel(fig, ax: Axes, mat: np.ndarray, types: list[str], label: str, cmap: str, norm,
                   annotate: bool) -> None:
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")  # gray: no such tensor
    im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap=cm, norm=norm, interpolation="nearest")
    S.colorbar(fig, im, ax, label=label, pad=0.01)
    ax.set_yticks(range(len(types)))
    ax.set_yticklabels(types)
    ax.set_ylabel("module type")
    if not annotate:
        return
    hi = np.nanmax(mat) if np.isfinite(mat).any() else 0
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if np.isfinite(mat[i, j]):
                ax.text(j, i, f"{int(mat[i, j])}", ha="center", va="center", fontsize=7.5,
                        color="black" if mat[i, j] > 0.6 * hi else "white")
