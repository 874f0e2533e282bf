"""Streaming, exact top-K / bottom-K over per-parameter score tensors, and score statistics.

Ranking
-------
The ranking key of a score s is ``|s|`` (``rank_by="abs"``, the default) or ``s``
(``rank_by="value"``). The top-K is defined as the first K entries of a *stable*
descending sort of the concatenation of all score tensors (flattened, in
``cwa.param_order``): equal keys are ordered by (position in the parameter order, flat
index), ascending. ``+inf`` is the largest key; NaN is a run-time error naming the tensor
(a NaN has no place in an order). Bottom-K is the same with the key negated, so its ties
are also broken by position ascending and ``+inf`` (abs) comes last.

Scores may hold a billion entries, so nothing concatenates them. Each tensor is read in
chunks of at most ``chunk_elems`` entries; a candidate buffer, always kept in position
order, receives the entries of each chunk that can still reach the top-K and is compacted
back to K entries once it exceeds 2K (a quickselect for the K-th key, then every entry
above it plus the earliest entries equal to it). Once a compaction has happened, a chunk
entry whose key is not strictly above the buffer's K-th key can never enter: K earlier
entries already beat or tie it, and ties go to the earlier position. Peak memory is one
chunk plus O(K), and the result is exactly the stable-sort definition above, because the
global top-K is contained in the union of per-chunk top-Ks.

``ties_at_k`` is the number of entries in the whole population whose key equals the K-th
key, the K-th itself included (1 means the cut is unambiguous). Entries rejected along the
way are counted when they equal the running threshold; because the threshold never
decreases and every rejected key is at most the final K-th key, the count for the largest
rejected value is exact when that value turns out to be the K-th key. In ``per_layer``
mode it is the sum over tensors of each tensor's own count; a tensor taken whole (K or
fewer entries) has no cut and contributes 0.

Statistics
----------
``sensitivity_stats`` streams the same chunks twice: once for moments and extremes (float64
accumulators, Chan's parallel variance), once for a histogram of ``|s|`` on log-spaced bins
shared by all tensors. Quantiles of ``|s|`` are read from that histogram and are therefore
approximate: each lies in the same bin as the exact inverted-CDF quantile, i.e. within one
bin width (a factor ``(max/min_pos)**(1/n_bins)``) of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cwa.errors import CwaError, UsageError

DEFAULT_CHUNK_ELEMS = 2**24
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
RANK_BY = ("abs", "value")
MODES = ("global", "per_layer")


# --------------------------------------------------------------------------- data types


@dataclass(eq=False)
class Draw:
    """One set of selected weights: parallel arrays, one row per weight."""

    param_index: np.ndarray  # int32 [n], index into Selection.params
    flat_index: np.ndarray  # int64 [n], flat index inside that tensor
    score: np.ndarray  # float32 [n], raw score (signed where the metric is)

    def __post_init__(self) -> None:
        self.param_index = np.asarray(self.param_index, dtype=np.int32)
        self.flat_index = np.asarray(self.flat_index, dtype=np.int64)
        self.score = np.asarray(self.score, dtype=np.float32)
        if not (len(self.param_index) == len(self.flat_index) == len(self.score)):
            raise ValueError("Draw arrays must have the same length")

    def __len__(self) -> int:
        return len(self.param_index)

    def counts(self, n_params: int) -> np.ndarray:
        """Number of selected entries in each tensor (int64 [n_params])."""
        return np.bincount(self.param_index, minlength=n_params).astype(np.int64)


@dataclass(eq=False)
class Selection:
    """A top-K selection or a control: the selected weights of one or more draws.

    ``info`` holds JSON-able extras. Every selection made here records
    ``n_population`` (number of scored entries) and ``per_tensor_counts`` (one list per
    draw, aligned with ``params``).
    """

    kind: str  # "topk" | "bottom_k" | "random_k" | "layer_matched" | "magnitude_matched"
    k: int  # K (per tensor in per_layer mode)
    mode: str  # "global" | "per_layer"
    metric: str
    rank_by: str  # "abs" | "value"
    seed: int
    ties_at_k: int  # entries tied with the K-th (per_layer: sum over tensors)
    params: list[str]  # scored names in the scores' param order
    draws: list[Draw]  # top-K/bottom-K: one draw, in rank order
    info: dict = field(default_factory=dict)

    @property
    def n_draws(self) -> int:
        return len(self.draws)

    def per_tensor_counts(self, draw: int = 0) -> np.ndarray:
        return self.draws[draw].counts(len(self.params))


class DictScores:
    """An in-memory scores source (tests, notebooks): name -> score tensor, in dict order."""

    def __init__(self, tensors: dict[str, torch.Tensor], metric: str = "x") -> None:
        self._tensors = {n: torch.as_tensor(t) for n, t in tensors.items()}
        self.names = list(self._tensors)
        self.metric = metric

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].float()


# --------------------------------------------------------------------------- helpers


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def population_sizes(scores) -> np.ndarray:
    """Entries per scored tensor (int64 [n_params]) from shapes alone (no data read)."""
    return np.array([_numel(scores.shape(n)) for n in scores.names], dtype=np.int64)


def iter_chunks(tensor: torch.Tensor, chunk_elems: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, flat slice) pieces of at most ``chunk_elems`` entries; views, no copies."""
    flat = tensor.reshape(-1)
    n = flat.numel()
    step = max(1, int(chunk_elems))
    for start in range(0, n, step):
        yield start, flat[start : start + step]


