"""Several `cwa run` output directories side by side: `cwa compare DIR... -o OUT` and
`cwa.compare(dirs)`.

The runs may differ in metric, K, seeds, perturbation or (with ``allow_mixed``) model and
evaluation windows. A run directory is read through its manifest (which stage wrote which
artifact, `experiment_manifest.json` ``stages``) and the typed readers of `cwa.artifacts`
(`read_results`, `read_selection`, `read_stability`), so every number is one a run
stored and verified, never recomputed:

- ``rows``: one per run × seed × K × condition (top-K and each control), from the
  summary of that seed and K's perturbation results: ΔNLL (the top-K's and a one-draw
  control's own value, a random control's mean over draws) with its 95% interval (the
  paired bootstrap over evaluation windows, or the 2.5–97.5 percentile over draws), the
  control's std, the top-K's p-value and z against it, and the mean KL from the baseline
  and top-1 agreement over the condition's draws (the only values computed here: plain
  means of the stored ones).
- ``overlap``: the top-K sets of every run at one common K (``topk``, default the
  largest K every run holds) and one seed (the smallest seed every run has, else each
  run's first): the Jaccard matrix over (parameter name, flat index) keys, and where each
  set lies (counts per block and per module type, `cwa.artifacts.param_group`). A run
  in global mode that lacks that K but holds a larger one contributes the first K entries
  of the larger top-K: selections are stored in rank order, so that is exactly the top-K
  ranking would give (ties included). Pairs of runs on different models get no Jaccard
  (their weights are not the same weights).
- ``mixed``: runs on different models (model fingerprint) or evaluated on different
  windows (the evaluation data fingerprint of their perturbation results) are refused
  with a `UsageError` unless ``allow_mixed``; then the comparison, every row, every
  figure and the report say so.

`Comparison.save(out)` writes `comparison.json`, `comparison.csv` (the rows), the
figures under `plots/` (`cwa.plots.comparison`) and `report.html` (`cwa.report`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa import __version__
from cwa import artifacts as A
from cwa.console import log
from cwa.errors import ArtifactError, UsageError
from cwa.plots.style import fnum as _fnum  # a float from a JSON value ("inf", None, ...)

if TYPE_CHECKING:
    from cwa.ranking import Selection

PathLike = str | os.PathLike
SCHEMA = "comparison/1"
MARKER = ".cwa-compare"  # marks a directory as written by `cwa compare`
ROW_COLUMNS = (
    "run", "label", "model", "metric", "k", "mode", "perturbation", "scale", "prob", "bit", "seed",
    "condition", "n_draws", "delta_nll", "ci95_lo", "ci95_hi", "interval", "std", "p_value", "z",
    "kl_from_baseline", "top1_agreement", "baseline_nll", "model_fingerprint", "eval_fingerprint", "mixed",
)
BOOTSTRAP = "paired bootstrap 95% over evaluation windows"
DRAWS = "2.5-97.5 percentile over draws"


# --------------------------------------------------------------------------- one run


@dataclass
class RunOutput:
    """A `cwa run` output directory, read through its manifest: `results[(seed, k)]`
    (verified perturbation `Results`), the top-K selection and stability artifact paths,
    and the manifest and resolved configuration."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    results: dict[tuple[int, int], A.Results]
    topk_paths: dict[tuple[int, int], Path]
    stability_paths: dict[int, Path]
    _selections: dict[Path, Selection] = field(default_factory=dict, repr=False)

    @property
    def metric(self) -> str:
        return str(self.config.get("metric", "unknown"))

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "global"))

    @property
    def seeds(self) -> list[int]:
        return list(dict.fromkeys(s for s, _ in self.topk_paths))

    @property
    def ks(self) -> list[int]:
        return list(dict.fromkeys(k for _, k in self.topk_paths))

    @property
    def model_name(self) -> str:
        return str((self.manifest.get("model") or {}).get("name") or "")

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint the perturbation results record (else the manifest's)."""
        fps = {str(r.attrs.get("model_fingerprint") or "") for r in self.results.values()} - {""}
        return min(fps) if fps else str((self.manifest.get("model") or {}).get("fingerprint") or "")

    @property
    def eval_fingerprint(self) -> str:
        """The data fingerprint of the evaluation windows ("" without perturbation)."""
        fps = {str(r.attrs.get("data_fingerprint") or "") for r in self.results.values()} - {""}
        return min(fps) if fps else ""

    @property
    def eval_windows(self) -> list[int]:
        for r in self.results.values():
            return list(r.doc.get("eval_windows") or [])
        return []

    @property
    def perturbation(self) -> dict[str, Any]:
        """method, scale, prob, bit as the conditions record them (empty: no perturbation)."""
        for r in self.results.values():
            for c in r.conditions:
                return {f: c.get(f) for f in ("method", "scale", "prob", "bit")}
        return {}

    @property
    def perturbation_text(self) -> str:
        p = self.perturbation
        if not p:
            return "none"
        extra = ", ".join(f"{f} {_short(p[f])}" for f in ("scale", "prob", "bit") if p.get(f) is not None)
        return f"{p['method']} ({extra})" if extra else str(p["method"])

    def selection(self, path: Path) -> Selection:
        if path not in self._selections:
            self._selections[path] = A.read_selection(path)
        return self._selections[path]

    def topk(self, seed: int, k: int) -> Selection:
        return self.selection(self.topk_paths[seed, k])

    def stability(self, k: int) -> A.Stability | None:
        p = self.stability_paths.get(k)
        return None if p is None else A.read_stability(p)

    def perturbation_report(self) -> A.Results | None:
        """`perturbation_results.json` (every seed's conditions, the summaries)."""
        doc = _read_json(self.path / "perturbation_results.json", missing_ok=True)
        return None if doc is None else A.Results(doc=doc)

    def sensitivity_stats(self) -> dict[str, Any] | None:
        return _read_json(self.path / "sensitivity_stats.json", missing_ok=True)

    def plots(self) -> list[Path]:
        """The run's figures, as the manifest lists them (those that exist)."""
        files = [self.path / p for p in self.manifest.get("plots") or []]
        return [p for p in files if p.is_file()]


def _read_json(path: Path, missing_ok: bool = False) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ArtifactError(f"{path}: missing; the directory is not a complete `cwa run` output") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable ({type(e).__name__}); re-run `cwa run` to rewrite it") from None


def read_run(path: PathLike) -> RunOutput:
    """A `cwa run` output directory: its manifest, configuration and the artifacts the
    manifest names (perturbation results read and verified at once)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: no such run directory")
    if not p.is_dir():
        raise UsageError(f"{p}: not a directory; give `cwa run` output directories")
    if not (p / "experiment_manifest.json").is_file():
        raise ArtifactError(f"{p}: not a `cwa run` output directory (no experiment_manifest.json)")
    manifest = _read_json(p / "experiment_manifest.json")
    if not isinstance(manifest, dict) or "cwa_version" not in manifest:
        raise ArtifactError(f"{p / 'experiment_manifest.json'}: not a cwa manifest")
    config = _read_json(p / "config.json")
    results, topk, stab = {}, {}, {}
    for s in manifest.get("stages") or []:
        if not isinstance(s, dict) or not isinstance(s.get("path"), str):
            continue
        f = p / s["path"]
        if s.get("stage") == "rank":
            topk[int(s["seed"]), int(s["k"])] = f
        elif s.get("stage") == "perturb":
            results[int(s["seed"]), int(s["k"])] = A.read_results(f)
        elif s.get("stage") == "stability":
            stab[int(s["k"])] = f
    if not topk:
        raise ArtifactError(f"{p}: its manifest lists no top-K selection; re-run `cwa run`")
    return RunOutput(p, manifest, config if isinstance(config, dict) else {}, results, topk, stab)


# --------------------------------------------------------------------------- rows


def _opt(v: Any) -> float | None:
    """A stored number, or None where the summary has none (not applicable)."""
    return None if v is None else _fnum(v)


def _mean(vals: list[Any]) -> float:
    xs = [_fnum(v) for v in vals]
    return math.fsum(xs) / len(xs) if xs else math.nan


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_rows(run: RunOutput, label: str = "", mixed: str = "") -> list[dict[str, Any]]:
    """One row per seed × K × condition of `run` (see the module docstring)."""
    rows = []
    for (seed, k), res in sorted(run.results.items()):
        by_name: dict[str, list[dict]] = {}
        for c in res.conditions:
            by_name.setdefault(str(c.get("name")), []).append(c)
        for name, s in res.summary.items():
            if not isinstance(s, dict):
                continue
            conds = by_name.get(name, [])
            rows.append(_row(run, label, mixed, seed, k, name, s, conds, res))
    return rows


def _row(run, label, mixed, seed, k, name, s, conds, res) -> dict[str, Any]:
    random = "mean" in s  # a control of several draws: mean / std / percentiles / p / z
    ci = s.get("ci95") if isinstance(s.get("ci95"), list | tuple) and len(s["ci95"]) == 2 else [None, None]
    first = conds[0] if conds else {}
    return {
        "run": str(run.path), "label": label, "model": run.model_name, "metric": res.doc.get("metric") or run.metric,
        "k": k, "mode": first.get("mode", run.mode), "perturbation": first.get("method"),
        "scale": first.get("scale"), "prob": first.get("prob"), "bit": first.get("bit"),
        "seed": int(s.get("seed", seed)), "condition": name, "n_draws": int(s.get("n_draws", len(conds))),
        "delta_nll": _fnum(s.get("mean") if random else s.get("delta_nll")),
        "ci95_lo": _opt(ci[0]), "ci95_hi": _opt(ci[1]), "interval": DRAWS if random else BOOTSTRAP,
        "std": _opt(s.get("std")) if random else None,
        "p_value": _opt(s.get("topk_p_value")), "z": _opt(s.get("topk_z")),
        "kl_from_baseline": _mean([c.get("kl_from_baseline") for c in conds]),
        "top1_agreement": _mean([c.get("top1_agreement") for c in conds]),
        "baseline_nll": _fnum(res.baseline.get("nll")),
        "model_fingerprint": run.model_fingerprint, "eval_fingerprint": run.eval_fingerprint, "mixed": mixed,
    }


def run_points(run: RunOutput, index: int, seen: set[str]) -> list[dict[str, Any]]:
    """Every condition's ΔNLL and KL (the figures' dots); perturbation results already
    taken from another run (same fingerprint: the same computation) are skipped."""
    out = []
    for (seed, k), res in sorted(run.results.items()):
        if res.fingerprint and res.fingerprint in seen:
            continue
        seen.add(res.fingerprint)
        for c in res.conditions:
            out.append({"run": index, "k": k, "seed": int(c.get("seed", seed)), "condition": str(c.get("name")),
                        "draw": int(c.get("draw", 0) or 0), "delta_nll": _fnum(c.get("delta_nll")),
                        "kl_from_baseline": _fnum(c.get("kl_from_baseline"))})
    return out


# --------------------------------------------------------------------------- overlap


@dataclass
class Overlap:
    """The top-K sets of every run at one K: Jaccard matrix and where they lie."""

    k: int
    seeds: list[int]  # the seed used for each run
    truncated: list[bool]  # taken as the first K of a larger top-K
    sizes: list[int]
    jaccard: list[list[float]]  # NaN for runs on different models
    random_jaccard: float | None  # K/(2n-K) when every run has the same population n
    columns: list[str]  # per-block columns (`cwa.plots.style.layer_columns`)
    per_block: list[list[int]]  # [run][column] counts
    types: list[str]  # module types
    per_type: list[list[int]]

    def as_dict(self, labels: list[str]) -> dict[str, Any]:
        return {"k": self.k, "labels": labels, "seeds": self.seeds, "truncated": self.truncated,
                "sizes": self.sizes, "jaccard": self.jaccard, "random_jaccard": self.random_jaccard,
                "location": {"columns": self.columns, "per_block": self.per_block, "types": self.types,
                             "per_type": self.per_type}}


def _choose_seeds(runs: list[RunOutput]) -> list[int]:
    common = set.intersection(*(set(r.seeds) for r in runs))
    return [min(common)] * len(runs) if common else [r.seeds[0] for r in runs]


def _ks_of(run: RunOutput, seed: int) -> list[int]:
    return sorted(k for s, k in run.topk_paths if s == seed)


def _reachable(run: RunOutput, seed: int, k: int) -> bool:
    ks = _ks_of(run, seed)
    return k in ks or (run.mode == "global" and any(x > k for x in ks))


def _common_k(runs: list[RunOutput], seeds: list[int], topk: int | None) -> int | None:
    if topk is not None:
        lacking = [f"{r.path} (K = {', '.join(map(str, _ks_of(r, s)))})"
                   for r, s in zip(runs, seeds, strict=True) if not _reachable(r, s, topk)]
        if lacking:
            raise UsageError(f"--topk {topk}: not held by {'; '.join(lacking)}; choose a K every run holds")
        return topk
    held = set.intersection(*(set(_ks_of(r, s)) for r, s in zip(runs, seeds, strict=True)))
    if held:
        return max(held)
    k = min(max(_ks_of(r, s)) for r, s in zip(runs, seeds, strict=True))
    ok = all(_reachable(r, s, k) for r, s in zip(runs, seeds, strict=True))
    return k if ok else None


def _top_keys(run: RunOutput, seed: int, k: int) -> tuple[list[str], Any, Any, bool, int | None]:
    """(params, param_index, flat_index, truncated, population) of run's top-K at `k`."""
    if (seed, k) in run.topk_paths:
        sel, truncated = run.topk(seed, k), False
    else:
        sel, truncated = run.topk(seed, min(x for x in _ks_of(run, seed) if x > k)), True
    d = sel.draws[0]
    n = sel.info.get("n_population")
    pi, fi = (d.param_index[:k], d.flat_index[:k]) if truncated else (d.param_index, d.flat_index)
    return list(sel.params), pi, fi, truncated, None if n is None else int(n)


