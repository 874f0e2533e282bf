"""Stability of a top-K selection across seeds or metrics.

Are the "critical weights" a property of the model, or of the calibration windows a seed
happened to draw? This module compares several scores artifacts of one model (different
seeds of one metric, or different metrics) -- or several selection artifacts, for overlap
only -- and reports:

Jaccard (set overlap)
    J(A, B) = |A ∩ B| / |A ∪ B| of the two top-K sets, a weight being the key
    (parameter name, flat index). The matrix is symmetric with ones on the diagonal;
    ``mean_jaccard`` is the mean of its off-diagonal entries (over pairs i < j).

Random baseline
    Two independent uniform K-subsets of a population of n share on average K²/n entries,
    so the ratio of expected intersection to expected union is
    (K²/n) / (2K − K²/n) = K / (2n − K). ``random_jaccard`` is that ratio of expectations,
    an approximation of E[J] that is excellent whenever K ≪ n (both counts concentrate).
    In ``per_layer`` mode the same reasoning per tensor gives
    Σ_t k_t²/n_t / Σ_t (2 k_t − k_t²/n_t), with k_t = min(K, n_t).

Spearman rank correlation
    For each pair (A, B), over the union of the two top-K sets, the Pearson correlation of
    the ranks of the two runs' ranking keys (``|score|`` by default, ``score`` with
    ``rank_by="value"``), ties getting their average rank. The union is pairwise, so the
    (A, B) entry does not change when a third run is added; an entry whose tensor one of
    the two runs did not score is left out (counted in ``spearman_n``). Restricting to the
    top-K union asks "do the runs agree on how important the candidate weights are",
    instead of being dominated by millions of near-zero scores. Undefined (NaN) when one
    side is constant on the union.

    Caveat: on the union of two top-K sets, zero is not the "no agreement" value. Each
    run's own top-K outranks the other's entries in that run's ranking, so two
    *independent* rankings give about −3/4 when K ≪ n (ranks 1..2K split into halves
    that swap order: the between-halves share of the rank variance is 3/4);
    ``random_spearman`` records that baseline. Identical rankings give +1.

Jaccard as a function of K
    Mean off-diagonal Jaccard at K on a log grid from K/10 to 10·K (9 points, K in the
    middle), clipped to the population (and to 10 million, or K if larger, to bound
    memory). One exact ``cwa.ranking.topk`` pass at the
    largest K per input: a ranking is in rank order, so its first K' entries (per tensor
    in ``per_layer`` mode) are exactly the top-K' under the same tie rule.

Per-tensor overlap
    For every scored tensor: ``counts`` (top-K entries in that tensor for each label,
    aligned with ``labels``), ``count_overlap`` (mean over pairs of min(c_a, c_b) /
    max(c_a, c_b): do the runs put the same share of the top-K in this tensor, whatever
    the entries; null when every pair is 0/0), ``jaccard`` (mean over pairs of the Jaccard
    of the entries inside the tensor; null when every pair's union is empty) and ``shared``
    (entries in every run's top-K).

Selections as input give Jaccard, its random baseline (global mode) and per-tensor
overlap, but no Spearman or Jaccard-vs-K (they need the scores): those keys are null.
Labels are the seeds (``cwa.seed``) when every input has the same metric, else the metric
names; when those collide (two files of the same seed and metric) the file stems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cwa import artifacts as A
from cwa.errors import ArtifactError, UsageError

ANALYSIS_VERSION = 1
JVK_MAX = 10_000_000  # the K grid stops here (memory: one int64 per entry per input)
RANDOM_SPEARMAN = -0.75  # independent rankings, K << n: see the module docstring
GRID_POINTS = 9  # K/10 ... 10K, log-spaced, K in the middle
_SHIFT = 40  # key code = (param index << 40) | flat index; tensors hold < 2**40 entries


@dataclass
class StabilityInput:
    """One compared artifact: a scores file (full analysis) or a selection (overlap)."""

    path: Path
    kind: str  # "scores" | "selection"
    metric: str
    seed: int | None
    fingerprint: str
    model_fingerprint: str
    scores: Any = None  # cwa.artifacts.ScoresFile
    selection: Any = None  # cwa.ranking.Selection
    label: Any = None
    on_disk: bool = True  # False: an object in memory (`path` is then only a label)


@dataclass
class Plan:
    """Resolved inputs and options: everything the fingerprint and the analysis need."""

    inputs: list[StabilityInput]
    k: int
    mode: str
    rank_by: str
    kind: str  # "seeds" | "metrics" | "files"
    labels: list[Any]
    input_kind: str  # "scores" | "selections"
    notes: list[str] = field(default_factory=list)

    @property
    def fingerprints(self) -> list[str]:
        return [i.fingerprint for i in self.inputs]

    @property
    def model_fingerprint(self) -> str:
        fps = {i.model_fingerprint for i in self.inputs if i.model_fingerprint}
        return fps.pop() if fps else ""


# --------------------------------------------------------------------------- inputs


def load_inputs(items: list[Any]) -> list[StabilityInput]:
    """Open every input (scores or selections, objects or files, not mixed) and check
    they share a model. An object in memory is labelled `input<i>` where a file would be
    labelled by its name."""
    if len(items) < 2:
        raise UsageError(
            "stability needs at least two seeds or metrics: pass two or more scores "
            "(or selection) artifacts"
        )
    return _check_inputs([_input(x, i) for i, x in enumerate(items)])


def _input(x: Any, i: int) -> StabilityInput:
    from cwa.ranking import Selection

    if isinstance(x, A.Scores | Selection):
        on_disk = x.path is not None
        path = Path(x.path) if on_disk else Path(f"input{i}")
    else:
        on_disk, path = True, Path(x)
        schema = A.artifact_schema(path)
        if schema == A.SCORES_SCHEMA:
            x = A.open_scores(path)
        elif schema == A.SELECTION_SCHEMA:
            x = A.read_selection(path)
        else:
            raise UsageError(
                f"{path}: is a {schema} artifact; cwa stability compares scores (full analysis) "
                "or selections (overlap only)"
            )
    if isinstance(x, A.Scores):
        return StabilityInput(path=path, kind="scores", metric=x.metric, seed=_int_or_none(x.meta.get("cwa.seed")),
                              fingerprint=x.fingerprint, model_fingerprint=x.model_fingerprint, scores=x,
                              on_disk=on_disk)
    prov = x.provenance
    seed = _int_or_none(prov.get("scores_seed"))
    return StabilityInput(path=path, kind="selection", metric=x.metric or str(prov.get("metric") or ""),
                          seed=x.seed if seed is None else seed, fingerprint=x.fingerprint,
                          model_fingerprint=str(prov.get("model_fingerprint") or ""), selection=x,
                          on_disk=on_disk)


def _check_inputs(out: list[StabilityInput]) -> list[StabilityInput]:
    """One kind of input, one model."""
    kinds = {i.kind for i in out}
    if len(kinds) > 1:
        raise UsageError(
            "cwa stability takes either scores artifacts or selection artifacts, not both; "
            "rank the scores first (cwa rank) or pass only scores"
        )
    models = {i.model_fingerprint for i in out if i.model_fingerprint}
    if len(models) > 1:
        desc = ", ".join(f"{i.path.name}: {i.model_fingerprint[:12]}…" for i in out)
        raise ArtifactError(
            f"the inputs were computed on different models ({desc}); stability compares "
            "runs of one model"
        )
    return out


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def make_labels(inputs: list[StabilityInput]) -> tuple[str, list[Any]]:
    """("seeds", seeds) when all metrics agree, else ("metrics", names); on collisions
    ("files", file stems), made unique by position if the stems collide too."""
    metrics = [i.metric for i in inputs]
    if len(set(metrics)) == 1:
        kind, labels = "seeds", [i.seed for i in inputs]
        if any(s is None for s in labels):
            labels = [None] * len(inputs)
    else:
        kind, labels = "metrics", metrics
    if len(set(map(str, labels))) < len(labels) or any(x is None for x in labels):
        kind = "files"
        labels = [i.path.stem for i in inputs]
        if len(set(labels)) < len(labels):
            labels = [f"{n}:{s}" for n, s in enumerate(labels)]
    return kind, labels


def plan(
    paths: list[Any],
    *,
    topk: int | None,
    mode: str | None = None,
    rank_by: str | None = None,
) -> Plan:
    """Open and validate the inputs and resolve K, mode and ranking key."""
    inputs = load_inputs(paths)
    _check_distinct(inputs)
    notes: list[str] = []
    if inputs[0].kind == "scores":
        if topk is None:
            raise UsageError("cwa stability on scores needs --topk K")
        k, mode, rank_by = _check_k(topk), _check_mode(mode or "global"), _check_rank_by(rank_by)
        input_kind = "scores"
    else:
        sels = [i.selection for i in inputs]
        ks = sorted({s.k for s in sels})
        modes = sorted({s.mode for s in sels})
        rbs = sorted({s.rank_by for s in sels})
        if len(ks) > 1 or len(modes) > 1:
            raise UsageError(
                f"the selections differ in K ({', '.join(map(str, ks))}) or mode "
                f"({', '.join(modes)}); compare selections of one K and mode"
            )
        k, sel_mode = ks[0], modes[0]
        if topk is not None and topk != k:
            raise UsageError(
                f"--topk {topk}: the selections hold K = {k}; omit --topk for selections"
            )
        if mode is not None and mode != sel_mode:
            raise UsageError(f"--mode {mode}: the selections were made in {sel_mode} mode")
        if rank_by is not None and rbs != [rank_by]:
            raise UsageError(f"--rank-by {rank_by}: the selections were ranked by {', '.join(rbs)}")
        mode, rank_by = sel_mode, rbs[0] if len(rbs) == 1 else ",".join(rbs)
        kinds = sorted({s.kind for s in sels})
        if kinds != ["topk"]:
            notes.append(f"selection kinds compared: {', '.join(kinds)} (draw 0 of each)")
        input_kind = "selections"
    kind, labels = make_labels(inputs)
    for inp, lab in zip(inputs, labels, strict=True):
        inp.label = lab
    return Plan(inputs, k, mode, rank_by, kind, labels, input_kind, notes)


def _check_distinct(inputs: list[StabilityInput]) -> None:
    """The same artifact twice (one path, a copy, a link: one fingerprint, seed and metric)
    would count as perfect agreement. Two seeds of a seed-free metric (magnitude) share a
    fingerprint but not a seed, and are compared (their Jaccard is 1, a real finding)."""
    seen: dict[tuple, Path] = {}
    for inp in inputs:
        key = (inp.fingerprint or str(inp.path.resolve()), inp.seed, inp.metric)
        if key in seen:
            raise UsageError(
                f"{inp.path}: is the same artifact as {seen[key]}; stability compares "
                "different seeds or metrics"
            )
        seen[key] = inp.path


def _check_k(k: int) -> int:
    from cwa.checks import check_topk

    return check_topk(k)


def _check_mode(mode: str) -> str:
    from cwa.checks import check_mode

    return check_mode(mode)


def _check_rank_by(rank_by: str | None) -> str:
    from cwa.checks import check_rank_by

    return check_rank_by(rank_by)


# --------------------------------------------------------------------------- math


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties getting the average of the ranks they span (float64)."""
    x = np.asarray(x)
    n = x.size
    if n == 0:
        return np.zeros(0)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new) - 1  # tie group of each sorted position
    starts = np.r_[np.flatnonzero(new), n]  # first sorted position of each group, + end
    avg = (starts[:-1] + starts[1:] - 1) / 2.0 + 1.0  # average 1-based rank per group
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks; NaN if a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size != b.size:
        raise ValueError("spearman: arrays of different length")
    if a.size < 2:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(da @ da) * float(db @ db))
    if den == 0.0:
        return math.nan
    return float(min(1.0, max(-1.0, float(da @ db) / den)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two arrays of unique keys (1.0 when both are empty)."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return 1.0 if union == 0 else inter / union


def jaccard_matrix(sets: list[np.ndarray]) -> np.ndarray:
    m = len(sets)
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = jaccard(sets[i], sets[j])
    return out


def off_diagonal_mean(mat: np.ndarray) -> float:
    """Mean over pairs i < j, ignoring NaN (NaN when there is no finite pair)."""
    iu = np.triu_indices(mat.shape[0], 1)
    v = mat[iu]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def random_jaccard(k: int, n: int) -> float:
    """K / (2n − K): expected |A∩B| over expected |A∪B| for two independent uniform
    K-subsets of n (approximates E[Jaccard]; exact in the limit K ≪ n)."""
    if n <= 0 or k <= 0:
        return math.nan
    k = min(k, n)
    return k / (2 * n - k)


def random_jaccard_per_layer(k: int, sizes: list[int] | np.ndarray) -> float:
    """Per-tensor version: Σ k_t²/n_t / Σ (2 k_t − k_t²/n_t), k_t = min(K, n_t)."""
    n = np.asarray(sizes, dtype=np.float64)
    n = n[n > 0]
    if n.size == 0 or k <= 0:
        return math.nan
    kt = np.minimum(float(k), n)
    inter = float((kt * kt / n).sum())
    return inter / float((2 * kt).sum() - inter)


def k_grid(k: int, n_max: int, points: int = GRID_POINTS) -> list[int]:
    """Log grid K/10 ... 10K (K included), rounded, clipped to [1, n_max], unique."""
    raw = np.geomspace(k / 10.0, k * 10.0, points)
    vals = {int(min(max(1, round(v)), n_max)) for v in raw}
    vals.add(int(min(k, n_max)))
    return sorted(vals)


def _prefix(param_index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Positions of the first n entries of a rank-ordered draw (per tensor in per_layer)."""
    if mode == "global":
        return np.arange(min(n, param_index.size))
    order = np.argsort(param_index, kind="stable")
    sorted_p = param_index[order]
    starts = np.searchsorted(sorted_p, sorted_p, side="left")
    within = np.arange(order.size) - starts  # rank inside its tensor
    return np.sort(order[within < n])


# --------------------------------------------------------------------------- analysis


@dataclass
class StabilityResult:
    doc: dict[str, Any]
    arrays: dict[str, Any]


def analyze(p: Plan) -> StabilityResult:
    """Run the comparison described in the module docstring."""
    pindex, common, notes = _param_index(p)
    all_params = list(pindex)
    if p.input_kind == "scores":
        pop = _population_from_scores(p, common, pindex)
        sets_k = _sets_at(pop.draws, p.k, p.mode)
    else:
        pop = _population_from_selections(p.inputs, pindex)
        sets_k = [np.sort(c) for c, _ in pop.draws]
    jac = jaccard_matrix(sets_k)
    rj = _random_baseline(p, pop, notes)
    doc: dict[str, Any] = {
        "k": p.k,
        "labels": list(p.labels),
        "jaccard": jac.tolist(),
        "mean_jaccard": off_diagonal_mean(jac),
        "random_jaccard": None if math.isnan(rj) else rj,
        "spearman": None,
        "jaccard_vs_k": None,
        "per_tensor_overlap": {},
    }
    arrays: dict[str, Any] = {
        "labels": np.array([str(x) for x in p.labels], dtype=object),
        "jaccard": jac,
    }
    if p.input_kind == "scores":
        _add_spearman(p, sets_k, pindex, all_params, doc, arrays)
        _add_jaccard_vs_k(p, pop, doc, arrays)
    else:
        doc["mean_spearman"] = None
        doc["random_spearman"] = None

    per_tensor, counts = _per_tensor(sets_k, all_params)
    doc["per_tensor_overlap"] = per_tensor
    arrays["per_tensor/params"] = np.array(all_params, dtype=object)
    arrays["per_tensor/counts"] = counts
    doc.update(_describe(p, pop.n_population, notes))
    return StabilityResult(doc=doc, arrays=arrays)


@dataclass
class _Population:
    """Each input's top entries and what the random baselines need to know of them."""

    draws: list[tuple[np.ndarray, np.ndarray]]  # (codes in rank order, param index) per input
    sizes: list[int] | None = None  # entries of each tensor every input scored
    grid: list[int] | None = None  # the K grid of jaccard_vs_k
    n_population: int | None = None


def _names(inp: StabilityInput) -> list[str]:
    return inp.scores.names if inp.scores is not None else inp.selection.params


def _param_index(p: Plan) -> tuple[dict[str, int], list[str], list[str]]:
    """One index over every parameter name met, in order of first appearance; the names
    every input scored; the notes so far (a tensor scored by only some inputs)."""
    pindex: dict[str, int] = {}
    for inp in p.inputs:
        for n in _names(inp):
            pindex.setdefault(n, len(pindex))
    scored = [set(_names(inp)) for inp in p.inputs]
    common = [n for n in pindex if all(n in s for s in scored)]
    notes = list(p.notes)
    if len(common) < len(pindex):
        notes.append(
            f"{len(pindex) - len(common)} tensor(s) are scored by only some inputs; "
            "their top-K entries count in the Jaccard sets"
        )
    return pindex, common, notes


def _population_from_scores(p: Plan, common: list[str], pindex: dict[str, int]) -> _Population:
    """Rank every scores input once, at the largest K of the grid (shapes checked)."""
    from cwa.ranking import topk as rank_topk

    inputs = p.inputs
    for n in common:
        shapes = {tuple(inp.scores.shape(n)) for inp in inputs}
        if len(shapes) > 1:
            raise ArtifactError(
                f"tensor {n!r} has different shapes in the inputs: {sorted(shapes)}"
            )
    sizes = [_numel(inputs[0].scores.shape(n)) for n in common]
    pops = [sum(_numel(inp.scores.shape(n)) for n in inp.scores.names) for inp in inputs]
    if p.mode == "global":
        if p.k > min(pops):
            raise UsageError(
                f"--topk {p.k}: larger than the scored population ({min(pops)} entries)"
            )
        n_max = min(pops)
    else:
        n_max = max(
            max(_numel(inp.scores.shape(n)) for n in inp.scores.names) for inp in inputs
        )
    grid = k_grid(p.k, max(min(n_max, JVK_MAX), min(p.k, n_max)))
    k_max = max(grid)
    draws = []
    for inp in inputs:
        sel = rank_topk(inp.scores, k_max, mode=p.mode, rank_by=p.rank_by, seed=inp.seed or 0)
        draws.append(_codes(sel.params, sel.draws[0], pindex))
    return _Population(draws=draws, sizes=sizes, grid=grid, n_population=int(sum(sizes)))


def _population_from_selections(
    inputs: list[StabilityInput], pindex: dict[str, int]
) -> _Population:
    """The selections' own draws; the population size when every selection records it."""
    draws = [_codes(inp.selection.params, inp.selection.draws[0], pindex) for inp in inputs]
    pops = [inp.selection.info.get("n_population") for inp in inputs]
    n_population = int(min(pops)) if all(isinstance(x, int) for x in pops) else None
    return _Population(draws=draws, n_population=n_population)


def _sets_at(draws: list[tuple[np.ndarray, np.ndarray]], kk: int, mode: str) -> list[np.ndarray]:
    """Each input's top-`kk` set (sorted key codes), cut from its ranked draw."""
    return [np.sort(codes[_prefix(pidx, kk, mode)]) for codes, pidx in draws]


def _random_baseline(p: Plan, pop: _Population, notes: list[str]) -> float:
    """random_jaccard at K (NaN when the population is unknown)."""
    if p.mode == "global":
        return random_jaccard(p.k, pop.n_population) if pop.n_population else math.nan
    if pop.sizes is None:
        notes.append("random_jaccard needs the tensor sizes in per_layer mode: pass scores")
        return math.nan
    return random_jaccard_per_layer(p.k, pop.sizes)


def _add_spearman(
    p: Plan,
    sets_k: list[np.ndarray],
    pindex: dict[str, int],
    all_params: list[str],
    doc: dict[str, Any],
    arrays: dict[str, Any],
) -> None:
    rho, n_pair = _spearman_matrix(p, sets_k, pindex, all_params)
    doc["spearman"] = rho.tolist()
    doc["mean_spearman"] = off_diagonal_mean(rho)
    doc["random_spearman"] = RANDOM_SPEARMAN
    doc["spearman_n"] = n_pair.tolist()
    arrays["spearman"] = rho
    arrays["spearman_n"] = n_pair


def _add_jaccard_vs_k(
    p: Plan, pop: _Population, doc: dict[str, Any], arrays: dict[str, Any]
) -> None:
    grid = pop.grid
    mats = np.stack([jaccard_matrix(_sets_at(pop.draws, kk, p.mode)) for kk in grid])
    means = [off_diagonal_mean(mt) for mt in mats]
    doc["jaccard_vs_k"] = {str(kk): v for kk, v in zip(grid, means, strict=True)}
    if p.mode == "global":
        rand = [random_jaccard(kk, pop.n_population) for kk in grid]
    else:
        rand = [random_jaccard_per_layer(kk, pop.sizes) for kk in grid]
    doc["random_jaccard_vs_k"] = {str(kk): v for kk, v in zip(grid, rand, strict=True)}
    arrays["jaccard_vs_k/k"] = np.asarray(grid, dtype=np.int64)
    arrays["jaccard_vs_k/mean"] = np.asarray(means)
    arrays["jaccard_vs_k/random"] = np.asarray(rand)
    arrays["jaccard_vs_k/matrices"] = mats


def _describe(p: Plan, n_population: int | None, notes: list[str]) -> dict[str, Any]:
    """The result's provenance: inputs, options, definitions and notes."""
    inputs = p.inputs
    metrics = sorted({i.metric for i in inputs})
    return {
        "kind": p.kind,
        "input": p.input_kind,
        "metric": metrics[0] if len(metrics) == 1 else None,
        "metrics": [i.metric for i in inputs],
        "seeds": [i.seed for i in inputs],
        "mode": p.mode,
        "rank_by": p.rank_by,
        "n_population": n_population,
        "model_fingerprint": p.model_fingerprint or None,
        "inputs": [
            {
                "path": str(i.path),
                "label": i.label,
                "metric": i.metric,
                "seed": i.seed,
                "fingerprint": i.fingerprint,
            }
            for i in inputs
        ],
        "definitions": {
            "jaccard": "|A∩B|/|A∪B| of the top-K sets, keys (parameter, flat index)",
            "random_jaccard": "K/(2n−K): expected intersection over expected union of two "
            "independent uniform K-subsets of the n scored entries (per-tensor sum in "
            "per_layer mode)",
            "spearman": "rank correlation of the ranking keys over the union of the pair's "
            "top-K sets, average ranks for ties; independent rankings give about -0.75 "
            "(random_spearman), identical ones +1",
            "jaccard_vs_k": "mean off-diagonal Jaccard of the top-K' sets, K' on a log grid "
            "K/10..10K clipped to the population",
            "per_tensor_overlap": "counts per label; count_overlap = mean pairwise "
            "min/max of the counts; jaccard = mean pairwise Jaccard inside the tensor; "
            "shared = entries in every top-K",
        },
        "notes": notes,
    }


def _numel(shape) -> int:
    return int(math.prod(shape))


def _codes(params: list[str], draw, pindex: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Key codes (rank order) and the draw's own param indices."""
    remap = np.array([pindex[n] for n in params], dtype=np.int64)
    pidx = np.asarray(draw.param_index, dtype=np.int64)
    codes = (remap[pidx] << _SHIFT) | np.asarray(draw.flat_index, dtype=np.int64)
    return codes, pidx


def _spearman_matrix(p: Plan, sets_k, pindex, all_params):
    """Pairwise Spearman over pairwise unions; values read tensor by tensor in chunks."""
    union = np.unique(np.concatenate(sets_k))
    u_param = union >> _SHIFT
    u_flat = union & ((1 << _SHIFT) - 1)
    vals = []
    for inp in p.inputs:
        v = np.full(union.size, np.nan)
        # codes are sorted: each tensor's entries form one run, in flat-index order
        params, first = np.unique(u_param, return_index=True)
        ends = np.r_[first[1:], union.size]
        for gp, a, b in zip(params, first, ends, strict=True):
            name = all_params[int(gp)]
            if name not in inp.scores.shapes:
                continue
            flat = u_flat[a:b]
            for start, chunk in inp.scores.chunks(name):
                c = chunk.numpy()
                lo, hi = np.searchsorted(flat, [start, start + c.size])
                if hi > lo:
                    v[a + lo : a + hi] = c[flat[lo:hi] - start]
        vals.append(np.abs(v) if p.rank_by == "abs" else v)
    m = len(p.inputs)
    rho = np.eye(m)
    n_pair = np.zeros((m, m), dtype=np.int64)
    for i in range(m):
        n_pair[i, i] = sets_k[i].size
        for j in range(i + 1, m):
            in_pair = np.isin(union, sets_k[i], assume_unique=True) | np.isin(
                union, sets_k[j], assume_unique=True
            )
            a, b = vals[i][in_pair], vals[j][in_pair]
            ok = ~(np.isnan(a) | np.isnan(b))  # both scored this tensor
            rho[i, j] = rho[j, i] = spearman(a[ok], b[ok])
            n_pair[i, j] = n_pair[j, i] = int(ok.sum())
    return rho, n_pair


def _per_tensor(sets_k: list[np.ndarray], all_params: list[str]):
    """Per-tensor counts and overlaps (see the module docstring) from sorted key codes."""
    m = len(sets_k)
    n_params = len(all_params)
    counts = np.zeros((n_params, m), dtype=np.int64)
    bounds = []
    for i, s in enumerate(sets_k):
        pp = s >> _SHIFT
        counts[:, i] = np.bincount(pp, minlength=n_params)[:n_params]
        # codes are sorted, so the entries of tensor t are one contiguous run
        bounds.append(np.searchsorted(pp, np.arange(n_params + 1)))
    out: dict[str, Any] = {}
    for t, name in enumerate(all_params):
        parts = [sets_k[i][bounds[i][t] : bounds[i][t + 1]] for i in range(m)]
        c = counts[t]
        ratios, jacs = [], []
        for i in range(m):
            for j in range(i + 1, m):
                hi = max(c[i], c[j])
                if hi > 0:
                    ratios.append(min(c[i], c[j]) / hi)
                    jacs.append(jaccard(parts[i], parts[j]))
        shared = parts[0]
        for q in parts[1:]:
            shared = np.intersect1d(shared, q, assume_unique=True)
        out[name] = {
            "counts": [int(x) for x in c],
            "count_overlap": float(np.mean(ratios)) if ratios else None,
            "jaccard": float(np.mean(jacs)) if jacs else None,
            "shared": int(shared.size),
        }
    return out, counts
