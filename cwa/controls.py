"""Control selections: what a top-K effect must be compared against.

A top-K selection means something only next to selections of the same size that were
*not* chosen by the score. Each control has the top-K's size (per tensor in per_layer
mode):

- ``random_k``: uniform over the whole scored population, without replacement. It may
  overlap the top-K; the overlap of each draw is recorded (``info["overlap_with_topk"]``).
  In per_layer mode it is uniform within each tensor, with the top-K's count there.
- ``bottom_k``: the K lowest by the ranking key (ties by position, as for top-K);
  deterministic, one draw.
- ``layer_matched``: random, the top-K's count in every tensor, excluding the top-K. It
  separates "these weights" from "these layers".
- ``magnitude_matched``: random, excluding the top-K, with the top-K's |w| distribution:
  the population's |w| falls into 100 log-spaced bins from the smallest positive |w| to
  the largest, plus bin 0 for exact zeros (a zero weight is untouched by zeroing, so it
  must be matched by a zero). Each top-K weight draws a partner from its own bin without
  replacement; when a bin runs out, the remaining partners come from the nearest bin that
  still has entries (lower bin first on equal distance), and their number is recorded
  (``info["n_fallback"]``). In per_layer mode partners are drawn within the same tensor.
  It separates "these weights" from "weights this large".

Sampling is exact-uniform and memory-bounded. K distinct indices out of m are drawn as
iid uniform integers (62-bit words with rejection, so there is no modulo bias) with
duplicates discarded and topped up until K remain, or, when K > m/2, by drawing the
m − K left out. The result is uniform over K-subsets because the procedure is symmetric
under any permutation of the population. Excluded entries (the top-K) are skipped by an
order-preserving map from [0, m − |E|) onto the non-excluded positions, so exclusion
costs O(K), never O(population). Magnitude bins are enumerated by streaming the weights in
chunks: nothing of the population's size is ever held.

Randomness: draw d of a control over the whole population reads the counter-based stream
``rng.stream(seed, "control", d)``; a control drawn tensor by tensor (random_k and
magnitude_matched in per_layer mode, layer_matched always) reads
``rng.stream(seed, "control", d, param_index)``; each reads the stream's words in order
(the top 62 bits of each). Draw d therefore depends only on (seed, d) and the reference,
never on the number of draws or chunk sizes.

The entries of a random draw are listed in ascending (param_index, flat_index) order;
their ``score`` is read from the scores at those positions. Random controls have
``ties_at_k = 0`` (they have no K-th entry).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cwa import rng
from cwa.checks import check_draws, check_seed
from cwa.errors import UsageError
from cwa.ranking import (
    DEFAULT_CHUNK_ELEMS,
    Draw,
    Selection,
    bin_abs,
    bottomk,
    iter_chunks,
    log_edges_f32,
    population_sizes,
    source_chunks,
)
from cwa.registry import Registry


@dataclass(frozen=True)
class Control:
    """A control's facts, read by the stages and the CLI (no stage branches on a name).

    ``fn(scores, ref, draws=, seed=, weights=, chunk_elems=)`` returns the Selection.
    ``stochastic``: its draws come from the seed (False: one deterministic draw whatever
    ``draws`` says, and neither seed nor draws are part of its fingerprint).
    ``needs_weights``: it reads the model's weights (``weights=``), so it needs ``--model``
    and the model fingerprint is part of its fingerprint.
    """

    name: str
    fn: Callable[..., Selection]
    stochastic: bool = True
    needs_weights: bool = False
    summary: str = ""


CONTROLS: Registry[Control] = Registry("control")
N_MAG_BINS = 100
_WORD_BITS = 62  # the top 62 bits of a word: exactly uniform on [0, 2^62)
_WORD = 1 << _WORD_BITS


# --------------------------------------------------------------------------- sampling


def _uniform_ints(gen: rng.Stream, m: int, n: int) -> np.ndarray:
    """n iid integers uniform on [0, m), exactly (rejection of the top partial block)."""
    limit = (_WORD // m) * m
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        need = n - len(out)
        w = gen.bits(need, nbits=_WORD_BITS).numpy()
        w = w[w < limit]
        out = np.concatenate([out, w % m])
    return out


def sample_distinct(gen: rng.Stream, m: int, k: int) -> np.ndarray:
    """k distinct integers uniform over the k-subsets of [0, m), sorted ascending."""
    if k < 0 or k > m:
        raise ValueError(f"cannot draw {k} distinct values from {m}")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if 2 * k > m:  # dense: choose what to leave out (m - k < m/2), O(m) = O(k)
        mask = np.ones(m, dtype=bool)
        mask[sample_distinct(gen, m, m - k)] = False
        return np.flatnonzero(mask).astype(np.int64)
    have = np.zeros(0, dtype=np.int64)
    while len(have) < k:
        have = np.union1d(have, _uniform_ints(gen, m, k - len(have)))
    return have


def sample_excluding(gen: rng.Stream, m: int, k: int, excluded: np.ndarray) -> np.ndarray:
    """k distinct positions uniform over [0, m) minus ``excluded`` (sorted unique), sorted."""
    excluded = np.asarray(excluded, dtype=np.int64)
    j = sample_distinct(gen, m - len(excluded), k)
    # the j-th non-excluded position is j + #{e in excluded : e - rank(e) <= j}
    adj = excluded - np.arange(len(excluded), dtype=np.int64)
    return j + np.searchsorted(adj, j, side="right")


# --------------------------------------------------------------------------- helpers


def _segments(sorted_pi: np.ndarray) -> list[tuple[int, int, int]]:
    """(param, start, stop) runs of an array sorted by parameter index: O(n), not O(n·P)."""
    if len(sorted_pi) == 0:
        return []
    cut = np.flatnonzero(np.diff(sorted_pi)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(sorted_pi)]])
    return [(int(sorted_pi[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True)]


def _ref_by_param(ref: Selection) -> dict[int, np.ndarray]:
    """Sorted flat indices of the reference's draw 0, per parameter index."""
    d = ref.draws[0]
    order = np.lexsort((d.flat_index, d.param_index))
    pi, fi = d.param_index[order], d.flat_index[order]
    return {p: fi[a:b] for p, a, b in _segments(pi)}