def source_chunks(scores, name: str, chunk_elems: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, flat piece) of one score tensor: through the source's own ``chunks()``
    when it has one (a scores file reads piece by piece, so a tensor larger than memory
    still streams), else by slicing ``get()``."""
    chunks = getattr(scores, "chunks", None)
    if chunks is not None:
        yield from chunks(name, chunk_elems)
    else:
        yield from iter_chunks(scores.get(name), chunk_elems)


def _check_args(k: int, mode: str, rank_by: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UsageError(f"K must be a positive integer, got {k!r}.")
    if mode not in MODES:
        raise UsageError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    if rank_by not in RANK_BY:
        raise UsageError(f"Unknown rank_by {rank_by!r}; use one of {', '.join(RANK_BY)}.")


def _key(raw: torch.Tensor, rank_by: str, lowest: bool) -> torch.Tensor:
    key = raw.abs() if rank_by == "abs" else raw
    return -key if lowest else key


class _TopKStream:
    """Exact streaming top-k of (key, position) pairs fed in ascending position order.

    The buffer is a list of (positions int64, keys, raw scores) pieces, all in position
    order. ``thr`` is the K-th key of the buffer after the latest compaction (None before
    the first), ``tied_val``/``tied_out`` count rejected entries equal to the largest
    threshold at which anything was rejected (see the module docstring).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.pos: list[torch.Tensor] = []
        self.key: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []
        self.size = 0
        self.thr: float | None = None
        self.tied_val = -math.inf
        self.tied_out = 0

    def _rejected(self, value: float, count: int) -> None:
        if count <= 0:
            return
        if value > self.tied_val:
            self.tied_val, self.tied_out = value, count
        elif value == self.tied_val:
            self.tied_out += count

    def _select(self, key: torch.Tensor) -> torch.Tensor:
        """Indices (ascending) of the k best of ``key`` under (key desc, index asc)."""
        n = key.numel()
        kth = torch.kthvalue(key, n - self.k + 1).values
        thr = float(kth)
        gt = key > kth
        n_gt = int(gt.sum())
        eq_idx = torch.nonzero(key == kth).flatten()
        need = self.k - n_gt
        self._rejected(thr, eq_idx.numel() - need)
        keep = gt
        keep[eq_idx[:need]] = True
        return torch.nonzero(keep).flatten()

    def feed(self, start: int, key: torch.Tensor, raw: torch.Tensor) -> None:
        """Offer one chunk; ``start`` is the position of its first entry."""
        if self.thr is not None:
            thr_t = torch.tensor(self.thr, dtype=key.dtype)
            self._rejected(self.thr, int((key == thr_t).sum()))
            idx = torch.nonzero(key > thr_t).flatten()
            if idx.numel() == 0:
                return
            key, raw = key[idx], raw[idx]
        else:
            idx = None
        if key.numel() > self.k:
            sel = self._select(key)
            key, raw = key[sel], raw[sel]
            idx = sel if idx is None else idx[sel]
        if idx is None:
            idx = torch.arange(key.numel(), dtype=torch.int64)
        # copies, so that no view of a (possibly memory-mapped) chunk outlives the chunk
        self.pos.append(idx.to(torch.int64) + start)
        self.key.append(key.clone())
        self.raw.append(raw.clone())
        self.size += key.numel()
        if self.size > 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        pos, key, raw = torch.cat(self.pos), torch.cat(self.key), torch.cat(self.raw)
        sel = self._select(key)
        pos, key, raw = pos[sel], key[sel], raw[sel]
        self.pos, self.key, self.raw, self.size = [pos], [key], [raw], pos.numel()
        self.thr = float(key.min())

    def finish(self) -> tuple[np.ndarray, np.ndarray, int, float]:
        """(positions, raw scores) in rank order, ties_at_k, K-th key."""
        if self.size > self.k:
            self._compact()
        pos, key, raw = torch.cat(self.pos), torch.cat(self.key), torch.cat(self.raw)
        order = torch.sort(key, descending=True, stable=True).indices
        pos, key, raw = pos[order], key[order], raw[order]
        kth = float(key[-1])
        in_sel = int((key == key[-1]).sum())
        ties = in_sel + (self.tied_out if self.tied_val == kth else 0)
        return pos.numpy(), raw.numpy(), ties, kth