def overlap(runs: list[RunOutput], topk: int | None = None) -> Overlap | None:
    """The top-K overlap of `runs` at a common K (None when the runs hold none)."""
    import numpy as np

    from cwa.plots.style import layer_columns, module_types

    seeds = _choose_seeds(runs)
    k = _common_k(runs, seeds, topk)
    if k is None:
        return None
    got = [_top_keys(r, s, k) for r, s in zip(runs, seeds, strict=True)]
    names = list(dict.fromkeys(n for g in got for n in g[0]))
    code = {n: i for i, n in enumerate(names)}
    sets = []
    for params, pi, fi, _, _ in got:
        ids = np.array([code[n] for n in params], dtype=np.int64)[pi]
        sets.append(np.unique(ids * (1 << 40) + fi.astype(np.int64)))
    fps = [r.model_fingerprint for r in runs]
    jac = [[_jaccard(a, b) if fps[i] == fps[j] else math.nan for j, b in enumerate(sets)] for i, a in enumerate(sets)]
    pops = {g[4] for g in got}
    n = pops.pop() if len(pops) == 1 and len(set(fps)) == 1 else None
    columns, col_of = layer_columns(names)
    types = module_types(names)
    per_block, per_type = [], []
    for params, pi, _, _, _ in got:
        counts = np.bincount(pi, minlength=len(params))
        blk, typ = dict.fromkeys(columns, 0), dict.fromkeys(types, 0)
        for name, c in zip(params, counts.tolist(), strict=True):
            blk[col_of[name]] += c
            typ[A.param_group(name)[1]] += c
        per_block.append(list(blk.values()))
        per_type.append(list(typ.values()))
    return Overlap(k, seeds, [g[3] for g in got], [len(s) for s in sets], jac,
                   None if n is None else k / (2 * n - k), columns, per_block, types, per_type)


