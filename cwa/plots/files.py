"""`plot_artifacts(paths, out_dir)`: every figure a set of artifact files allows.

It reads every artifact given (a directory stands for every artifact below it) once,
groups them, and writes the figures it can:

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
Artifacts of different models never share a figure. When two groups would get the same
file name (e.g. the same metric and K in both modes, or two perturbation methods), the
distinguishing option is added before the figure kind.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa import artifacts as A
from cwa.console import log
from cwa.errors import ArtifactError, UsageError
from cwa.plots import style as S

if TYPE_CHECKING:
    from cwa.ranking import Selection

_ARTIFACT_SUFFIXES = (".h5", ".hdf5", ".safetensors")


# --------------------------------------------------------------------------- reading


@dataclass
class _Loaded:
    selections: list[Selection] = field(default_factory=list)  # top-K only
    results: list[A.Results] = field(default_factory=list)
    stabilities: list[A.Stability] = field(default_factory=list)
    sel_metrics: dict[str, str] = field(default_factory=dict)  # file name / path -> metric
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


def _read(f: Path) -> tuple[str, A.H5Artifact | None]:
    """(schema, the HDF5 artifact or None for a scores file), the HDF5 file read and
    verified once (`A.artifact_schema` would read it, and the typed reader again)."""
    if f.suffix.lower() != ".safetensors":
        try:
            art = A.read_h5(f)
            return art.schema, art
        except ArtifactError:
            if f.suffix.lower() in (".h5", ".hdf5"):
                raise
    schema = A.artifact_schema(f)  # a scores header, or the reason it is no artifact
    return schema, (A.read_h5(f) if schema != A.SCORES_SCHEMA else None)


def _selection_of(art: A.H5Artifact) -> Selection:
    """`A.read_selection` of an artifact already read: the same object and checks."""
    return A.selection_from(art)


def _add(got: _Loaded, f: Path, schema: str, art: A.H5Artifact) -> None:
    from cwa.plots.selection import view

    if schema == A.SELECTION_SCHEMA:
        sel = _selection_of(art)
        got.sel_metrics[f.name] = got.sel_metrics[str(f)] = view(sel).metric
        if sel.kind == "topk":
            got.selections.append(sel)
        else:
            got.skipped.append(f"{f} ({sel.kind} control selection)")
    elif schema == A.PERTURBATION_SCHEMA:
        if isinstance(art.doc, dict) and isinstance(art.doc.get("conditions"), list):
            got.results.append(A.Results(doc=art.doc, arrays=art.arrays, attrs=art.attrs, path=art.path))
        else:
            got.skipped.append(f"{f} (perturbation results without conditions)")
    elif schema == A.STABILITY_SCHEMA:
        if isinstance(art.doc, dict):
            st = A.Stability(doc=art.doc, arrays=art.arrays, attrs=art.attrs, path=art.path)
            got.stabilities.append(st)
    else:
        got.skipped.append(f"{f} ({schema})")


def _load(paths: Iterable[Path]) -> _Loaded:
    got = _Loaded()
    seen: set[str] = set()
    for f, explicit in _expand(paths):
        if not explicit and f.suffix.lower() not in _ARTIFACT_SUFFIXES:
            continue  # JSON reports, CSVs, PNGs of a run directory
        key = str(f.resolve())
        if key in seen:
            continue
        try:
            schema, art = _read(f)
        except ArtifactError:
            if explicit:
                raise
            got.skipped.append(f"{f} (not a cwa artifact)")
            continue
        seen.add(key)
        if art is None:
            got.skipped.append(f"{f} (scores: plots read the histograms `cwa rank` stores)")
            continue
        if art.fingerprint:
            if art.fingerprint in seen:
                continue  # the same artifact twice (a copy)
            seen.add(art.fingerprint)
        _add(got, f, schema, art)
    return got


# --------------------------------------------------------------------------- file names


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(s)) or "unknown"


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


# --------------------------------------------------------------------------- figures


def _write(build: Callable[[Any], Any], arg: Any, out_dir: Path, stem: str, kind: str,
           written: list[Path]) -> None:
    """Build and save one selection figure; one its inputs cannot give is a note."""
    try:
        fig = build(arg)
    except UsageError:
        log(f"note: no {kind.replace('_', ' ')} figure for {stem} "
            "(the selection has no histograms or no numbered blocks)")
        return
    written.append(S.save(fig, out_dir / f"{stem}_{kind}.png"))


def _selection_figures(sels: list[Selection], out_dir: Path, written: list[Path]) -> None:
    """One group per (metric, K, mode, rank_by, model), the seeds inside."""
    from cwa.plots.selection import (
        layer_comparison,
        sensitivity_distribution,
        sensitivity_heatmap,
        view,
    )

    views = [view(s) for s in sels]
    groups: dict[tuple, list] = defaultdict(list)
    for v in views:
        groups[(v.metric, v.sel.k, v.sel.mode, v.sel.rank_by, v.model)].append(v)
    label = {v.model: _model_label(v.model_name, v.model) for v in views}
    keys = list(groups)
    stems = _names([((k[0], f"k{k[1]}"), {"model": label[k[4]], "mode": k[2], "rank_by": k[3]})
                    for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        vs = sorted(groups[key], key=lambda v: (v.seed, str(v.sel.path)))
        first = next((v for v in vs if v.hist is not None), vs[0])
        _write(sensitivity_distribution, first.sel, out_dir, stem, "sensitivity_distribution", written)
        _write(layer_comparison, [v.sel for v in vs], out_dir, stem, "layer_comparison", written)
        _write(sensitivity_heatmap, vs[0].sel, out_dir, stem, "sensitivity_heatmap", written)


def _perturbation_figures(got: _Loaded, out_dir: Path, written: list[Path]) -> None:
    """Effects per (metric, K, method, mode, model); dose response over two or more K."""
    from cwa.plots import perturbation as P

    known = sorted({m for m in got.sel_metrics.values() if m})
    cache: dict[str, str | None] = {}
    metrics = [P.condition_metrics(r.doc, got.sel_metrics, known, cache) for r in got.results]
    conds = P.conditions(got.results, metrics)
    eff: dict[tuple, list[P.Cond]] = defaultdict(list)
    dose: dict[tuple, list[P.Cond]] = defaultdict(list)
    for c in conds:
        eff[P.effects_key(c)].append(c)
        dose[P.dose_key(c)].append(c)
    label = {c.model: _model_label(c.model_name, c.model) for c in conds}
    keys = list(eff)
    stems = _names([((k[0], f"k{k[1]}"), {"model": label[k[4]], "method": k[2], "mode": k[3]})
                    for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        fig = P.effects_figure(eff[key], got.results)
        written.append(S.save(fig, out_dir / f"{stem}_perturbation_effects.png"))
    keys = [k for k in dose if len({c.k for c in dose[k]}) >= 2]
    stems = _names([((k[0],), {"model": label[k[3]], "method": k[1], "mode": k[2]}) for k in keys])
    for key, stem in zip(keys, stems, strict=True):
        written.append(S.save(P.dose_figure(dose[key], got.results), out_dir / f"{stem}_dose_response.png"))


def _stability_figures(stabilities: list[A.Stability], out_dir: Path, written: list[Path]) -> None:
    """One figure per stability artifact."""
    from cwa.plots.stability_analysis import stability

    groups = []
    for st in stabilities:
        d = st.doc
        metric = d.get("metric") or "+".join(dict.fromkeys(map(str, d.get("metrics") or []))) or "unknown"
        options = {"mode": d.get("mode"), "kind": d.get("kind"), "rank_by": d.get("rank_by"),
                   "file": st.path.stem}
        groups.append(((metric, f"k{d.get('k')}"), options))
    for st, stem in zip(stabilities, _names(groups), strict=True):
        try:
            fig = stability(st)
        except UsageError as e:
            log(f"note: {st.path}: {e}")
            continue
        written.append(S.save(fig, out_dir / f"{stem}_stability_analysis.png"))


def plot_artifacts(paths: list[Path], out_dir: Path) -> list[Path]:
    """Write every figure the given artifacts allow into `out_dir`; return their paths.

    A directory argument stands for every artifact below it (e.g. `OUT/artifacts`).
    Raises `UsageError` when nothing plottable was given.
    """
    loaded = _load(paths)
    out_dir = Path(out_dir)
    written: list[Path] = []
    _selection_figures(loaded.selections, out_dir, written)
    _perturbation_figures(loaded, out_dir, written)
    _stability_figures(loaded.stabilities, out_dir, written)
    for s in loaded.skipped:
        log(f"note: not plotted: {s}", verbose_only=True)
    if not written:
        raise UsageError(
            "nothing to plot: give top-K selections (cwa rank), perturbation results "
            "(cwa perturb) or stability artifacts (cwa stability), or a directory holding them"
        )
    return written
