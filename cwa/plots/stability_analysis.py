"""How stable the top-K is across seeds (or metrics): `stability(st)`.

Left, the pairwise Jaccard matrix |A ∩ B| / |A ∪ B| of the inputs' top-K sets (annotated
up to 12 inputs), titled with the mean and the chance level K / (2n − K) of two uniformly
random K-subsets of n weights (and the mean Spearman rank correlation when the scores
were given). Right, the mean Jaccard against K with that random baseline, when the
stability was computed from scores; from selections alone (no other K to compare) it
shows, in global mode, the top-K count of the tensors holding most of it per input, and
in per_layer mode (equal counts per tensor by design) the mean pairwise Jaccard inside
each tensor, per block.

The module is not named ``stability``: importing a submodule sets the package attribute
of its name, which would replace the function `cwa.plots.stability`.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np

from cwa import artifacts as A
from cwa.errors import UsageError
from cwa.plots import style as S

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def stability(st: A.Stability | str | os.PathLike) -> Figure:
    """Jaccard matrix and overlap against K (or per tensor) of a stability result.

    Raises `UsageError` when it holds no Jaccard matrix."""
    st = A.read_stability(st) if isinstance(st, str | os.PathLike) else st
    doc = st.doc if isinstance(st.doc, dict) else {}
    if not doc.get("jaccard"):
        raise UsageError("no stability analysis: the stability result holds no Jaccard matrix")
    return _stability(doc)


def inputs_word(doc: dict) -> str:
    """What the compared inputs are: seed, metric or input."""
    return {"seeds": "seed", "metrics": "metric"}.get(str(doc.get("kind")), "input")


@S.styled
def _stability(doc: dict) -> Figure:
    labels = [str(x) for x in doc.get("labels") or []]
    fig, axes = S.new_figure(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    ax0, ax1 = axes[0]
    _jaccard_panel(fig, ax0, doc, labels)
    vs = doc.get("jaccard_vs_k")
    if isinstance(vs, dict) and vs:
        _vs_k_panel(ax1, doc, vs)
    else:
        _per_tensor_panel(ax1, doc, labels)
    k = doc.get("k")
    metric = doc.get("metric") or " vs ".join(dict.fromkeys(map(str, doc.get("metrics") or [])))
    fig.suptitle(f"Stability of the top-{k} across {inputs_word(doc)}s: {metric}")
    return fig


def _jaccard_panel(fig, ax: Axes, doc: dict, labels: list[str]) -> None:
    jac = np.array([[S.fnum(x) for x in row] for row in doc.get("jaccard") or []])
    im = ax.imshow(jac, vmin=0, vmax=1, cmap="viridis")
    S.colorbar(fig, im, ax, label="Jaccard", fraction=0.046, pad=0.03)
    m = len(labels)
    if m <= 12:
        for i in range(m):
            for j in range(m):
                if np.isfinite(jac[i, j]):
                    ax.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if jac[i, j] > 0.6 else "white")
    ax.set_xticks(range(m))
    ax.set_yticks(range(m))
    long = max(map(len, labels), default=0) > 3
    ax.set_xticklabels(labels, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticklabels(labels)
    what = inputs_word(doc)
    ax.set_xlabel(what)
    ax.set_ylabel(what)
    ax.set_title(_jaccard_title(doc), fontsize=8.5)


def _jaccard_title(doc: dict) -> str:
    rj = S.fnum(doc.get("random_jaccard"))
    line = f"Jaccard: mean {S.fnum(doc.get('mean_jaccard')):.3f}"
    if math.isfinite(rj):
        line += f", random {rj:.2g}"
    lines = [line]
    ms = S.fnum(doc.get("mean_spearman"))
    if math.isfinite(ms):
        rs = S.fnum(doc.get("random_spearman"))
        lines.append(f"Spearman: mean {ms:.3f}" + (f", random ≈ {rs:.2f}" if math.isfinite(rs) else ""))
    return "\n".join(lines)


def _vs_k_panel(ax: Axes, doc: dict, vs: dict) -> None:
    kk = sorted(vs, key=lambda s: int(s))
    x = [int(s) for s in kk]
    y = [S.fnum(vs[s]) for s in kk]
    ax.plot(x, y, "-o", color=S.BAR_COLOR, ms=4, label="mean Jaccard")
    rv = doc.get("random_jaccard_vs_k")
    if isinstance(rv, dict):
        ry = [S.fnum(rv.get(s)) for s in kk]
    else:
        n = S.fnum(doc.get("n_population"))
        ry = [xx / (2 * n - xx) if math.isfinite(n) else math.nan for xx in x]
    if any(math.isfinite(v) for v in ry):
        ax.plot(x, ry, "--", color="#7f7f7f", label="random K/(2n−K)")
    k = doc.get("k")
    if k is not None:
        ax.axvline(int(k), color=S.COND_COLORS["topk"], ls=":", lw=1, label=f"K = {k}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K" + (" (per tensor)" if doc.get("mode") == "per_layer" else ""))
    ax.set_ylabel("mean pairwise Jaccard")
    ax.set_title("Overlap against K")
    ax.legend(loc="best")


def _per_tensor_panel(ax: Axes, doc: dict, labels: list[str]) -> None:
    """Without Jaccard-vs-K (selections only): see the module docstring."""
    pto = {n: v for n, v in (doc.get("per_tensor_overlap") or {}).items() if isinstance(v, dict)}
    if not pto:
        ax.set_visible(False)
    elif doc.get("mode") == "per_layer":
        _per_block_overlap(ax, pto)
    else:
        _largest_counts(ax, pto, labels)


def _per_block_overlap(ax: Axes, pto: dict[str, dict]) -> None:
    cols, col_of = S.layer_columns(list(pto))
    vals: dict[str, list[float]] = defaultdict(list)
    for n, v in pto.items():
        j = S.fnum(v.get("jaccard"))
        if math.isfinite(j):
            vals[col_of[n]].append(j)
    y = [float(np.mean(vals[c])) if vals[c] else math.nan for c in cols]
    ax.bar(range(len(cols)), y, color=S.BAR_COLOR, alpha=0.85)
    step = max(1, math.ceil(len(cols) / 16))
    ax.set_xticks(range(0, len(cols), step))
    ax.set_xticklabels(cols[::step], rotation=90 if any(not c.isdigit() for c in cols[::step]) else 0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("block (outside params by name)")
    ax.set_ylabel("mean pairwise Jaccard in the tensor")
    ax.set_title("Overlap inside the tensors")


def _largest_counts(ax: Axes, pto: dict[str, dict], labels: list[str]) -> None:
    m = len(labels)
    items = [(n, v.get("counts") or []) for n, v in pto.items()]
    items = sorted(items, key=lambda t: -max(t[1], default=0))[:12]
    yy = np.arange(len(items))
    h = 0.8 / max(1, m)
    for li in range(m):
        ax.barh(yy + (li - (m - 1) / 2) * h, [c[li] if li < len(c) else 0 for _, c in items], height=h,
                label=labels[li] if li < len(labels) else str(li))
    ax.set_yticks(yy)
    ax.set_yticklabels([S.compact(n) for n, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("weights in the top-K")
    ax.set_title("Per tensor (largest counts)")
    ax.legend(loc="lower right", fontsize=7.5)