def _jaccard(a, b) -> float:
    import numpy as np

    union = len(a) + len(b) - len(np.intersect1d(a, b, assume_unique=True))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else math.nan


# --------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """Several runs side by side (see the module docstring): `rows` (as in
    comparison.csv), `points` (every condition's ΔNLL and KL, the figures' dots),
    `overlap` (top-K Jaccard and location at one K), `mixed` (what the runs mix:
    "model", "eval_data"), `labels` (one per run), `notes`; `doc` is comparison.json."""

    runs: list[RunOutput]
    labels: list[str]
    rows: list[dict[str, Any]]
    points: list[dict[str, Any]]
    overlap: Overlap | None
    mixed: list[str]
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        arts = [sorted((r.manifest.get("artifacts") or {}).items()) for r in self.runs]
        return A.stable_hash({"stage": "compare", "runs": arts, "labels": self.labels,
                              "k": self.overlap.k if self.overlap else None, "mixed": self.mixed})

    @property
    def doc(self) -> dict[str, Any]:
        """comparison.json."""
        from cwa.report import headline

        return {
            "schema": SCHEMA, "cwa_version": __version__, "fingerprint": self.fingerprint,
            "mixed": self.mixed,
            "runs": [_run_doc(r, lab, headline(r)) for r, lab in zip(self.runs, self.labels, strict=True)],
            "rows": self.rows, "conditions": self.points,
            "overlap": self.overlap.as_dict(self.labels) if self.overlap else None,
            "figures": self.figures, "notes": self.notes,
        }

    def to_pandas(self):
        """The rows (comparison.csv) as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(ROW_COLUMNS))

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({c: "" if row[c] is None else row[c] for c in ROW_COLUMNS})
        return buf.getvalue()

    def save(self, out: PathLike | None = None, *, plots: bool = True, report: bool = True) -> Path:
        """Write comparison.json, comparison.csv, the figures (plots/) and report.html
        into `out` (default ./cwa-out/compare-{fingerprint16}); returns `out`."""
        out = Path(out) if out is not None else A.DEFAULT_OUT_DIR / f"compare-{self.fingerprint[:16]}"
        _claim(out, self.runs)
        self.figures = _save_figures(self, out) if plots else []
        _remove_stale_plots(out, set(self.figures))
        A.write_text_atomic(out / "comparison.csv", self.csv_text())
        A.write_json(out / "comparison.json", self.doc)
        if report:
            from cwa.report import write_comparison_report

            write_comparison_report(self, out)
        self.path = out
        return out