def _global_positions(draw: Draw, offsets: np.ndarray) -> np.ndarray:
    return offsets[draw.param_index.astype(np.int64)] + draw.flat_index


def _gather_scores(scores, names: list[str], parts: list[tuple[np.ndarray, np.ndarray]]):
    """Raw scores at (param_index, flat_index) for several draws sorted by (param, flat),
    with one read of each tensor."""
    out = [np.zeros(len(pi), dtype=np.float32) for pi, _ in parts]
    by_param: dict[int, list[tuple[int, int, int]]] = {}
    for d, (pi, _) in enumerate(parts):
        for p, a, b in _segments(pi):
            by_param.setdefault(p, []).append((d, a, b))
    for p in sorted(by_param):
        # chunk by chunk: a tensor larger than memory is never read whole
        for start, chunk in source_chunks(scores, names[p], DEFAULT_CHUNK_ELEMS):
            stop = start + chunk.numel()
            for d, a, b in by_param[p]:
                fi = parts[d][1][a:b]  # sorted flat indices of this tensor
                lo, hi = np.searchsorted(fi, [start, stop])
                if hi > lo:
                    idx = torch.from_numpy(np.ascontiguousarray(fi[lo:hi] - start))
                    out[d][a + lo : a + hi] = chunk[idx].float().numpy()
    return out


