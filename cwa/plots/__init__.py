"""Figures of cwa's results: functions that take the API objects and return a Figure.

==================================  =======================================================
function                            input
==================================  =======================================================
`sensitivity_distribution(sel)`     a top-K `Selection` (its stored score histograms)
`layer_comparison(sels)`            top-K `Selection` s (seeds of one metric and K)
`sensitivity_heatmap(sel)`          a top-K `Selection` of a model with numbered blocks
`perturbation_effects(res, k=)`     `Results` (one or a list) at one K
`dose_response(results)`            `Results` of two or more K
`stability(st)`                     `Stability`
`metric_comparison(results)`        `Results` of several metrics (or runs), side by side
`comparison_dose_response(cmp)`     a `Comparison`: ΔNLL against K per metric, control bands
`topk_jaccard(cmp)`                 a `Comparison`: the runs' top-K Jaccard matrix
`topk_location(cmp)`                a `Comparison`: each run's top-K per block / module type
`headline_table(cmp)`               a `Comparison`: the headline numbers as a table
`plot_artifacts(paths, out_dir)`    what `cwa plot` does: every figure the files allow, saved
==================================  =======================================================

Wherever a function takes a result it also takes the artifact's path. A figure the input
cannot give (a control has no histograms, a model without numbered blocks no heatmap)
raises `cwa.errors.UsageError` with the reason. Nothing is saved until you call
`save(fig, path)` (atomic: a temporary file renamed) or ``fig.savefig``.

The families live in `selection`, `perturbation`, `stability_analysis` and `comparison`,
the look in `style`, the file-level dispatch of `plot_artifacts` in `files`. They are
imported on first use, so ``import cwa.plots`` does not import matplotlib or numpy.
Blocks and module types come from parameter names (`param_group`, from
`cwa.artifacts`): ``transformer.h.3.attn.c_attn.weight`` is block 3, type ``attn.c_attn``;
a parameter outside the numbered blocks is its own column named by its last component.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cwa.artifacts import param_group
    from cwa.plots.comparison import (
        comparison_dose_response,
        headline_table,
        metric_comparison,
        topk_jaccard,
        topk_location,
    )
    from cwa.plots.files import plot_artifacts
    from cwa.plots.perturbation import dose_response, perturbation_effects
    from cwa.plots.selection import layer_comparison, sensitivity_distribution, sensitivity_heatmap
    from cwa.plots.stability_analysis import stability
    from cwa.plots.style import save

_WHERE = {
    "sensitivity_distribution": "cwa.plots.selection",
    "layer_comparison": "cwa.plots.selection",
    "sensitivity_heatmap": "cwa.plots.selection",
    "perturbation_effects": "cwa.plots.perturbation",
    "dose_response": "cwa.plots.perturbation",
    "stability": "cwa.plots.stability_analysis",
    "metric_comparison": "cwa.plots.comparison",
    "comparison_dose_response": "cwa.plots.comparison",
    "topk_jaccard": "cwa.plots.comparison",
    "topk_location": "cwa.plots.comparison",
    "headline_table": "cwa.plots.comparison",
    "plot_artifacts": "cwa.plots.files",
    "save": "cwa.plots.style",
    "param_group": "cwa.artifacts",
}

__all__ = [
    "sensitivity_distribution", "layer_comparison", "sensitivity_heatmap", "perturbation_effects",
    "dose_response", "stability", "metric_comparison", "comparison_dose_response", "topk_jaccard",
    "topk_location", "headline_table", "plot_artifacts", "save", "param_group",
]  # the keys of _WHERE


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cwa.plots' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
