"""cwa — Critical Weight Analysis.

Find the individual weights of a causal language model that matter most, and prove it:
score every weight with a sensitivity metric, rank the top-K, perturb them against
random-K and bottom-K controls, check stability across seeds, and plot the results.

The library never imports typer; `cwa.cli` is the command-line front end. The Python API
(`cwa.score`, `cwa.rank`, ... see `cwa.api` and docs/api.md) is imported on first use, so
`import cwa` and `cwa --help` stay instant.
"""

__version__ = "0.1.0"

_API = (
    "Comparison", "DataOptions", "ModelOptions", "Results", "RunConfig", "Scores", "Selection", "Stability",
    "compare", "control", "evaluate", "load_model", "open_scores", "perturb", "rank", "read_results",
    "read_selection", "read_stability", "run", "score", "stability", "superweights",
)  # no module of the package has one of these names (cwa.perturbation, cwa.evaluation,
#    cwa.stability_analysis, cwa.comparison), so an import never replaces an API function
_MODULES = ("plots", "errors", "checks")

__all__ = ["__version__", *_API, *_MODULES]


def __getattr__(name: str):
    import importlib

    if name in _API:
        value = getattr(importlib.import_module("cwa.api"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"cwa.{name}")
    else:
        raise AttributeError(f"module 'cwa' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