def _finish(kind, scores, ref, seed, parts, extra_info) -> Selection:
    """Build a control Selection from per-draw (param_index, flat_index) arrays."""
    names = list(scores.names)
    sizes = population_sizes(scores)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    sorted_parts = []
    for pi, fi in parts:
        pi = np.asarray(pi, dtype=np.int32)
        fi = np.asarray(fi, dtype=np.int64)
        order = np.lexsort((fi, pi))
        sorted_parts.append((pi[order], fi[order]))
    score_arrays = _gather_scores(scores, names, sorted_parts)
    draws = [Draw(pi, fi, s) for (pi, fi), s in zip(sorted_parts, score_arrays, strict=True)]
    ref_pos = np.sort(_global_positions(ref.draws[0], offsets))
    info = {
        "n_population": int(sizes.sum()),
        "reference": {"kind": ref.kind, "k": ref.k, "mode": ref.mode, "size": len(ref.draws[0])},
        "overlap_with_topk": [
            int(np.isin(_global_positions(d, offsets), ref_pos, assume_unique=True).sum())
            for d in draws
        ],
        "per_tensor_counts": [d.counts(len(names)).tolist() for d in draws],
    }
    info.update(extra_info)
    return Selection(
        kind=kind,
        k=ref.k,
        mode=ref.mode,
        metric=ref.metric,
        rank_by=ref.rank_by,
        seed=int(seed),
        ties_at_k=0,
        params=names,
        draws=draws,
        info=info,
    )


# --------------------------------------------------------------------------- controls


def _random_k(scores, ref: Selection, draws: int, seed: int, **_) -> Selection:
    sizes = population_sizes(scores)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parts = []
    if ref.mode == "global":
        k, n = len(ref.draws[0]), int(sizes.sum())
        for d in range(draws):
            pos = sample_distinct(rng.stream(seed, "control", d), n, k)
            pi = np.searchsorted(offsets, pos, side="right") - 1
            parts.append((pi, pos - offsets[pi]))
    else:
        counts = ref.per_tensor_counts(0)
        for d in range(draws):
            pis, fis = [], []
            for p, c in enumerate(counts):
                if c:
                    g = rng.stream(seed, "control", d, p)
                    fis.append(sample_distinct(g, int(sizes[p]), int(c)))
                    pis.append(np.full(int(c), p))
            parts.append((_cat(pis, np.int32), _cat(fis, np.int64)))
    return _finish("random_k", scores, ref, seed, parts, {})


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)


def _bottom_k(scores, ref: Selection, draws: int, seed: int, chunk_elems: int, **_):
    sel = bottomk(scores, ref.k, ref.mode, ref.rank_by, chunk_elems=chunk_elems, seed=seed)
    sizes = population_sizes(scores)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ref_pos = np.sort(_global_positions(ref.draws[0], offsets))
    sel.info["overlap_with_topk"] = [
        int(np.isin(_global_positions(sel.draws[0], offsets), ref_pos).sum())
    ]
    sel.info["reference"] = {
        "kind": ref.kind,
        "k": ref.k,
        "mode": ref.mode,
        "size": len(ref.draws[0]),
    }
    return sel


def _check_room(name: str, n: int, c: int, what: str) -> None:
    if n - c < c:
        raise UsageError(
            f"{what} needs {c} entries outside the top-K in {name!r}, which has only "
            f"{n - c}; use a smaller K or another control."
        )


def _layer_matched(scores, ref: Selection, draws: int, seed: int, **_) -> Selection:
    names = list(scores.names)
    sizes = population_sizes(scores)
    counts = ref.per_tensor_counts(0)
    excl = _ref_by_param(ref)
    for p, c in enumerate(counts):
        if c:
            _check_room(names[p], int(sizes[p]), int(c), "layer_matched")
    parts = []
    for d in range(draws):
        pis, fis = [], []
        for p, c in enumerate(counts):
            if c:
                g = rng.stream(seed, "control", d, p)
                fis.append(sample_excluding(g, int(sizes[p]), int(c), excl[p]))
                pis.append(np.full(int(c), p))
        parts.append((_cat(pis, np.int32), _cat(fis, np.int64)))
    return _finish("layer_matched", scores, ref, seed, parts, {})