def _run_doc(r: RunOutput, label: str, headline: str) -> dict[str, Any]:
    return {"label": label, "dir": str(r.path), "model": r.model_name, "model_fingerprint": r.model_fingerprint,
            "eval_fingerprint": r.eval_fingerprint, "eval_windows": r.eval_windows, "metric": r.metric,
            "mode": r.mode, "perturbation": r.perturbation, "seeds": r.seeds, "ks": r.ks,
            "controls": r.config.get("controls"), "baseline": next(iter(r.results.values())).baseline
            if r.results else None, "headline": headline, "cwa_version": r.manifest.get("cwa_version"),
            "git_commit": r.manifest.get("git_commit"), "finished": r.manifest.get("finished")}


def compare(runs: Sequence[PathLike | RunOutput], *, labels: Sequence[str] | None = None,
            topk: int | None = None, allow_mixed: bool = False) -> Comparison:
    """Compare `cwa run` output directories (see the module docstring). `labels` name
    the runs (default: what tells them apart: metric, K, ...); `topk` is the K of the
    overlap (default: the largest K every run holds). Runs on different models or
    evaluation windows are a `UsageError` unless `allow_mixed`. Nothing is written until
    `.save(out)`."""
    if isinstance(runs, str | os.PathLike | RunOutput):
        runs = [runs]
    outs = [r if isinstance(r, RunOutput) else read_run(r) for r in runs]
    if not outs:
        raise UsageError("cwa compare: give one or more `cwa run` output directories")
    if topk is not None:
        from cwa import checks as C

        C.check_topk(topk)
    _check_distinct(outs)
    mixed = _mixed(outs, allow_mixed)
    labs = _labels(outs, labels)
    mark = "+".join(mixed)
    rows = [row for r, lab in zip(outs, labs, strict=True) for row in run_rows(r, lab, mark)]
    seen: set[str] = set()
    points = [p for i, r in enumerate(outs) for p in run_points(r, i, seen)]
    notes = [f"{r.path}: no perturbation results (--perturb none); no rows" for r in outs if not r.results]
    ov = overlap(outs, topk)
    if ov is None:
        notes.append("no top-K overlap: the runs hold no common K (nor, in global mode, a larger one)")
    elif any(ov.truncated):
        cut = ", ".join(lab for lab, t in zip(labs, ov.truncated, strict=True) if t)
        notes.append(f"top-{ov.k} of {cut}: the first {ov.k} entries of a larger top-K (rank order)")
    if mixed:
        notes.append(f"mixed comparison ({', '.join(mixed)}): ΔNLL of runs on different models or "
                     "evaluation windows are not measured against the same baseline")
    return Comparison(outs, labs, rows, points, ov, mixed, notes)


