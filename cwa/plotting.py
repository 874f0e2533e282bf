"""Figures drawn from artifacts alone (no model, no scores needed).

``plot_artifacts(paths, out_dir)`` reads every artifact given (a directory stands for every
artifact below it), groups them, and writes the figures it can:

=====================================================  ======================================
file                                                   drawn from
=====================================================  ======================================
``{metric}_k{K}_sensitivity_distribution.png``         top-K selection: ``stats/`` histograms
``{metric}_k{K}_layer_comparison.png``                 top-K selection(s): draw 0 (+ stats)
``{metric}_k{K}_sensitivity_heatmap.png``              top-K selection: draw 0 (+ stats)
``{metric}_k{K}_perturbation_effects.png``             perturbation results (all seeds)
``{metric}_k{K}_stability_analysis.png``               stability artifact
``{metric}_dose_response.png``                         perturbation results of two or more K
=====================================================  ======================================

Several seeds of one (metric, K) share one figure: the distribution and heatmap show the
first seed (lowest), the layer comparison shows the mean over seeds with each seed as a
dot. Selections of controls and scores artifacts are inputs of other stages and are not
plotted (a scores file may hold billions of values; `cwa rank` stores the histograms).
When two groups would get the same file name (e.g. the same metric and K in both modes,
or two perturbation methods), the distinguishing option is added before the figure kind.

Blocks and module types come from parameter names: ``transformer.h.3.attn.c_attn.weight``
is block 3, type ``attn.c_attn``; ``model.layers.0.mlp.up_proj.weight`` is block 0, type
``mlp.up_proj``; a parameter outside the numbered blocks (embeddings, final norm, head) is
its own column named by its last name component (``wte``, ``lm_head``).

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of
``pyplot``: nothing global is switched (a notebook's backend is left alone) and no figure
manager keeps figures alive. PNGs are written to a temporary file and renamed.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwa import artifacts as A
from cwa.console import log
from cwa.errors import ArtifactError, UsageError

FIGSIZE = (7.0, 4.5)
DPI = 150
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_COND_COLORS = {
    "topk": "#d62728",
    "random_k": "#1f77b4",
    "bottom_k": "#7f7f7f",
    "layer_matched": "#2ca02c",
    "magnitude_matched": "#9467bd",
}
_EXTRA_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_INPUT_LIKE = re.compile(r"(emb|wte|wpe|embed)", re.I)
_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- names


def param_group(name: str) -> tuple[int | None, str]:
    """(block number or None, module type) of a parameter name (see module docstring)."""
    m = _BLOCK_RE.search(name)
    if m:
        rest = m.group(2)
        return int(m.group(1)), rest[: -len(".weight")] if rest.endswith(".weight") else rest
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    parts = base.split(".")
    if base != name or len(parts) == 1:
        return None, parts[-1]
    return None, ".".join(parts[-2:])  # e.g. "ln_f.bias"


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(s)) or "unknown"


def _fnum(v: Any) -> float:
    """A float from a JSON value ("inf", "nan", None and numbers)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- loading


@dataclass
class _Sel:
    path: Path
    fingerprint: str
    metric: str
    k: int
    mode: str
    rank_by: str
    seed: int
    model: str  # model fingerprint: selections of different models never share a figure
    model_name: str
    params: list[str]
    counts: np.ndarray  # top-K entries per tensor (draw 0)
    stats: dict | None  # the sensitivity stats document
    hist: dict | None  # edges, counts [P, B], zeros, nonfinite, params
    kth_key: float | None


@dataclass
class _Pert:
    path: Path
    fingerprint: str
    doc: dict
    metric_of: list[str]  # per condition


@dataclass
class _Loaded:
    selections: list[_Sel] = field(default_factory=list)
    perturbations: list[_Pert] = field(default_factory=list)
    stabilities: list[A.H5Artifact] = field(default_factory=list)
    all_selections: dict[str, str] = field(default_factory=dict)  # file name / path -> metric
    skipped: list[str] = field(default_factory=list)


def _expand(paths: Iterable[Path]) -> list[tuple[Path, bool]]:
    """(file, explicitly named) pairs; a directory stands for every file below it."""
    out: list[tuple[Path, bool]] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out.append((f, False))
        else:
            out.append((p, True))
    return out


def _load(paths: Iterable[Path]) -> _Loaded:
    got = _Loaded()
    seen: set[str] = set()
    pending_perts: list[tuple[Path, A.H5Artifact]] = []
    for f, explicit in _expand(paths):
        if not explicit and f.suffix.lower() not in (".h5", ".hdf5", ".safetensors"):
            continue  # JSON reports, CSVs, PNGs of a run directory
        try:
            schema = A.artifact_schema(f)
        except ArtifactError:
            if explicit:
                raise
            got.skipped.append(f"{f} (not a cwa artifact)")
            continue
        key = str(f.resolve())
        if key in seen:
            continue
        seen.add(key)
        if schema == A.SCORES_SCHEMA:
            got.skipped.append(f"{f} (scores: plots read the histograms `cwa rank` stores)")
            continue
        art = A.read_h5(f)
        if art.fingerprint:
            if art.fingerprint in seen:
                continue  # the same artifact twice (a copy)
            seen.add(art.fingerprint)
        if schema == A.SELECTION_SCHEMA:
            sel = _read_sel(f, art)
            got.all_selections[f.name] = sel.metric
            got.all_selections[str(f)] = sel.metric
            if str(art.attrs.get("kind")) == "topk":
                got.selections.append(sel)
            else:
                got.skipped.append(f"{f} ({art.attrs.get('kind')} control selection)")
        elif schema == A.PERTURBATION_SCHEMA:
            pending_perts.append((f, art))
        elif schema == A.STABILITY_SCHEMA:
            if isinstance(art.doc, dict):
                got.stabilities.append(art)
        else:
            got.skipped.append(f"{f} ({schema})")
    known = sorted({s for s in got.all_selections.values() if s})
    for f, art in pending_perts:
        doc = art.doc if isinstance(art.doc, dict) else {}
        got.perturbations.append(
            _Pert(f, art.fingerprint, doc, _condition_metrics(doc, got.all_selections, known))
        )
    return got