def _mag_bins(absw: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin of each |w| (float32): 0 for exact zeros (below the smallest positive |w|),
    1..100 log-spaced (the maximum in bin 100), non-finite also in the top bin."""
    return bin_abs(absw, edges).clamp_(max=N_MAG_BINS)


def _allocate(demand: np.ndarray, avail: np.ndarray) -> tuple[np.ndarray, int]:
    """Partners per bin: own bin first, the excess from the nearest bins with room."""
    take = np.minimum(demand, avail)
    room = avail - take
    excess = demand - take
    n_fallback = int(excess.sum())
    nb_bins = len(demand)
    for b in np.flatnonzero(excess):
        e = int(excess[b])
        for dist in range(1, nb_bins):
            for nb in (b - dist, b + dist):
                if e and 0 <= nb < nb_bins and room[nb] > 0:
                    t = min(e, int(room[nb]))
                    take[nb] += t
                    room[nb] -= t
                    e -= t
            if not e:
                break
        if e:  # cannot happen after the room check; kept as a guard
            raise UsageError("magnitude_matched: not enough entries outside the top-K.")
    return take, n_fallback


def _magnitude_matched(
    scores, ref: Selection, draws: int, seed: int, weights, chunk_elems: int, **_
) -> Selection:
    names = list(scores.names)
    _check_weights(names, population_sizes(scores), weights)
    edges_np = _mag_edges(weights, names, chunk_elems)
    edges = torch.from_numpy(edges_np.astype(np.float32))
    bins = _MagBins(weights, names, chunk_elems, edges, _ref_by_param(ref))
    groups = [list(range(len(names)))] if ref.mode == "global" else [[p] for p in range(len(names))]

    demand = _mag_demand(bins, groups)
    chunk_counts, avail = _mag_available(bins, groups)
    takes, n_fallback = _mag_takes(names, groups, demand, avail)
    ranks = _mag_ranks(groups, avail, takes, draws, seed, ref.mode)
    parts = _mag_positions(bins, chunk_counts, ranks, draws)
    extra = {
        "n_fallback": n_fallback,
        "achieved_match": _achieved_match(weights, names, bins.excl, parts),
        "magnitude_bins": {
            "n_bins": N_MAG_BINS,
            "zero_bin": True,
            "edges": edges_np.tolist(),
            "topk_counts": demand.sum(axis=0).tolist(),
        },
    }
    return _finish("magnitude_matched", scores, ref, seed, parts, extra)


_N_BINS = N_MAG_BINS + 1  # bin 0 (exact zeros) and the log-spaced bins 1..100
_EXCL_BIN = _N_BINS  # marker for top-K entries inside a chunk


def _check_weights(names: list[str], sizes: np.ndarray, weights) -> None:
    if weights is None:
        raise UsageError("magnitude_matched needs the model's weights (pass --model).")
    for p, name in enumerate(names):
        if name not in weights:
            raise UsageError(f"magnitude_matched: the model has no parameter {name!r}.")
        if weights[name].numel() != sizes[p]:
            raise UsageError(
                f"magnitude_matched: {name!r} has {weights[name].numel()} weights but "
                f"{int(sizes[p])} scores."
            )


def _abs_chunks(weights, name: str, chunk_elems: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, |w| as float32 on the CPU) for each chunk of one tensor."""
    w = weights[name].detach()
    for start, chunk in iter_chunks(w, chunk_elems):
        yield start, chunk.to(device="cpu", dtype=torch.float32).abs()


def _mag_edges(weights, names: list[str], chunk_elems: int) -> np.ndarray:
    """Pass A: the bin edges, from the range of the finite nonzero |w| of the population."""
    lo, hi = math.inf, 0.0
    for name in names:
        for _, a in _abs_chunks(weights, name, chunk_elems):
            a = torch.where(torch.isfinite(a), a, 0.0)
            if a.numel():
                hi = max(hi, float(a.max()))
                lo = min(lo, float(torch.where(a > 0, a, math.inf).min()))
    if hi <= 0:
        lo, hi = 1.0, 2.0  # every weight is zero: only bin 0 is used
    return log_edges_f32(lo, hi, N_MAG_BINS)


@dataclass
class _MagBins:
    """What the passes over the weights share: the bin edges and the top-K to leave out."""

    weights: Any
    names: list[str]
    chunk_elems: int
    edges: torch.Tensor
    excl: dict[int, np.ndarray]  # param index -> the top-K's sorted flat indices

    def chunk_bins(self, p: int, start: int, a: torch.Tensor) -> torch.Tensor:
        """Bins of one chunk's |w|, the top-K entries marked `_EXCL_BIN`."""
        b = _mag_bins(a, self.edges)
        fi = self.excl.get(p)
        if fi is not None:
            lo_i, hi_i = np.searchsorted(fi, [start, start + a.numel()])
            b[torch.from_numpy(fi[lo_i:hi_i] - start)] = _EXCL_BIN
        return b


def _mag_demand(bins: _MagBins, groups: list[list[int]]) -> np.ndarray:
    """The top-K's bins (demand), group by group."""
    demand = np.zeros((len(groups), _N_BINS), dtype=np.int64)
    group_of = {p: gi for gi, grp in enumerate(groups) for p in grp}
    for p, fi in bins.excl.items():
        w = bins.weights[bins.names[p]].detach().reshape(-1)
        a = w[torch.from_numpy(fi).to(w.device)].to(device="cpu", dtype=torch.float32).abs()
        demand[group_of[p]] += np.bincount(_mag_bins(a, bins.edges).numpy(), minlength=_N_BINS)
    return demand


def _mag_available(
    bins: _MagBins, groups: list[list[int]]
) -> tuple[list[list[tuple[int, int, np.ndarray]]], np.ndarray]:
    """Pass B: available (non-top-K) entries per bin, per chunk, in position order."""
    chunk_counts: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in groups]
    avail = np.zeros((len(groups), _N_BINS), dtype=np.int64)
    for gi, grp in enumerate(groups):
        for p in grp:
            for start, a in _abs_chunks(bins.weights, bins.names[p], bins.chunk_elems):
                cnt = np.bincount(bins.chunk_bins(p, start, a).numpy(), minlength=_N_BINS + 1)
                cnt = cnt[:_N_BINS].astype(np.int64)
                chunk_counts[gi].append((p, start, cnt))
                avail[gi] += cnt
    return chunk_counts, avail