def _check_distinct(runs: list[RunOutput]) -> None:
    seen: dict[Path, Path] = {}
    for r in runs:
        key = r.path.resolve()
        if key in seen:
            raise UsageError(f"{r.path}: given twice (as {seen[key]}); give each run directory once")
        seen[key] = r.path


def _mixed(runs: list[RunOutput], allow: bool) -> list[str]:
    """What the runs mix ("model", "eval_data"); a UsageError unless `allow`."""
    out, what = [], []
    models = {r.model_fingerprint for r in runs}
    if len(models) > 1:
        out.append("model")
        what.append("different models (" + "; ".join(
            f"{r.path}: {r.model_name} {r.model_fingerprint[:12]}" for r in runs) + ")")
    evals = {r.eval_fingerprint for r in runs} - {""}
    if len(evals) > 1:
        out.append("eval_data")
        what.append("different evaluation windows (" + "; ".join(
            f"{r.path}: {len(r.eval_windows)} windows, {r.eval_fingerprint[:12]}" for r in runs if r.eval_fingerprint) + ")")
    if out and not allow:
        raise UsageError(f"cwa compare: the runs are of {' and '.join(what)}; their numbers do not share a "
                         "baseline. Pass --allow-mixed to compare them anyway (the comparison is then marked)")
    return out


