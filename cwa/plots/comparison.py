"""Several runs side by side: `metric_comparison(results)`.

One group of bars per (metric, K, perturbation method, mode, model) found in the results
— typically one run per metric — and in each group one bar per condition: the mean ΔNLL
of top-K and of every control over its draws and seeds, each finite value a dot. A metric
that finds critical weights has a top-K bar far above its controls; comparing the groups
shows which metric's top-K hurts the model most at the same K and perturbation. The
groups' baselines may differ (other data, other models), so the bars are ΔNLL, not NLL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cwa.errors import UsageError
from cwa.plots import style as S
from cwa.plots.perturbation import Cond, ResultsLike, as_results, conditions, effects_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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