def _mag_takes(
    names: list[str], groups: list[list[int]], demand: np.ndarray, avail: np.ndarray
) -> tuple[list[np.ndarray], int]:
    """Partners per group and bin (`_allocate`), and how many fell back to another bin."""
    takes, n_fallback = [], 0
    for gi, grp in enumerate(groups):
        k_g, a_g = int(demand[gi].sum()), int(avail[gi].sum())
        if k_g > a_g:
            where = names[grp[0]] if len(grp) == 1 else "the scored population"
            _check_room(where, a_g + k_g, k_g, "magnitude_matched")
        take, fb = _allocate(demand[gi], avail[gi])
        takes.append(take)
        n_fallback += fb
    return takes, n_fallback


def _mag_ranks(
    groups: list[list[int]],
    avail: np.ndarray,
    takes: list[np.ndarray],
    draws: int,
    seed: int,
    mode: str,
) -> list[list[list[np.ndarray]]]:
    """ranks[draw][group][bin]: the chosen ranks within each bin's available entries (in
    position order), one stream per draw (and per tensor in per_layer mode)."""
    ranks = [[[None] * _N_BINS for _ in groups] for _ in range(draws)]
    for d in range(draws):
        for gi, grp in enumerate(groups):
            g = (
                rng.stream(seed, "control", d)
                if mode == "global"
                else rng.stream(seed, "control", d, grp[0])
            )
            for b in range(_N_BINS):
                ranks[d][gi][b] = sample_distinct(g, int(avail[gi, b]), int(takes[gi][b]))
    return ranks


