"""What perturbing the top-K does, next to the controls.

* `perturbation_effects(res)` — ΔNLL (and KL from the baseline) of top-K and every
  control at one K: each draw (or seed) a dot, the mean a bar; controls' 2.5–97.5
  percentile over draws and top-K's paired-bootstrap 95% CI (from the file's summary, when
  the figure shows one file's single top-K) as error bars; the control's empirical p-value
  under its name.
* `dose_response(results)` — ΔNLL against K: top-K (mean over seeds, each seed a dot) and
  every control (mean over draws and seeds, shaded 2.5–97.5 percentile band).

Both take `cwa.artifacts.Results` (one, a list, or artifact paths) and return a `Figure`.
A figure shows one group of conditions: one metric, perturbation method and mode, of one
model (and, for the effects, one K). A condition's metric is its own field, else the
document's, else that of the selection it came from (read when it still exists), else
"unknown".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cwa import artifacts as A
from cwa.errors import ArtifactError, UsageError
from cwa.plots import style as S

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ResultsLike = A.Results | str | os.PathLike


@dataclass
class Cond:
    """One condition of a perturbation document, its values parsed."""

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
    source: int  # index of its Results in the list given
    model: str = ""  # model fingerprint
    model_name: str = ""


def effects_key(c: Cond) -> tuple:
    """The conditions of one perturbation-effects figure share this."""
    return (c.metric, c.k, c.method, c.mode, c.model)


def dose_key(c: Cond) -> tuple:
    """The conditions of one dose-response figure share this."""
    return (c.metric, c.method, c.mode, c.model)


def as_results(res: ResultsLike | Sequence[ResultsLike]) -> list[A.Results]:
    items = [res] if isinstance(res, A.Results | str | os.PathLike) else list(res)
    return [A.read_results(r) if isinstance(r, str | os.PathLike) else r for r in items]


# --------------------------------------------------------------------------- conditions


def condition_metrics(doc: dict, sel_metrics: dict[str, str], known: list[str],
                      cache: dict[str, str | None] | None = None) -> list[str]:
    """The metric of each condition: its own field, the document's, the selection it
    came from (by path or file name in `sel_metrics`, or read if it still exists;
    `cache` keeps what was read), or the single metric in `known`."""
    sels = [str(s) for s in doc.get("selections") or []]
    cache = {} if cache is None else cache

    def of_selection(i: Any) -> str | None:
        if not isinstance(i, int) or not 0 <= i < len(sels):
            return None
        p = Path(sels[i])
        m = sel_metrics.get(str(p)) or sel_metrics.get(p.name)
        if m is None and p.exists():
            if str(p) not in cache:
                try:
                    cache[str(p)] = A.read_selection(p).metric or None
                except ArtifactError:
                    cache[str(p)] = None
            m = cache[str(p)]
        return m

    out = []
    for c in doc.get("conditions") or []:
        m = (c.get("metric") if isinstance(c, dict) else None) or doc.get("metric")
        m = m or (of_selection(c.get("selection")) if isinstance(c, dict) else None)
        if not m:
            m = known[0] if len(known) == 1 else "unknown"
        out.append(str(m))
    return out


def conditions(results: list[A.Results], metrics: list[list[str]] | None = None) -> list[Cond]:
    """Every condition of `results`; `metrics[i]` names the metric of each condition of
    results i (default: `condition_metrics` with nothing known)."""
    if metrics is None:
        cache: dict[str, str | None] = {}
        metrics = [condition_metrics(r.doc, {}, [], cache) for r in results]
    out = []
    for si, (r, metric_of) in enumerate(zip(results, metrics, strict=True)):
        for c, metric in zip(r.doc.get("conditions") or [], metric_of, strict=True):
            if not isinstance(c, dict):
                continue
            try:
                k = int(c.get("k"))
            except (TypeError, ValueError):
                continue
            out.append(Cond(
                name=str(c.get("name", "?")), k=k, method=str(c.get("method", "")),
                scale=c.get("scale"), mode=str(c.get("mode", "global")),
                seed=int(c.get("seed", 0) or 0), draw=int(c.get("draw", 0) or 0),
                delta_nll=S.fnum(c.get("delta_nll")), kl=S.fnum(c.get("kl_from_baseline")),
                metric=metric, source=si, model=str(r.doc.get("model_fingerprint") or ""),
                model_name=str(r.doc.get("model") or ""),
            ))
    return out


def _one_group(conds: list[Cond], key, what: str, fields: str) -> list[Cond]:
    groups = {key(c) for c in conds}
    if not groups:
        raise UsageError(f"no {what}: the results hold no conditions")
    if len(groups) > 1:
        raise UsageError(f"no {what}: the results mix {fields}; give the results of one")
    return conds


def _method_text(conds: list[Cond]) -> str:
    c = conds[0]
    sc = S.fnum(c.scale)
    return f"{c.method} (scale {sc:g})" if math.isfinite(sc) else c.method


def _baseline_text(results: list[A.Results], sources: set[int]) -> str:
    nlls = {round(S.fnum((results[i].doc.get("baseline") or {}).get("nll")), 6) for i in sources}
    nlls = {x for x in nlls if math.isfinite(x)}
    if len(nlls) == 1:
        nll = nlls.pop()
        ppl = f", perplexity {math.exp(nll):.1f}" if nll < 700 else ""  # exp() overflows past ~709
        return f"baseline NLL {nll:.3f}{ppl}"
    return "baselines differ between files" if nlls else ""


# --------------------------------------------------------------------------- effects


def perturbation_effects(res: ResultsLike | Sequence[ResultsLike], k: int | None = None) -> Figure:
    """ΔNLL and KL of top-K and the controls at one K (`k`; needed when the results hold
    several). Raises `UsageError` when the results mix metrics, methods or models."""
    results = as_results(res)
    conds = conditions(results)
    ks = sorted({c.k for c in conds})
    if k is None and len(ks) > 1:
        held = ", ".join(map(str, ks))
        raise UsageError(f"no perturbation effects: the results hold K = {held}; pass k=")
    if k is not None:
        conds = [c for c in conds if c.k == k]
    _one_group(conds, effects_key, "perturbation effects", "metrics, methods, modes or models")
    return effects_figure(conds, results)


@S.styled
def effects_figure(conds: list[Cond], results: list[A.Results]) -> Figure:
    """The effects figure of one group of conditions (see `effects_key`)."""
    names = S.order(c.name for c in conds)
    sources = {c.source for c in conds}
    single = len(sources) == 1 and sum(c.name == "topk" for c in conds) == 1
    summary = (results[next(iter(sources))].doc.get("summary") or {}) if single else {}
    summary = summary if isinstance(summary, dict) else {}
    has_kl = any(math.isfinite(c.kl) for c in conds)
    grid = {"width_ratios": [3, 2]} if has_kl else None
    fig, axes = S.new_figure(1, 2 if has_kl else 1, gridspec_kw=grid)
    _effects_panel(axes[0][0], conds, names, "delta_nll", summary)
    if has_kl:
        _effects_panel(axes[0][1], conds, names, "kl", summary)
    axes[0][0].set_title(_baseline_text(results, sources) or "ΔNLL")
    if has_kl:
        axes[0][1].set_title("Divergence from the baseline")
    fig.suptitle(f"Perturbing K = {conds[0].k} weights ({conds[0].metric}, {_method_text(conds)})")
    return fig


_YLABEL = {"delta_nll": "ΔNLL vs baseline (nats/token)", "kl": "KL(baseline ‖ perturbed) (nats/token)"}


def _effects_panel(ax: Axes, conds: list[Cond], names: list[str], field: str, summary: dict) -> None:
    allv: list[float] = []
    n_nan = 0
    for i, name in enumerate(names):
        v = np.array([getattr(c, field) for c in conds if c.name == name])
        color = S.cond_color(name, names)
        xs = i + (np.linspace(-0.22, 0.22, len(v)) if len(v) > 1 else np.zeros(1))
        fin = np.isfinite(v)
        ax.plot(xs[fin], v[fin], "o", color=color, ms=3.5, alpha=0.75, mec="none")
        n_nan += S.mark_nonfinite(ax, list(xs[~fin]), list(v[~fin]), color)
        if fin.any():
            mean = float(v[fin].mean())
            ax.hlines(mean, i - 0.32, i + 0.32, color=color, lw=2)
            lo_hi = _error_range(name, field, v[fin], summary)
            if lo_hi and all(math.isfinite(x) for x in lo_hi):
                yerr = [[max(0.0, mean - lo_hi[0])], [max(0.0, lo_hi[1] - mean)]]
                ax.errorbar([i + 0.36], [mean], yerr=yerr, color=color, capsize=3, lw=1.2)
            allv.extend(v[fin].tolist())
    if field == "delta_nll":
        ax.axhline(0, color="black", lw=0.8, ls=":")
        S.scale_y(ax, np.array(allv + [0.0]))
    else:
        S.scale_y(ax, np.array(allv))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(_tick_labels(conds, names, field, summary))
    if field != "delta_nll" and len(names) > 2:
        S.slant(ax.get_xticklabels(), 30)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(_YLABEL[field])
    if n_nan:
        S.corner_note(ax, f"{n_nan} NaN result(s) not shown")


def _error_range(name: str, field: str, finite: np.ndarray, summary: dict) -> tuple[float, float] | None:
    """Top-K's ΔNLL: the summary's bootstrap CI; a control: its 2.5–97.5 percentile."""
    if name == "topk" and field == "delta_nll":
        ci = (summary.get("topk") or {}).get("ci95")
        if isinstance(ci, list | tuple) and len(ci) == 2:
            return S.fnum(ci[0]), S.fnum(ci[1])
        return None
    return S.pct(finite) if finite.size >= 2 else None


def _tick_labels(conds: list[Cond], names: list[str], field: str, summary: dict) -> list[str]:
    """Names; on the ΔNLL panel also the number of draws or seeds and the p-value."""
    ticks = []
    for name in names:
        lab = S.cond_label(name)
        if field != "delta_nll":  # the narrow panel: names only
            ticks.append(lab)
            continue
        n = sum(c.name == name for c in conds)
        if n > 1:
            lab += f"\n({n} draws)" if name != "topk" else f"\n({n} seeds)"
        p = (summary.get(name) or {}).get("topk_p_value") if name != "topk" else None
        if p is not None and math.isfinite(S.fnum(p)):
            lab += f"\np = {S.fnum(p):.3g}"
        ticks.append(lab)
    return ticks


# --------------------------------------------------------------------------- dose response


def dose_response(results: ResultsLike | Sequence[ResultsLike]) -> Figure:
    """ΔNLL against K. Raises `UsageError` with fewer than two K, or when the results
    mix metrics, methods, modes or models."""
    rs = as_results(results)
    conds = _one_group(conditions(rs), dose_key, "dose response", "metrics, methods, modes or models")
    if len({c.k for c in conds}) < 2:
        raise UsageError("no dose response: the results hold one K; give results of two or more")
    return dose_figure(conds, rs)


@S.styled
def dose_figure(conds: list[Cond], results: list[A.Results]) -> Figure:
    """The dose-response figure of one group of conditions (see `dose_key`)."""
    names = S.order(c.name for c in conds)
    ks = sorted({c.k for c in conds})
    fig, axes = S.new_figure(1, 1)
    ax = axes[0][0]
    allv: list[float] = []
    n_bad = 0
    for name in names:
        mine = [c for c in conds if c.name == name]
        n_bad += _dose_line(ax, mine, name, S.cond_color(name, names), ks, allv)
    ax.axhline(0, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    S.scale_y(ax, np.array(allv + [0.0]))
    ax.set_xlabel("K (weights perturbed" + (", per tensor)" if conds[0].mode == "per_layer" else ")"))
    ax.set_ylabel("ΔNLL vs baseline (nats/token)")
    fig.legend(loc="outside right center", title="bands: 2.5–97.5%\nover draws", title_fontsize=8)
    if n_bad:
        S.corner_note(ax, f"{n_bad} non-finite result(s) not shown", where="bottom")
    ax.set_title(_baseline_text(results, {c.source for c in conds}))
    fig.suptitle(f"Dose response: {conds[0].metric}, {_method_text(conds)}")
    return fig


def _dose_line(ax: Axes, conds: list[Cond], name: str, color: str, ks: list[int], allv: list[float]) -> int:
    """One condition's mean against K (and band or seed dots); returns the non-finite count."""
    xs, means, los, his = [], [], [], []
    n_bad = 0
    for k in ks:
        v = np.array([c.delta_nll for c in conds if c.k == k])
        if v.size == 0:
            continue
        fin = v[np.isfinite(v)]
        n_bad += int(v.size - fin.size)
        if fin.size == 0:
            continue
        xs.append(k)
        means.append(float(fin.mean()))
        lo, hi = S.pct(fin) if fin.size >= 2 else (fin[0], fin[0])
        los.append(lo)
        his.append(hi)
        allv.extend(fin.tolist())
        if name == "topk" and fin.size > 1:
            ax.plot([k] * fin.size, fin, "o", color=color, ms=3, alpha=0.6, mec="none")
    if xs:
        ax.plot(xs, means, "-o", color=color, ms=4, lw=1.6, label=S.cond_label(name))
        if name != "topk" and any(h > lo for lo, h in zip(los, his, strict=True)):
            ax.fill_between(xs, los, his, color=color, alpha=0.15, lw=0)
    return n_bad