def _scan_tensor(scores, name: str, chunk_elems: int):
    """Yield (start, float32 flat chunk) of one score tensor, raising on NaN."""
    for start, chunk in source_chunks(scores, name, chunk_elems):
        chunk = chunk.float()
        if bool(torch.isnan(chunk).any()):
            n_nan = int(torch.isnan(chunk).sum())
            raise CwaError(
                f"Scores of {name!r} contain NaN (at least {n_nan} entries); NaN cannot be "
                "ranked. Re-score, or check the model and data for non-finite values."
            )
        yield start, chunk


def _rank(scores, k, mode, rank_by, chunk_elems, lowest, kind, seed) -> Selection:
    _check_args(k, mode, rank_by)
    k = int(k)
    names = list(scores.names)
    sizes = population_sizes(scores)
    n_total = int(sizes.sum())
    if mode == "global" and k > n_total:
        raise UsageError(
            f"K = {k} is larger than the scored population ({n_total} entries); "
            f"choose K <= {n_total}."
        )
    if n_total == 0:
        raise UsageError("The scored population is empty.")

    info: dict = {"n_population": n_total}
    if mode == "global":
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        stream = _TopKStream(k)
        for p, name in enumerate(names):
            for start, chunk in _scan_tensor(scores, name, chunk_elems):
                stream.feed(int(offsets[p]) + start, _key(chunk, rank_by, lowest), chunk)
        pos, raw, ties, kth = stream.finish()
        param_index = np.searchsorted(offsets, pos, side="right") - 1
        flat_index = pos - offsets[param_index]
        info["kth_key"] = -kth if lowest else kth
    else:
        parts_p, parts_f, parts_s = [], [], []
        ties = 0
        kth_keys = []
        for p, name in enumerate(names):
            n = int(sizes[p])
            if n == 0:
                kth_keys.append(None)
                continue
            kt = min(k, n)
            stream = _TopKStream(kt)
            for start, chunk in _scan_tensor(scores, name, chunk_elems):
                stream.feed(start, _key(chunk, rank_by, lowest), chunk)
            pos, raw, t_ties, kth = stream.finish()
            if n > k:
                ties += t_ties
            kth_keys.append(-kth if lowest else kth)
            parts_p.append(np.full(len(pos), p, dtype=np.int32))
            parts_f.append(pos)
            parts_s.append(raw)
        param_index = np.concatenate(parts_p) if parts_p else np.zeros(0, np.int32)
        flat_index = np.concatenate(parts_f) if parts_f else np.zeros(0, np.int64)
        raw = np.concatenate(parts_s) if parts_s else np.zeros(0, np.float32)
        info["kth_key_per_tensor"] = kth_keys
    draw = Draw(param_index, flat_index, raw)
    info["per_tensor_counts"] = [draw.counts(len(names)).tolist()]
    return Selection(
        kind=kind,
        k=k,
        mode=mode,
        metric=str(getattr(scores, "metric", "")),
        rank_by=rank_by,
        seed=int(seed),
        ties_at_k=int(ties),
        params=names,
        draws=[draw],
        info=info,
    )


def topk(
    scores,
    k: int,
    mode: str = "global",
    rank_by: str = "abs",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
) -> Selection:
    """The K highest-ranked entries (per tensor in ``per_layer`` mode), exact, streamed.

    The draw is in rank order; in ``per_layer`` mode tensors follow the parameter order
    and entries are in rank order within each tensor. ``seed`` is only recorded (ranking
    is deterministic); pass the seed of the scores. See the module docstring for the
    order, ties and ``ties_at_k``.
    """
    return _rank(scores, k, mode, rank_by, chunk_elems, False, "topk", seed)


def bottomk(
    scores,
    k: int,
    mode: str = "global",
    rank_by: str = "abs",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
) -> Selection:
    """The K lowest-ranked entries (kind ``bottom_k``): lowest key first, ties by position."""
    return _rank(scores, k, mode, rank_by, chunk_elems, True, "bottom_k", seed)


