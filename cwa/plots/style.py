"""The look shared by every figure, and the helpers the figure families share.

A figure is a ``matplotlib.figure.Figure`` with its own Agg canvas instead of ``pyplot``:
nothing global is switched (a notebook's backend is left alone) and no figure manager
keeps figures alive. The house style (``RC``) applies while a figure is built (the
`styled` decorator); tick labels, which matplotlib makes at draw time, get their sizes
from the axes (`new_figure`, `colorbar`), so a returned figure looks the same whether it
is saved with `save`, ``fig.savefig`` or shown in a notebook under other rcParams.

Parameter names map to blocks and module types with `cwa.artifacts.param_group`;
`layer_columns` orders them for a per-block axis (input-side parameters outside the
blocks, the blocks, then the other outside parameters).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cwa import artifacts as A

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGSIZE = (7.0, 4.5)
DPI = 150
RC = {
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
COND_COLORS = {
    "topk": "#d62728",
    "random_k": "#1f77b4",
    "bottom_k": "#7f7f7f",
    "layer_matched": "#2ca02c",
    "magnitude_matched": "#9467bd",
}
EXTRA_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
BAR_COLOR = "#4c72b0"
_INPUT_LIKE = re.compile(r"(emb|wte|wpe|embed)", re.I)

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- figures


def styled(build: F) -> F:
    """Build the figure under the house rcParams (`RC`)."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        import matplotlib

        with matplotlib.rc_context(RC):
            return build(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _fix_tick_size(ax: Axes) -> None:
    """Tick labels are made at draw time, and the number of ticks that fit is computed
    then, both from the rcParams of that moment: give the axes the house sizes itself."""
    ax.tick_params(axis="x", which="both", labelsize=RC["xtick.labelsize"])
    ax.tick_params(axis="y", which="both", labelsize=RC["ytick.labelsize"])


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = FIGSIZE, **kw: Any):
    """(figure, 2-D array of axes): a constrained-layout figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat:
        _fix_tick_size(ax)
    return fig, axes


def colorbar(fig: Figure, mappable: Any, ax: Axes, **kw: Any):
    """`fig.colorbar`, its axes given the house tick sizes."""
    cb = fig.colorbar(mappable, ax=ax, **kw)
    _fix_tick_size(cb.ax)
    return cb


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path`: a temporary file next to it, renamed when complete
    (an interrupted save leaves no partial PNG)."""
    path = Path(path)
    with A.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


# --------------------------------------------------------------------------- values


def fnum(v: Any) -> float:
    """A float from a JSON value ("inf", "nan", None and numbers)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def pct(v: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles."""
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


# --------------------------------------------------------------------------- conditions


def order(names: Iterable[str]) -> list[str]:
    """Condition names, the known ones first (top-K, then the controls) in a fixed order."""
    names = list(dict.fromkeys(names))
    known = [n for n in COND_COLORS if n in names]
    return known + [n for n in names if n not in known]


def cond_color(name: str, names: list[str]) -> str:
    if name in COND_COLORS:
        return COND_COLORS[name]
    extras = [n for n in names if n not in COND_COLORS]
    return EXTRA_COLORS[extras.index(name) % len(EXTRA_COLORS)] if name in extras else "#000000"


def cond_label(name: str) -> str:
    return "top-K" if name == "topk" else name


# --------------------------------------------------------------------------- parameter names


def layer_columns(params: list[str]) -> tuple[list[str], dict[str, str]]:
    """Per-block columns (input-like outside params, blocks, other outside params) and
    the column of each parameter."""
    col_of: dict[str, str] = {}
    blocks: set[int] = set()
    before: list[str] = []
    after: list[str] = []
    for n in params:
        b, t = A.param_group(n)
        if b is not None:
            blocks.add(b)
            col_of[n] = str(b)
        else:
            col_of[n] = t
            dest = before if _INPUT_LIKE.search(t) else after
            if t not in dest:
                dest.append(t)
    return before + [str(b) for b in sorted(blocks)] + after, col_of


def module_types(params: list[str]) -> list[str]:
    """The module types of `params`, in first-seen order."""
    return list(dict.fromkeys(A.param_group(n)[1] for n in params))


def compact(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `3.mlp.up_proj`; outside blocks the type."""
    b, t = A.param_group(name)
    return t if b is None else f"{b}.{t}"


# --------------------------------------------------------------------------- axes


def scale_y(ax: Axes, values: np.ndarray) -> None:
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


def mark_nonfinite(ax: Axes, xs: list[float], ys: list[float], color: str) -> int:
    """+inf / -inf drawn as triangles at the top / bottom edge; returns the NaN count."""
    n_nan = 0
    trans = ax.get_xaxis_transform()
    for x, y in zip(xs, ys, strict=True):
        if math.isnan(y):
            n_nan += 1
        elif math.isinf(y):
            top = y > 0
            at = 0.97 if top else 0.03
            ax.plot([x], [at], marker="^" if top else "v", color=color, transform=trans,
                    clip_on=False, ms=7, ls="none")
            ax.annotate("inf" if top else "-inf", (x, at), xycoords=trans, xytext=(5, -3),
                        textcoords="offset points", fontsize=8, color=color)
    return n_nan


def corner_note(ax: Axes, text: str, where: str = "top") -> None:
    """A small note in the right corner of the axes (e.g. values not shown)."""
    y, va = (0.99, "top") if where == "top" else (0.02, "bottom")
    ax.text(0.99, y, text, transform=ax.transAxes, ha="right", va=va, fontsize=8)


def slant(labels: Iterable[Any], degrees: float) -> None:
    """Rotate tick labels, anchored at their right end (long names under their tick)."""
    for lab in labels:
        lab.set_rotation(degrees)
        lab.set_ha("right")
        lab.set_rotation_mode("anchor")