def _read_sel(path: Path, art: A.H5Artifact) -> _Sel:
    # The validating reader: a damaged selection is an ArtifactError, never a crash here.
    sel_obj, _ = A.read_selection(path)
    a = art.attrs
    arrays = art.arrays
    params = list(sel_obj.params)
    counts = sel_obj.draws[0].counts(len(params)) if sel_obj.draws else np.zeros(len(params), np.int64)
    prov = A.provenance(art)
    seed = prov.get("scores_seed", a.get("seed", 0))
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        seed = int(a.get("seed", 0) or 0)
    hist = None
    edges = arrays.get("stats/edges")
    if (
        edges is not None
        and np.asarray(edges).dtype.kind == "f"
        and np.asarray(edges).ndim == 1
        and len(np.asarray(edges)) >= 2
        and bool(np.all(np.isfinite(edges)))
        and bool(np.all(np.diff(np.asarray(edges, dtype=np.float64)) > 0))
        and "stats/counts" in arrays
        and np.asarray(arrays["stats/counts"]).shape
        == (len(arrays.get("stats/params", params)), len(np.asarray(edges)) - 1)
    ):
        hist = {
            "edges": np.asarray(edges, dtype=np.float64),
            "counts": np.asarray(arrays["stats/counts"], dtype=np.float64),
            "zeros": np.asarray(arrays.get("stats/zeros", np.zeros(len(params))), dtype=np.int64),
            "nonfinite": np.asarray(
                arrays.get("stats/nonfinite", np.zeros(len(params))), dtype=np.int64
            ),
            "params": [str(x) for x in arrays.get("stats/params", params)],
        }
    stats = art.doc.get("stats") if isinstance(art.doc, dict) else None
    try:
        import json

        info = json.loads(a.get("info", "{}"))
    except (TypeError, ValueError):
        info = {}
    kth = info.get("kth_key") if isinstance(info, dict) else None
    return _Sel(
        path=path,
        fingerprint=art.fingerprint,
        metric=str(a.get("metric") or prov.get("metric") or "unknown"),
        k=int(sel_obj.k),
        mode=str(sel_obj.mode),
        rank_by=str(sel_obj.rank_by),
        seed=seed,
        model=str(prov.get("model_fingerprint") or ""),
        model_name=str(prov.get("model") or "unknown"),
        params=params,
        counts=np.asarray(counts, dtype=np.int64),
        stats=stats if isinstance(stats, dict) else None,
        hist=hist,
        kth_key=_fnum(kth) if kth is not None else None,
    )


def _condition_metrics(doc: dict, sel_metrics: dict[str, str], known: list[str]) -> list[str]:
    """The metric of each condition: its own field, the document's, the selection it
    came from (by path or file name among the given artifacts, or read if it still
    exists), or the single metric among the given selections."""
    conds = doc.get("conditions") or []
    sels = [str(s) for s in doc.get("selections") or []]
    cache: dict[int, str | None] = {}

    def of_selection(i: Any) -> str | None:
        if not isinstance(i, int) or not 0 <= i < len(sels):
            return None
        if i not in cache:
            p = Path(sels[i])
            m = sel_metrics.get(str(p)) or sel_metrics.get(p.name)
            if m is None and p.exists():
                try:
                    m = str(A.read_h5(p, A.SELECTION_SCHEMA).attrs.get("metric") or "") or None
                except ArtifactError:
                    m = None
            cache[i] = m
        return cache[i]

    out = []
    for c in conds:
        m = c.get("metric") or doc.get("metric") or of_selection(c.get("selection"))
        if not m:
            m = known[0] if len(known) == 1 else "unknown"
        out.append(str(m))
    return out


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(nrows: int = 1, ncols: int = 1, figsize=FIGSIZE, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path: Path) -> Path:
    with A.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _cond_color(name: str, order: list[str]) -> str:
    if name in _COND_COLORS:
        return _COND_COLORS[name]
    extras = [n for n in order if n not in _COND_COLORS]
    return _EXTRA_COLORS[extras.index(name) % len(_EXTRA_COLORS)] if name in extras else "#000000"


def _cond_label(name: str) -> str:
    return "top-K" if name == "topk" else name