# --------------------------------------------------------------------------- statistics


class _Moments:
    """Count, mean and M2 of finite values, float64 accumulators merged chunk by chunk.

    Within a chunk (float32), deviations are taken from a shift c (the chunk mean rounded
    to float32): M2 = Σ(x − c)² − (Σ(x − c))²/n is exact algebra for any c, and with c
    near the mean it has no cancellation. Chunks are merged with Chan et al.'s formula.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.abs_sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_chunk(self, x: torch.Tensor, a: torch.Tensor) -> None:
        """x: finite float32 values, a: their absolute values."""
        nb = x.numel()
        if nb == 0:
            return
        c = torch.tensor(float(x.sum(dtype=torch.float64)) / nb, dtype=x.dtype)
        d = x - c
        s1 = float(d.sum(dtype=torch.float64))
        s2 = float(d.square_().sum(dtype=torch.float64))
        self.abs_sum += float(a.sum(dtype=torch.float64))
        lo, hi = torch.aminmax(x)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self._merge(nb, float(c) + s1 / nb, max(s2 - s1 * s1 / nb, 0.0))

    def merge(self, other: _Moments) -> None:
        if other.n == 0:
            return
        self.abs_sum += other.abs_sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self._merge(other.n, other.mean, other.m2)

    def _merge(self, nb: int, mb: float, m2b: float) -> None:
        na = self.n
        n = na + nb
        delta = mb - self.mean
        self.mean += delta * nb / n
        self.m2 += m2b + delta * delta * na * nb / n
        self.n = n


def _abs_quantiles(
    hist: np.ndarray, n_zero: int, edges: np.ndarray | None, lo: float, hi: float
) -> dict[str, float | None]:
    """Inverted-CDF quantiles of |s| from a histogram, geometric interpolation in the bin."""
    n = int(hist.sum()) + n_zero
    out: dict[str, float | None] = {}
    cum = np.cumsum(hist)
    for q in QUANTILES:
        if n == 0:
            out[str(q)] = None
            continue
        m = max(1, math.ceil(q * n - 1e-9))  # 1-based rank of the inverted-CDF quantile
        if m <= n_zero:
            out[str(q)] = 0.0
            continue
        r = m - n_zero
        b = int(np.searchsorted(cum, r, side="left"))
        before = int(cum[b - 1]) if b > 0 else 0
        frac = (r - before - 0.5) / int(hist[b])
        est = float(edges[b]) * (float(edges[b + 1]) / float(edges[b])) ** frac
        out[str(q)] = min(max(est, lo), hi)
    return out


def log_edges_f32(lo: float, hi: float, n_bins: int) -> np.ndarray:
    """``n_bins + 1`` log-spaced edges from lo to hi, each exactly a float32 value.

    Returned as float64 but float32-representable and strictly increasing, so binning
    float32 data against them (``torch.bucketize`` in float32) is exact with respect to
    the edges reported: no value lands on the wrong side of an edge by rounding.
    """
    if not hi > lo:
        hi = lo * 2.0 if lo > 0 else 1.0
    e = np.geomspace(lo, hi, n_bins + 1).astype(np.float32)
    for i in range(1, len(e)):  # only a range of a few ulps can collide after rounding
        if e[i] <= e[i - 1]:
            e[i] = np.nextafter(e[i - 1], np.float32(np.inf))
    return e.astype(np.float64)


def bin_abs(a: torch.Tensor, edges32: torch.Tensor) -> torch.Tensor:
    """Bin of each |s| (float32): 0 below edges[0] (zeros), i for [e_{i-1}, e_i), n for
    values >= e_n (the maximum, inf, NaN). int32, as ``torch.bucketize(right=True)``."""
    return torch.bucketize(a, edges32, right=True, out_int32=True)


def sensitivity_stats(
    scores,
    selection: Selection | None = None,
    n_bins: int = 64,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[dict, dict]:
    """Per-tensor and overall summaries of the scores, streamed in chunks.

    Returns ``(stats, hist)``. ``stats`` is JSON-able (non-finite floats may remain; the
    writer spells them as strings): for ``overall`` and each tensor in ``per_tensor``:
    ``count`` (all entries), ``mean``, ``std`` (population, ddof=0), ``min``, ``max``,
    ``abs_mean`` (all over the finite entries only; None when there are none), ``n_zero``,
    ``n_nonfinite``, ``abs_quantiles`` (approximate, see the module docstring); per tensor
    also ``shape`` and, given a selection, ``topk_count`` (entries of its draw 0 in the
    tensor) and ``topk_share`` (that count over the selection's size, which is K in global
    mode; the shares sum to 1).

    ``hist`` holds numpy arrays for plots: ``edges`` (float64 [n_bins+1], log-spaced from
    the smallest positive finite |s| to the largest finite |s|, float32-representable,
    shared by all tensors; None when no entry is positive), ``counts`` (int64
    [n_params, n_bins]) of finite positive |s| per bin (the last bin includes its upper
    edge), ``zeros`` and ``nonfinite`` (int64 [n_params]) and ``params``.
    """
    if n_bins <= 0:
        raise UsageError(f"n_bins must be positive, got {n_bins}.")
    names = list(scores.names)

    def finite_chunks(name: str):
        for _, chunk in source_chunks(scores, name, chunk_elems):
            x = chunk.float()
            if not bool(torch.isfinite(x).all()):
                finite = torch.isfinite(x)
                yield x[finite], int(x.numel() - finite.sum())
            else:
                yield x, 0

    moments = []
    n_zero = np.zeros(len(names), dtype=np.int64)
    n_nonfinite = np.zeros(len(names), dtype=np.int64)
    abs_lo, abs_hi = math.inf, 0.0
    for p, name in enumerate(names):
        mom = _Moments()
        for x, n_bad in finite_chunks(name):
            n_nonfinite[p] += n_bad
            a = x.abs()
            n_zero[p] += int((a == 0).sum())
            mom.add_chunk(x, a)
            if a.numel():
                abs_hi = max(abs_hi, float(a.max()))
                abs_lo = min(abs_lo, float(torch.where(a > 0, a, math.inf).min()))
        moments.append(mom)

    edges = log_edges_f32(abs_lo, abs_hi, n_bins) if abs_hi > 0 else None
    counts = np.zeros((len(names), n_bins), dtype=np.int64)
    if edges is not None:
        edges_t = torch.from_numpy(edges.astype(np.float32))
        for p, name in enumerate(names):
            for x, _ in finite_chunks(name):
                full = torch.bincount(bin_abs(x.abs(), edges_t), minlength=n_bins + 2).numpy()
                counts[p] += full[1 : n_bins + 1]
                counts[p, -1] += full[n_bins + 1]  # the maximum itself

    sel_counts = None
    sel_total = 0
    if selection is not None:
        if list(selection.params) != names:
            raise UsageError("The selection was made from scores with other parameters.")
        sel_counts = selection.per_tensor_counts(0)
        sel_total = int(sel_counts.sum())

    def block(mom: _Moments, count: int, nz: int, nnf: int, hist: np.ndarray) -> dict:
        return {
            "count": int(count),
            "mean": mom.mean if mom.n else None,
            "std": math.sqrt(mom.m2 / mom.n) if mom.n else None,
            "min": mom.min if mom.n else None,
            "max": mom.max if mom.n else None,
            "abs_mean": mom.abs_sum / mom.n if mom.n else None,
            "n_zero": int(nz),
            "n_nonfinite": int(nnf),
            "abs_quantiles": _abs_quantiles(hist, int(nz), edges, abs_lo, abs_hi),
        }

    per: dict[str, dict] = {}
    total = _Moments()
    sizes = population_sizes(scores)
    for p, name in enumerate(names):
        total.merge(moments[p])
        d = block(moments[p], sizes[p], n_zero[p], n_nonfinite[p], counts[p])
        d["shape"] = list(scores.shape(name))
        if sel_counts is not None:
            d["topk_count"] = int(sel_counts[p])
            d["topk_share"] = float(sel_counts[p]) / sel_total if sel_total else 0.0
        per[name] = d
    stats = {
        "metric": str(getattr(scores, "metric", "")),
        "n_params": len(names),
        "quantiles_note": (
            "abs_quantiles are inverted-CDF quantiles of |score| over finite entries, read "
            f"from a {n_bins}-bin log-spaced histogram: accurate to one bin width"
        ),
        "overall": block(
            total, int(sizes.sum()), n_zero.sum(), n_nonfinite.sum(), counts.sum(axis=0)
        ),
        "per_tensor": per,
    }
    if selection is not None:
        stats["selection"] = {"kind": selection.kind, "k": selection.k, "mode": selection.mode}
    hist = {
        "params": names,
        "edges": edges,
        "counts": counts,
        "zeros": n_zero,
        "nonfinite": n_nonfinite,
    }
    return stats, hist