_LABEL_FIELDS = (
    lambda r: r.model_name or r.model_fingerprint[:12],
    lambda r: r.mode,
    lambda r: r.perturbation_text,
    lambda r: "K " + ",".join(map(str, r.ks)),
    lambda r: "seeds " + ",".join(map(str, r.seeds)),
)


def _labels(runs: list[RunOutput], given: Sequence[str] | None) -> list[str]:
    """`given`, or the metric plus the fields that tell the runs apart (model, mode,
    perturbation, K, seeds), added in that order until the labels are unique (the
    directory names when they never are)."""
    if given is not None:
        labels = [str(x) for x in given]
        if len(labels) != len(runs):
            raise UsageError(f"--labels: {len(labels)} labels for {len(runs)} runs; give one per run")
        if len(set(labels)) != len(labels):
            raise UsageError(f"--labels {','.join(labels)}: contains duplicates")
        return labels
    parts = [[r.metric] for r in runs]
    for get in _LABEL_FIELDS:
        if len(set(", ".join(p) for p in parts)) == len(runs):
            break
        vals = [get(r) for r in runs]
        if len(set(vals)) > 1:
            for p, v in zip(parts, vals, strict=True):
                p.append(v)
    labels = [", ".join(p) for p in parts]
    if len(set(labels)) == len(labels):
        return labels
    names = [r.path.name or str(r.path) for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]


# --------------------------------------------------------------------------- writing