def _scale_y(ax, values: np.ndarray) -> None:
    """Log (all positive) or symlog y when the finite values span over 2 decades, the
    linear band of symlog covering the bottom 4 decades below the largest |value|
    (effects that small read as zero next to the largest); limits padded in the
    transformed space so that no marker sits on the frame."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    a = np.abs(v[v != 0])
    if a.size < 2 or a.max() / a.min() <= 1e2:
        return
    if (v > 0).all():
        ax.set_yscale("log")
    else:
        lo = max(a.min(), a.max() * 1e-4)
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(lo)))
    tr = ax.yaxis.get_transform()
    t_lo, t_hi = tr.transform(np.array([v.min(), v.max()]))
    pad = 0.07 * (t_hi - t_lo)
    y_lo, y_hi = tr.inverted().transform(np.array([t_lo - pad, t_hi + pad]))
    ax.set_ylim(y_lo, y_hi)


def _mark_nonfinite(ax, xs: list[float], ys: list[float], color: str) -> int:
    """+inf / -inf drawn as triangles at the top / bottom edge; returns the NaN count."""
    n_nan = 0
    trans = ax.get_xaxis_transform()
    for x, y in zip(xs, ys, strict=True):
        if math.isnan(y):
            n_nan += 1
        elif math.isinf(y):
            top = y > 0
            ax.plot(
                [x],
                [0.97 if top else 0.03],
                marker="^" if top else "v",
                color=color,
                transform=trans,
                clip_on=False,
                ms=7,
                ls="none",
            )
            ax.annotate(
                "inf" if top else "-inf",
                (x, 0.97 if top else 0.03),
                xycoords=trans,
                xytext=(5, -3),
                textcoords="offset points",
                fontsize=8,
                color=color,
            )
    return n_nan


def _pct(v: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


# --------------------------------------------------------------------------- selections


def _sizes(sel: _Sel) -> np.ndarray | None:
    """Entries per tensor from the stats document or the histograms."""
    if sel.stats and isinstance(sel.stats.get("per_tensor"), dict):
        pt = sel.stats["per_tensor"]
        if all(isinstance(pt.get(n), dict) and "count" in pt[n] for n in sel.params):
            return np.array([int(pt[n]["count"]) for n in sel.params], dtype=np.float64)
    if sel.hist is not None and sel.hist["params"] == sel.params:
        return sel.hist["counts"].sum(axis=1) + sel.hist["zeros"] + sel.hist["nonfinite"]
    return None


def _columns(params: list[str]) -> tuple[list[str], dict[str, str]]:
    """Layer-comparison columns (input-like outside params, blocks, other outside params)
    and the column of each parameter."""
    col_of: dict[str, str] = {}
    blocks: set[int] = set()
    before, after = [], []
    for n in params:
        b, t = param_group(n)
        if b is not None:
            blocks.add(b)
            col_of[n] = str(b)
        else:
            col_of[n] = t
            dest = before if _INPUT_LIKE.search(t) else after
            if t not in dest:
                dest.append(t)
    return before + [str(b) for b in sorted(blocks)] + after, col_of


def _types(params: list[str]) -> list[str]:
    seen: list[str] = []
    for n in params:
        t = param_group(n)[1]
        if t not in seen:
            seen.append(t)
    return seen


def _title_seeds(sels: list[_Sel]) -> str:
    seeds = sorted({s.seed for s in sels})
    return f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + ",".join(map(str, seeds))


def plot_sensitivity_distribution(sel: _Sel, path: Path) -> Path | None:
    """Histogram of |score| overall and per module type, from the stored histograms."""
    h = sel.hist
    if h is None or h["counts"].sum() == 0:
        return None
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(1, 2)
        ax0, ax1 = axes[0]
        edges, counts = h["edges"], h["counts"]
        total = counts.sum(axis=0)
        ax0.stairs(total, edges, fill=True, color="#4c72b0", alpha=0.85, label="all scored weights")
        ax0.set_xscale("log")
        ax0.set_yscale("log")
        if (
            sel.kth_key is not None
            and sel.mode == "global"
            and sel.rank_by == "abs"
            and sel.kth_key > 0
        ):
            ax0.axvline(
                sel.kth_key,
                color=_COND_COLORS["topk"],
                ls="--",
                lw=1.2,
                label=f"top-{sel.k} cutoff",
            )
            ax0.axvspan(sel.kth_key, edges[-1], color=_COND_COLORS["topk"], alpha=0.08)
        ax0.set_xlabel("|score|")
        ax0.set_ylabel("weights per bin")
        ax0.set_title("All scored weights")
        n_zero, n_bad = int(h["zeros"].sum()), int(h["nonfinite"].sum())
        extra = [f"{n_zero:,} exact zeros"] if n_zero else []
        if n_bad:
            extra.append(f"{n_bad:,} non-finite")
        ax0.legend(
            loc="best",
            title=("not shown: " + ", ".join(extra)) if extra else None,
            title_fontsize=8,
        )

        by_type: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(counts.shape[1]))
        for i, n in enumerate(h["params"]):
            by_type[param_group(n)[1]] += counts[i]
        ranked = sorted(by_type, key=lambda t: -by_type[t].sum())
        shown, rest = ranked[:6], ranked[6:]
        groups = [(t, by_type[t]) for t in shown]
        if rest:
            groups.append((f"other ({len(rest)} types)", sum(by_type[t] for t in rest)))
        colors = _EXTRA_COLORS + list(_COND_COLORS.values())
        for j, (t, c) in enumerate(groups):
            if c.sum() > 0:
                ax1.stairs(c / c.sum(), edges, color=colors[j % len(colors)], lw=1.4, label=t)
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("|score|")
        ax1.set_ylabel("fraction of the group per bin")
        ax1.set_title("By module type")
        ax1.legend(loc="best", fontsize=7.5)
        fig.suptitle(f"Sensitivity distribution: {sel.metric} ({_title_seeds([sel])})")
        return _save(fig, path)


def plot_layer_comparison(sels: list[_Sel], path: Path) -> Path:
    """Top-K count per block (outside params in their own columns) and per module type;
    bars are the mean over seeds, dots the seeds, red ticks the uniform-random expectation."""
    import matplotlib

    ref = sels[0]
    cols, col_of = _columns(ref.params)
    types = _types(ref.params)
    per_col = np.zeros((len(sels), len(cols)))
    per_type = np.zeros((len(sels), len(types)))
    for si, s in enumerate(sels):
        for n, c in zip(s.params, s.counts, strict=True):
            if n in col_of:
                per_col[si, cols.index(col_of[n])] += c
                per_type[si, types.index(param_group(n)[1])] += c
    sizes = _sizes(ref) if ref.mode == "global" else None
    exp_col = exp_type = None
    if sizes is not None and sizes.sum() > 0:
        k_total = ref.counts.sum()
        exp_col, exp_type = np.zeros(len(cols)), np.zeros(len(types))
        for n, sz in zip(ref.params, sizes, strict=True):
            exp_col[cols.index(col_of[n])] += k_total * sz / sizes.sum()
            exp_type[types.index(param_group(n)[1])] += k_total * sz / sizes.sum()

    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        ax0, ax1 = axes[0]
        # a half-column gap separates the params outside the blocks from the blocks
        x = np.arange(len(cols), dtype=np.float64)
        first_block = next((i for i, c in enumerate(cols) if c.isdigit()), None)
        if first_block is not None:
            last_block = max(i for i, c in enumerate(cols) if c.isdigit())
            x[first_block:] += 0.5 if first_block > 0 else 0.0
            x[last_block + 1 :] += 0.5
        color = "#4c72b0"
        ax0.bar(x, per_col.mean(axis=0), color=color, alpha=0.85, label="top-K weights (mean)")
        if len(sels) > 1:
            for si in range(len(sels)):
                ax0.plot(
                    x,
                    per_col[si],
                    "o",
                    color="black",
                    ms=2.5,
                    alpha=0.7,
                    label="each seed" if si == 0 else None,
                )
        if exp_col is not None:
            ax0.plot(
                x, exp_col, "_", color=_COND_COLORS["topk"], ms=9, mew=2, label="uniform random"
            )
        n_blocks = sum(c.isdigit() for c in cols)
        step = max(1, math.ceil(n_blocks / 16))
        shown = [i for i, c in enumerate(cols) if not c.isdigit() or int(c) % step == 0]
        ax0.set_xticks([x[i] for i in shown])
        ax0.set_xticklabels([cols[i] for i in shown])
        for i, lab in zip(shown, ax0.get_xticklabels(), strict=True):
            if not cols[i].isdigit():  # names rotated, block numbers upright
                lab.set_rotation(35)
                lab.set_ha("right")
                lab.set_rotation_mode("anchor")
        ax0.set_xlabel("block (outside params by name)")
        ax0.set_ylabel("weights in the top-K")
        ax0.set_title("Per block")
        fig.legend(loc="outside lower center", ncol=3)

        y = np.arange(len(types))
        ax1.barh(y, per_type.mean(axis=0), color=color, alpha=0.85)
        if len(sels) > 1:
            for si in range(len(sels)):
                ax1.plot(per_type[si], y, "o", color="black", ms=2.5, alpha=0.7)
        if exp_type is not None:
            ax1.plot(exp_type, y, "|", color=_COND_COLORS["topk"], ms=9, mew=2)
        ax1.set_yticks(y)
        ax1.set_yticklabels(types)
        ax1.invert_yaxis()
        ax1.set_xlabel("weights in the top-K")
        ax1.set_title("Per module type")
        mode = ", per tensor" if ref.mode == "per_layer" else ""
        fig.suptitle(
            f"Where the top-{ref.k}{mode} weights are: {ref.metric} ({_title_seeds(sels)})"
        )
        return _save(fig, path)


def plot_sensitivity_heatmap(sel: _Sel, path: Path) -> Path | None:
    """Module type × block: top-K count, and mean |score| when the stats are stored."""
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    blocks = sorted({b for b, _ in map(param_group, sel.params) if b is not None})
    if not blocks:
        return None
    types = []
    for n in sel.params:
        b, t = param_group(n)
        if b is not None and t not in types:
            types.append(t)
    counts = np.full((len(types), len(blocks)), np.nan)
    mean_abs = np.full((len(types), len(blocks)), np.nan)
    weight = np.zeros_like(mean_abs)
    pt = (sel.stats or {}).get("per_tensor") or {}
    outside: dict[str, int] = defaultdict(int)
    for n, c in zip(sel.params, sel.counts, strict=True):
        b, t = param_group(n)
        if b is None:
            outside[t] += int(c)
            continue
        i, j = types.index(t), blocks.index(b)
        counts[i, j] = (0 if np.isnan(counts[i, j]) else counts[i, j]) + c
        st = pt.get(n) if isinstance(pt, dict) else None
        am = _fnum(st.get("abs_mean")) if isinstance(st, dict) else math.nan
        cnt = _fnum(st.get("count")) if isinstance(st, dict) else math.nan
        if math.isfinite(am) and math.isfinite(cnt) and cnt > 0:
            prev = 0.0 if np.isnan(mean_abs[i, j]) else mean_abs[i, j] * weight[i, j]
            weight[i, j] += cnt
            mean_abs[i, j] = (prev + am * cnt) / weight[i, j]
    has_scores = np.isfinite(mean_abs).any() and np.nanmax(mean_abs) > 0

    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(2 if has_scores else 1, 1, sharex=True)
        # Counts start at 0 (an all-zero panel would otherwise get a -0.1..0.1 colour bar).
        top = np.nanmax(counts) if np.isfinite(counts).any() else 0
        panels = [(axes[0][0], counts, "top-K weights", "viridis", Normalize(0, max(1.0, top)))]
        if has_scores:
            pos = mean_abs[np.isfinite(mean_abs) & (mean_abs > 0)]
            norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.max() > 10 * pos.min() else None
            panels.append((axes[1][0], mean_abs, "mean |score|", "magma", norm))
        annotate = len(blocks) * len(types) <= 120
        for ax, mat, label, cmap, norm in panels:
            masked = np.ma.masked_invalid(mat)
            cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")  # gray: no such tensor
            im = ax.imshow(masked, aspect="auto", cmap=cm, norm=norm, interpolation="nearest")
            fig.colorbar(im, ax=ax, label=label, pad=0.01)
            ax.set_yticks(range(len(types)))
            ax.set_yticklabels(types)
            ax.set_ylabel("module type")
            if annotate and label.startswith("top-K"):
                hi = np.nanmax(mat) if np.isfinite(mat).any() else 0
                for i in range(mat.shape[0]):
                    for j in range(mat.shape[1]):
                        if np.isfinite(mat[i, j]):
                            ax.text(
                                j,
                                i,
                                f"{int(mat[i, j])}",
                                ha="center",
                                va="center",
                                fontsize=7.5,
                                color="black" if mat[i, j] > 0.6 * hi else "white",
                            )
        last = panels[-1][0]
        step = max(1, math.ceil(len(blocks) / 16))
        last.set_xticks(range(0, len(blocks), step))
        last.set_xticklabels([str(b) for b in blocks[::step]])
        last.set_xlabel("block")
        axes[0][0].set_title(f"Top-{sel.k} weights per block and module type")
        if has_scores:
            axes[1][0].set_title("Mean |score| per tensor group")
        sub = ""
        if outside:
            sub = " — outside blocks: " + ", ".join(f"{t} {c}" for t, c in outside.items())
        fig.suptitle(f"Sensitivity heatmap: {sel.metric} ({_title_seeds([sel])}){sub}")
        return _save(fig, path)


# --------------------------------------------------------------------------- perturbations


@dataclass
class _Cond:
    name: str
    k: int
    method: str
    scale: Any
    mode: str
    seed: int
    draw: int
    delta_nll: float
    kl: float
    metric: str
    source: int  # index of the perturbation artifact
    model: str = ""  # model fingerprint
    model_name: str = ""


def _conditions(perts: list[_Pert]) -> list[_Cond]:
    out = []
    for si, p in enumerate(perts):
        for c, metric in zip(p.doc.get("conditions") or [], p.metric_of, strict=True):
            if not isinstance(c, dict):
                continue
            try:
                k = int(c.get("k"))
            except (TypeError, ValueError):
                continue
            out.append(
                _Cond(
                    name=str(c.get("name", "?")),
                    k=k,
                    method=str(c.get("method", "")),
                    scale=c.get("scale"),
                    mode=str(c.get("mode", "global")),
                    seed=int(c.get("seed", 0) or 0),
                    draw=int(c.get("draw", 0) or 0),
                    delta_nll=_fnum(c.get("delta_nll")),
                    kl=_fnum(c.get("kl_from_baseline")),
                    metric=metric,
                    source=si,
                    model=str(p.doc.get("model_fingerprint") or ""),
                    model_name=str(p.doc.get("model") or ""),
                )
            )
    return out


def _order(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [n for n in _COND_COLORS if n in names]
    return known + [n for n in names if n not in known]


def _method_text(conds: list[_Cond]) -> str:
    c = conds[0]
    sc = _fnum(c.scale)
    return f"{c.method} (scale {sc:g})" if math.isfinite(sc) else c.method


def _baseline_text(perts: list[_Pert], sources: set[int]) -> str:
    nlls = {round(_fnum((perts[i].doc.get("baseline") or {}).get("nll")), 6) for i in sources}
    nlls = {x for x in nlls if math.isfinite(x)}
    if len(nlls) == 1:
        nll = nlls.pop()
        return (
            f"baseline NLL {nll:.3f}, perplexity {math.exp(nll):.1f}"
            if nll < 700
            else f"baseline NLL {nll:.3f}"
        )
    return "baselines differ between files" if nlls else ""


def plot_perturbation_effects(conds: list[_Cond], perts: list[_Pert], path: Path) -> Path:
    """ΔNLL (and KL from the baseline) of top-K and every control: each draw a dot, the
    mean a bar, controls' 2.5–97.5 percentile over draws and top-K's paired-bootstrap
    95% CI (from the file's summary) as error bars."""
    import matplotlib

    names = _order(c.name for c in conds)
    sources = {c.source for c in conds}
    single = len(sources) == 1 and sum(c.name == "topk" for c in conds) == 1
    summary = (perts[next(iter(sources))].doc.get("summary") or {}) if single else {}
    has_kl = any(math.isfinite(c.kl) for c in conds)
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(
            1, 2 if has_kl else 1, gridspec_kw={"width_ratios": [3, 2]} if has_kl else None
        )
        panels = [("delta_nll", axes[0][0], "ΔNLL vs baseline (nats/token)")]
        if has_kl:
            panels.append(("kl", axes[0][1], "KL(baseline ‖ perturbed) (nats/token)"))
        for field_, ax, ylabel in panels:
            allv = []
            n_nan = 0
            for i, name in enumerate(names):
                cs = [c for c in conds if c.name == name]
                v = np.array([getattr(c, field_) for c in cs])
                color = _cond_color(name, names)
                xs = i + (np.linspace(-0.22, 0.22, len(v)) if len(v) > 1 else np.zeros(1))
                fin = np.isfinite(v)
                ax.plot(xs[fin], v[fin], "o", color=color, ms=3.5, alpha=0.75, mec="none")
                n_nan += _mark_nonfinite(ax, list(xs[~fin]), list(v[~fin]), color)
                if fin.any():
                    mean = float(v[fin].mean())
                    ax.hlines(mean, i - 0.32, i + 0.32, color=color, lw=2)
                    lo_hi = None
                    if name == "topk" and field_ == "delta_nll":
                        ci = (
                            (summary.get("topk") or {}).get("ci95")
                            if isinstance(summary, dict)
                            else None
                        )
                        if isinstance(ci, list | tuple) and len(ci) == 2:
                            lo_hi = (_fnum(ci[0]), _fnum(ci[1]))
                    elif fin.sum() >= 2:
                        lo_hi = _pct(v[fin])
                    if lo_hi and all(math.isfinite(x) for x in lo_hi):
                        ax.errorbar(
                            [i + 0.36],
                            [mean],
                            yerr=[[max(0.0, mean - lo_hi[0])], [max(0.0, lo_hi[1] - mean)]],
                            color=color,
                            capsize=3,
                            lw=1.2,
                        )
                    allv.extend(v[fin].tolist())
            if field_ == "delta_nll":
                ax.axhline(0, color="black", lw=0.8, ls=":")
                _scale_y(ax, np.array(allv + [0.0]))
            else:
                _scale_y(ax, np.array(allv))
            ticks = []
            for name in names:
                lab = _cond_label(name)
                if field_ != "delta_nll":  # the narrow panel: names only
                    ticks.append(lab)
                    continue
                n = sum(c.name == name for c in conds)
                if n > 1:
                    lab += f"\n({n} draws)" if name != "topk" else f"\n({n} seeds)"
                p = (
                    (summary.get(name) or {}).get("topk_p_value")
                    if isinstance(summary, dict) and name != "topk"
                    else None
                )
                if p is not None and math.isfinite(_fnum(p)):
                    lab += f"\np = {_fnum(p):.3g}"
                ticks.append(lab)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(ticks)
            if field_ != "delta_nll" and len(names) > 2:
                for lab in ax.get_xticklabels():
                    lab.set_rotation(30)
                    lab.set_ha("right")
                    lab.set_rotation_mode("anchor")
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.set_ylabel(ylabel)
            if n_nan:
                ax.text(
                    0.99,
                    0.99,
                    f"{n_nan} NaN result(s) not shown",
                    transform=ax.transAxes,
                    ha="right",
                    va="top",
                    fontsize=8,
                )
        axes[0][0].set_title(_baseline_text(perts, sources) or "ΔNLL")
        if has_kl:
            axes[0][1].set_title("Divergence from the baseline")
        c0 = conds[0]
        fig.suptitle(f"Perturbing K = {c0.k} weights ({c0.metric}, {_method_text(conds)})")
        return _save(fig, path)


def plot_dose_response(conds: list[_Cond], perts: list[_Pert], path: Path) -> Path:
    """ΔNLL against K: top-K (mean over seeds, each seed a dot) and every control (mean
    over draws and seeds, shaded 2.5–97.5 percentile band)."""
    import matplotlib

    names = _order(c.name for c in conds)
    ks = sorted({c.k for c in conds})
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(1, 1)
        ax = axes[0][0]
        allv = []
        n_bad = 0
        for name in names:
            color = _cond_color(name, names)
            xs, means, los, his = [], [], [], []
            for k in ks:
                v = np.array([c.delta_nll for c in conds if c.name == name and c.k == k])
                if v.size == 0:
                    continue
                fin = v[np.isfinite(v)]
                n_bad += int(v.size - fin.size)
                if fin.size == 0:
                    continue
                xs.append(k)
                means.append(float(fin.mean()))
                lo, hi = _pct(fin) if fin.size >= 2 else (fin[0], fin[0])
                los.append(lo)
                his.append(hi)
                allv.extend(fin.tolist())
                if name == "topk" and fin.size > 1:
                    ax.plot([k] * fin.size, fin, "o", color=color, ms=3, alpha=0.6, mec="none")
            if not xs:
                continue
            ax.plot(xs, means, "-o", color=color, ms=4, lw=1.6, label=_cond_label(name))
            if name != "topk" and any(h > lo for lo, h in zip(los, his, strict=True)):
                ax.fill_between(xs, los, his, color=color, alpha=0.15, lw=0)
        ax.axhline(0, color="black", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        _scale_y(ax, np.array(allv + [0.0]))
        ax.set_xlabel(
            "K (weights perturbed" + (", per tensor)" if conds[0].mode == "per_layer" else ")")
        )
        ax.set_ylabel("ΔNLL vs baseline (nats/token)")
        fig.legend(
            loc="outside right center", title="bands: 2.5–97.5%\nover draws", title_fontsize=8
        )
        if n_bad:
            ax.text(
                0.99,
                0.02,
                f"{n_bad} non-finite result(s) not shown",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=8,
            )
        sources = {c.source for c in conds}
        ax.set_title(_baseline_text(perts, sources))
        fig.suptitle(f"Dose response: {conds[0].metric}, {_method_text(conds)}")
        return _save(fig, path)


# --------------------------------------------------------------------------- stability


def plot_stability(art: A.H5Artifact, path: Path) -> Path:
    """Jaccard matrix (annotated) and mean Jaccard against K with the random baseline;
    without scores (selections only) the second panel shows per-tensor counts."""
    import matplotlib

    doc = art.doc
    labels = [str(x) for x in doc.get("labels") or []]
    jac = np.array([[_fnum(x) for x in row] for row in doc.get("jaccard") or []])
    k = doc.get("k")
    with matplotlib.rc_context(_RC):
        fig, axes = _new_figure(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
        ax0, ax1 = axes[0]
        im = ax0.imshow(jac, vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax0, label="Jaccard", fraction=0.046, pad=0.03)
        m = len(labels)
        if m <= 12:
            for i in range(m):
                for j in range(m):
                    if np.isfinite(jac[i, j]):
                        ax0.text(
                            j,
                            i,
                            f"{jac[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="black" if jac[i, j] > 0.6 else "white",
                        )
        ax0.set_xticks(range(m))
        ax0.set_yticks(range(m))
        ax0.set_xticklabels(
            labels,
            rotation=45 if max(map(len, labels), default=0) > 3 else 0,
            ha="right" if max(map(len, labels), default=0) > 3 else "center",
        )
        ax0.set_yticklabels(labels)
        what = {"seeds": "seed", "metrics": "metric"}.get(str(doc.get("kind")), "input")
        ax0.set_xlabel(what)
        ax0.set_ylabel(what)
        rj = _fnum(doc.get("random_jaccard"))
        line = f"Jaccard: mean {_fnum(doc.get('mean_jaccard')):.3f}"
        if math.isfinite(rj):
            line += f", random {rj:.2g}"
        lines = [line]
        ms = _fnum(doc.get("mean_spearman"))
        if math.isfinite(ms):
            rs = _fnum(doc.get("random_spearman"))
            lines.append(
                f"Spearman: mean {ms:.3f}" + (f", random ≈ {rs:.2f}" if math.isfinite(rs) else "")
            )
        ax0.set_title("\n".join(lines), fontsize=8.5)

        vs = doc.get("jaccard_vs_k")
        if isinstance(vs, dict) and vs:
            kk = sorted(vs, key=lambda s: int(s))
            x = [int(s) for s in kk]
            y = [_fnum(vs[s]) for s in kk]
            ax1.plot(x, y, "-o", color="#4c72b0", ms=4, label="mean Jaccard")
            rv = doc.get("random_jaccard_vs_k")
            if isinstance(rv, dict):
                ry = [_fnum(rv.get(s)) for s in kk]
            else:
                n = _fnum(doc.get("n_population"))
                ry = [xx / (2 * n - xx) if math.isfinite(n) else math.nan for xx in x]
            if any(math.isfinite(v) for v in ry):
                ax1.plot(x, ry, "--", color="#7f7f7f", label="random K/(2n−K)")
            if k is not None:
                ax1.axvline(int(k), color=_COND_COLORS["topk"], ls=":", lw=1, label=f"K = {k}")
            ax1.set_xscale("log")
            ax1.set_ylim(0, 1.02)
            ax1.set_xlabel("K" + (" (per tensor)" if doc.get("mode") == "per_layer" else ""))
            ax1.set_ylabel("mean pairwise Jaccard")
            ax1.set_title("Overlap against K")
            ax1.legend(loc="best")
        else:
            _per_tensor_panel(ax1, doc, labels)
        metric = doc.get("metric") or " vs ".join(dict.fromkeys(map(str, doc.get("metrics") or [])))
        fig.suptitle(f"Stability of the top-{k} across {what}s: {metric}")
        return _save(fig, path)


def _compact(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `3.mlp.up_proj`; outside blocks the type."""
    b, t = param_group(name)
    return t if b is None else f"{b}.{t}"


def _per_tensor_panel(ax, doc: dict, labels: list[str]) -> None:
    """Without Jaccard-vs-K (selections only): in global mode the top-K count of the
    tensors holding most of it, per label; in per_layer mode (equal counts by design) the
    mean pairwise Jaccard inside each tensor, per block."""
    pto = {n: v for n, v in (doc.get("per_tensor_overlap") or {}).items() if isinstance(v, dict)}
    if not pto:
        ax.set_visible(False)
        return
    m = len(labels)
    if doc.get("mode") == "per_layer":
        cols, col_of = _columns(list(pto))
        vals: dict[str, list[float]] = defaultdict(list)
        for n, v in pto.items():
            j = _fnum(v.get("jaccard"))
            if math.isfinite(j):
                vals[col_of[n]].append(j)
        y = [float(np.mean(vals[c])) if vals[c] else math.nan for c in cols]
        ax.bar(range(len(cols)), y, color="#4c72b0", alpha=0.85)
        step = max(1, math.ceil(len(cols) / 16))
        ax.set_xticks(range(0, len(cols), step))
        ax.set_xticklabels(
            cols[::step], rotation=90 if any(not c.isdigit() for c in cols[::step]) else 0
        )
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("block (outside params by name)")
        ax.set_ylabel("mean pairwise Jaccard in the tensor")
        ax.set_title("Overlap inside the tensors")
        return
    items = [(n, v.get("counts") or []) for n, v in pto.items()]
    items = sorted(items, key=lambda t: -max(t[1], default=0))[:12]
    yy = np.arange(len(items))
    h = 0.8 / max(1, m)
    for li in range(m):
        ax.barh(
            yy + (li - (m - 1) / 2) * h,
            [c[li] if li < len(c) else 0 for _, c in items],
            height=h,
            label=labels[li] if li < len(labels) else str(li),
        )
    ax.set_yticks(yy)
    ax.set_yticklabels([_compact(n) for n, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("weights in the top-K")
    ax.set_title("Per tensor (largest counts)")
    ax.legend(loc="lower right", fontsize=7.5)


# --------------------------------------------------------------------------- dispatch


def _names(groups: list[tuple[tuple, dict[str, Any]]]) -> list[str]:
    """File-name stems: the base, plus -- only where groups share a base -- the options
    that tell them apart, added in order until the names are unique."""
    by_base: dict[tuple, list[int]] = defaultdict(list)
    for i, (base, _) in enumerate(groups):
        by_base[base].append(i)
    out = [""] * len(groups)
    for base, idx in by_base.items():
        stem = "_".join(_safe(str(b)) for b in base)
        names = {i: stem for i in idx}
        for key in groups[idx[0]][1]:
            if len(set(names.values())) == len(idx):
                break
            if len({str(groups[j][1].get(key)) for j in idx}) > 1:
                names = {i: f"{names[i]}_{_safe(str(groups[i][1].get(key)))}" for i in idx}
        if len(set(names.values())) < len(idx):  # still equal: number them
            names = {i: f"{names[i]}_{n}" if n else names[i] for n, i in enumerate(idx)}
        for i in idx:
            out[i] = names[i]
    return out


def _model_label(name: str, fingerprint: str) -> str:
    """A short file-name label for a model: its name's last part and fingerprint prefix."""
    return f"{Path(name.rstrip('/')).name or 'model'}-{fingerprint[:8]}"


def plot_artifacts(paths: list[Path], out_dir: Path) -> list[Path]:
    """Write every figure the given artifacts allow into `out_dir`; return their paths.

    A directory argument stands for every artifact below it (e.g. `OUT/artifacts`).
    Raises `UsageError` when nothing plottable was given.
    """
    loaded = _load(paths)
    out_dir = Path(out_dir)
    written: list[Path] = []

    # selections: one group per (model, metric, K, mode, rank_by), seeds inside
    sel_groups: dict[tuple, list[_Sel]] = defaultdict(list)
    for s in loaded.selections:
        sel_groups[(s.metric, s.k, s.mode, s.rank_by, s.model)].append(s)
    keys = list(sel_groups)
    label = {s.model: _model_label(s.model_name, s.model) for s in loaded.selections}
    stems = _names([((k[0], f"k{k[1]}"), {"model": label[k[4]], "mode": k[2], "rank_by": k[3]}) for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        sels = sorted(sel_groups[key], key=lambda s: (s.seed, str(s.path)))
        first = next((s for s in sels if s.hist is not None), sels[0])
        for kind, got in (
            (
                "sensitivity_distribution",
                plot_sensitivity_distribution(
                    first, out_dir / f"{stem}_sensitivity_distribution.png"
                ),
            ),
            (
                "layer_comparison",
                plot_layer_comparison(sels, out_dir / f"{stem}_layer_comparison.png"),
            ),
            (
                "sensitivity_heatmap",
                plot_sensitivity_heatmap(sels[0], out_dir / f"{stem}_sensitivity_heatmap.png"),
            ),
        ):
            if got is not None:
                written.append(got)
            else:
                log(
                    f"note: no {kind.replace('_', ' ')} figure for {stem} "
                    "(the selection has no histograms or no numbered blocks)"
                )

    # perturbations: effects per (metric, K, method, mode); dose response over K
    conds = _conditions(loaded.perturbations)
    eff: dict[tuple, list[_Cond]] = defaultdict(list)
    dose: dict[tuple, list[_Cond]] = defaultdict(list)
    for c in conds:
        eff[(c.metric, c.k, c.method, c.mode, c.model)].append(c)
        dose[(c.metric, c.method, c.mode, c.model)].append(c)
    label = {c.model: _model_label(c.model_name, c.model) for c in conds}
    keys = list(eff)
    stems = _names([((k[0], f"k{k[1]}"), {"model": label[k[4]], "method": k[2], "mode": k[3]}) for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        written.append(
            plot_perturbation_effects(
                eff[key], loaded.perturbations, out_dir / f"{stem}_perturbation_effects.png"
            )
        )
    keys = [k for k in dose if len({c.k for c in dose[k]}) >= 2]
    stems = _names([((k[0],), {"model": label[k[3]], "method": k[1], "mode": k[2]}) for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        written.append(
            plot_dose_response(
                dose[key], loaded.perturbations, out_dir / f"{stem}_dose_response.png"
            )
        )

    # stability: one figure per artifact
    groups = []
    for art in loaded.stabilities:
        d = art.doc
        metric = (
            d.get("metric")
            or "+".join(dict.fromkeys(map(str, d.get("metrics") or [])))
            or "unknown"
        )
        groups.append(
            (
                (metric, f"k{d.get('k')}"),
                {
                    "mode": d.get("mode"),
                    "kind": d.get("kind"),
                    "rank_by": d.get("rank_by"),
                    "file": art.path.stem,
                },
            )
        )
    for art, stem in zip(loaded.stabilities, _names(groups), strict=True):
        written.append(plot_stability(art, out_dir / f"{stem}_stability_analysis.png"))

    for s in loaded.skipped:
        log(f"note: not plotted: {s}", verbose_only=True)
    if not written:
        raise UsageError(
            "nothing to plot: give top-K selections (cwa rank), perturbation results "
            "(cwa perturb) or stability artifacts (cwa stability), or a directory holding them"
        )
    return written