def _mag_positions(
    bins: _MagBins,
    chunk_counts: list[list[tuple[int, int, np.ndarray]]],
    ranks: list[list[list[np.ndarray]]],
    draws: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pass C: map ranks to positions, re-reading only chunks that hold a chosen rank."""
    out_p: list[list[np.ndarray]] = [[] for _ in range(draws)]
    out_f: list[list[np.ndarray]] = [[] for _ in range(draws)]
    for gi, counts in enumerate(chunk_counts):
        cum = np.zeros(_N_BINS, dtype=np.int64)
        for p, start, cnt in counts:
            wanted = []  # (bin, draw, chosen ranks local to this chunk)
            for b in np.flatnonzero(cnt):
                for d in range(draws):
                    r = ranks[d][gi][b]
                    i0, i1 = np.searchsorted(r, [cum[b], cum[b] + cnt[b]])
                    if i1 > i0:
                        wanted.append((int(b), d, r[i0:i1] - cum[b]))
            cum += cnt
            if not wanted:
                continue
            w = bins.weights[bins.names[p]].detach().reshape(-1)[start : start + bins.chunk_elems]
            chunk = bins.chunk_bins(p, start, w.to(device="cpu", dtype=torch.float32).abs())
            members: dict[int, np.ndarray] = {}
            for b, d, local in wanted:
                if b not in members:
                    members[b] = torch.nonzero(chunk == b).flatten().numpy()
                out_f[d].append(start + members[b][local])
                out_p[d].append(np.full(len(local), p))
    return [(_cat(out_p[d], np.int32), _cat(out_f[d], np.int64)) for d in range(draws)]


MATCH_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def _abs_at(weights, names, pi: np.ndarray, fi: np.ndarray) -> np.ndarray:
    out = np.empty(len(fi), dtype=np.float64)
    for p in np.unique(pi):
        m = pi == p
        w = weights[names[int(p)]].detach().reshape(-1)
        out[m] = w[torch.from_numpy(fi[m]).to(w.device)].to("cpu", torch.float64).abs().numpy()
    return out


def _achieved_match(weights, names, excl: dict, parts) -> dict:
    """How well the partners' |w| match the top-K's: the sorted partner |w| divided by the
    sorted top-K |w| (a quantile-quantile ratio, 1 everywhere for a perfect match), its
    quantiles pooled over draws, and the share of ratios within a factor 2."""
    ps = np.concatenate([np.full(len(f), p, dtype=np.int64) for p, f in excl.items()]) if excl else np.zeros(0, np.int64)
    fs = np.concatenate(list(excl.values())) if excl else np.zeros(0, np.int64)
    top = np.sort(_abs_at(weights, names, ps, fs))
    ratios = []
    for pi, fi in parts:
        partner = np.sort(_abs_at(weights, names, np.asarray(pi, np.int64), np.asarray(fi, np.int64)))
        if len(partner) == len(top):
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios.append(partner / top)
    r = np.concatenate(ratios) if ratios else np.zeros(0)
    r = r[np.isfinite(r)]
    if not len(r):
        return {"ratio_quantiles": {}, "within_2x": None}
    q = np.quantile(r, MATCH_QUANTILES)
    within = float(np.mean((r >= 0.5) & (r <= 2.0)))
    return {"ratio_quantiles": {str(k): float(v) for k, v in zip(MATCH_QUANTILES, q, strict=True)},
            "within_2x": within}


CONTROLS.add("random_k", Control("random_k", _random_k, summary="K uniformly random weights"), aliases=("random",))
CONTROLS.add("bottom_k", Control("bottom_k", _bottom_k, stochastic=False, summary="the K lowest-scored weights"),
             aliases=("bottom",))
CONTROLS.add("layer_matched", Control("layer_matched", _layer_matched, summary="random, same count per tensor as the top-K"))
CONTROLS.add("magnitude_matched", Control("magnitude_matched", _magnitude_matched, needs_weights=True,
                                          summary="random, same tensor and |w| bin as each top-K weight"))


def make_control(
    kind: str,
    scores,
    ref: Selection,
    draws: int,
    seed: int,
    weights: dict | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Selection:
    """Build control ``kind`` for the reference selection ``ref`` (usually the top-K).

    ``draws`` independent draws for random controls, one for deterministic ones.
    ``weights`` (name -> tensor, e.g. ``dict(model.named_parameters())``) is needed by
    ``magnitude_matched`` only.
    """
    name = CONTROLS.resolve(kind)
    if list(ref.params) != list(scores.names):
        raise UsageError(
            "The reference selection was made from scores with other parameters; "
            "rank these scores first."
        )
    if not ref.draws:
        raise UsageError("The reference selection has no draw.")
    ctl = CONTROLS.get(name)
    draws = check_draws(draws) if ctl.stochastic else 1
    if ctl.needs_weights and weights is None:
        raise UsageError(f"--kind {name} needs --model (it reads the model's weights)")
    return ctl.fn(
        scores, ref, draws=draws, seed=check_seed(seed), weights=weights, chunk_elems=int(chunk_elems)
    )