def _claim(out: Path, runs: list[RunOutput]) -> None:
    """`out` may be new, empty or an earlier comparison's directory, never a run's."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: is a file; give a directory")
    for r in runs:
        if out.exists() and out.resolve() == r.path.resolve():
            raise UsageError(f"-o {out}: is an input run directory; choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        first = sorted(p.name for p in out.iterdir())[0]
        raise UsageError(f"-o {out}: holds files cwa compare did not write (e.g. {first}); choose a new or "
                         "empty directory")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        A.write_text_atomic(out / MARKER, f"cwa compare output directory (cwa {__version__})\n")


def _save_figures(cmp: Comparison, out: Path) -> list[str]:
    from cwa.plots import comparison as P
    from cwa.plots.style import save

    k = cmp.overlap.k if cmp.overlap else None
    wanted = [
        ("dose_response.png", P.comparison_dose_response),
        ("metric_comparison.png", lambda c: P.metric_comparison([r for run in c.runs for r in run.results.values()])),
        (f"topk_jaccard_k{k}.png", P.topk_jaccard),
        (f"topk_location_k{k}.png", P.topk_location),
        ("headline_table.png", P.headline_table),
    ]
    files = []
    for name, build in wanted:
        try:
            fig = build(cmp)
        except UsageError as e:
            log(f"note: {name[:-4]} not drawn: {e}", verbose_only=True)
            continue
        save(fig, out / "plots" / name)
        files.append(f"plots/{name}")
    return files


def _remove_stale_plots(out: Path, keep: set[str]) -> None:
    for p in (out / "plots").glob("*.png"):
        if f"plots/{p.name}" not in keep:
            p.unlink()


# --------------------------------------------------------------------------- headline table


def headline_table(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    """(columns, rows of text): per run and K, the first seed's top-K ΔNLL with its
    interval and KL, each control's ΔNLL with its interval (p and z for random controls)
    and the stability of the top-K across seeds."""
    controls = list(dict.fromkeys(r["condition"] for r in cmp.rows if r["condition"] != "topk"))
    cols = ["run", "K", "seed", "top-K ΔNLL [95% CI]", "KL top-K"]
    for c in controls:
        cols.append(f"{c} ΔNLL [95%]")
        if any(r["condition"] == c and r["p_value"] is not None for r in cmp.rows):
            cols.append(f"p, z vs {c}")
    cols.append("seeds' Jaccard (chance)")
    table = []
    for run, label in zip(cmp.runs, cmp.labels, strict=True):
        for k in run.ks:
            mine = [r for r in cmp.rows if r["run"] == str(run.path) and r["k"] == k and r["seed"] == run.seeds[0]]
            if not mine:
                continue
            table.append(_headline_cells(cols, controls, run, label, k, {r["condition"]: r for r in mine}))
    return cols, table


def _headline_cells(cols, controls, run, label, k, by) -> list[str]:
    def interval(r):
        return f"{fmt(r['delta_nll'], sign=True)} [{fmt(r['ci95_lo'])}, {fmt(r['ci95_hi'])}]"

    top = by.get("topk")
    cells = {"run": label, "K": str(k), "seed": str(run.seeds[0]),
             "top-K ΔNLL [95% CI]": interval(top) if top else "—", "KL top-K": fmt(top["kl_from_baseline"]) if top else "—"}
    for c in controls:
        r = by.get(c)
        cells[f"{c} ΔNLL [95%]"] = interval(r) if r else "—"
        cells[f"p, z vs {c}"] = f"{fmt(r['p_value'])}, {fmt(r['z'])}" if r and r["p_value"] is not None else "—"
    st = run.stability(k)
    cells["seeds' Jaccard (chance)"] = (f"{fmt(st.mean_jaccard)} ({fmt(st.random_jaccard)})" if st else "— (one seed)")
    return [cells.get(c, "—") for c in cols]


def fmt(x: Any, digits: int = 3, sign: bool = False) -> str:
    """A number for people: 3 significant digits, "inf"/"nan" spelled out, "—" for None."""
    if x is None:
        return "—"
    v = _fnum(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:+.{digits}g}" if sign else f"{v:.{digits}g}"
