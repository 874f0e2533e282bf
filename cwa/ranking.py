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
chunks of at most ``chunk_elems`` (and ``BLOCK_ELEMS``) entries; a candidate buffer,
always kept in position order, receives the entries of each chunk that can still reach
the top-K and is compacted back to K entries once it exceeds 2K (a quickselect for the
K-th key, then every entry above it plus the earliest entries equal to it). Once a
compaction has happened, a chunk entry whose key is not strictly above the buffer's K-th
key (the running threshold) can never enter: K earlier entries already beat or tie it,
and ties go to the earlier position. The threshold filters each chunk before any
selection: one min/max reduction gives the chunk's largest key (and finds a NaN), and a
chunk whose largest key is below the threshold is done; otherwise one more reduction
gives the largest key of each group of ``GROUP_ELEMS`` entries (the columns of a
[GROUP_ELEMS, n/GROUP_ELEMS] view), and only the entries of the groups that reach the
threshold (and the chunk's last n mod GROUP_ELEMS) are compared with it one by one; the
few survivors split into ties (counted) and entrants (buffered as positions and raw
scores; keys are recomputed from the scores). While chunks keep reaching the threshold
(large K), the first reduction is skipped: the group keys give the chunk's largest key
and find a NaN. Peak memory is one chunk plus O(K), and the result is exactly the
stable-sort definition above, because the global top-K is contained in the union of
per-chunk top-Ks. Before the first compaction, a global top-K of a large population
lets in only keys at or above a floor estimated from a sample (`_sample_floor`); the
stream counts whether K entries reached it and otherwise streams again without one, so
the floor changes the time, never the result. The final order is one sort of unique
integer codes (key bits, position; `rank_order`). Ranking and statistics run on
`RANK_THREADS` lanes: threads that each take the next span of the scores, torch on one
thread each (`_run_lanes`); the result does not depend on the number of lanes.

``ties_at_k`` is the number of entries in the whole population whose key equals the K-th
key, the K-th itself included (1 means the cut is unambiguous). Entries rejected along the
way are counted when they equal the running threshold; because the threshold never
decreases and every rejected key is at most the final K-th key, the count for the largest
rejected value is exact when that value turns out to be the K-th key. In ``per_layer``
mode it is the sum over tensors of each tensor's own count; a tensor taken whole (K or
fewer entries) has no cut and contributes 0.

Statistics
----------
``sensitivity_stats`` reads each chunk once for the moments and extremes (per chunk
Σ(x − c), Σ(x − c)² and Σ|x| as float32 cascade sums of at most 2^18 terms added in
float64, within a few ulps;
float64 accumulators across chunks, Chan's parallel variance) and for a fine histogram of
``|s|`` on the float32 bit grid (cell = bits >> 16: the exponent and 7 mantissa bits, a
relative width of at most 2⁻⁷; integer arithmetic, so an entry's cell is exact). The
reported histogram has log-spaced bins shared by all tensors, from the smallest positive
to the largest finite |s| (known only at the end); its inner edges are the cell
boundaries nearest to the exactly log-spaced ones (within 2⁻⁸ relative), so each bin is
a whole number of cells and the counts are exactly those of the edges reported, without
a second read. Only a range too narrow for that (fewer distinct cells than bins, e.g.
near-constant scores) is binned in a second pass against exactly log-spaced float32 edges
(⌊S·log2|s| + C⌋ in float32, entries within a proven rounding bound of an edge binned
again by ``torch.bucketize``; see ``_LogBinner``). Quantiles of ``|s|`` are read from the
reported histogram and are therefore approximate: each lies in the same bin as the exact
inverted-CDF quantile, i.e. within one bin width (a factor ``(max/min_pos)**(1/n_bins)``)
of it. ``rank_with_stats`` feeds the same chunks to the top-K and to the statistics, so
``cwa rank`` reads the scores once.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cwa.checks import check_mode, check_topk
from cwa.errors import CwaError, UsageError
from cwa.registry import check_choice

DEFAULT_CHUNK_ELEMS = 2**24
# Ranking and statistics read in blocks of at most this many entries (pieces of a file
# in reused buffers, `source_chunks`), the top-K and the statistics alike. Measured on
# 1e9 scores, K = 1e6, medians of 3 (benchmarks/RESULTS.md), top-K in blocks of 2^18 /
# 2^19 / 2^20 entries: 2.06 / 1.57 / 1.80 s (fewer calls per entry against temporaries
# that stay in cache).
BLOCK_ELEMS = 2**19
# The statistics' float32 sums run over pieces of at most this many entries, added in
# float64: one cascade sum of 2^19 heavy-tailed terms missed 1e-8 relative (Σd² of a
# cubed normal: 3e-8; two sums of 2^18 terms: 4e-10; tests/unit/test_ranking.py)
SUM_ELEMS = 2**18
# Once the top-K has a threshold, a block is filtered by the largest key of each group of
# this many entries (one reduction), and only the groups that reach it are looked at entry
# by entry (`_TopKStream.feed`): at K = 1e6 of 1e9 scores, 5.5% of the entries (4 / 16
# entries: the reduction is slower / twice as many entries are gathered).
GROUP_ELEMS = 8
# The candidate buffer is compacted back to K entries once it holds more than this many
# times K (each compaction is a selection over the whole buffer; a larger buffer means
# fewer of them, and a threshold that rises later: 2, 3 and 4 measured alike, top-K of
# 1e9 scores at K = 1e6, benchmarks/RESULTS.md "fifth round")
COMPACT_AT = 2
# ... and its pieces are joined into one once there are more than this many (under a
# floor, ~1900 small pieces would otherwise wait for the end: +30-40 MB of peak RSS)
MAX_PIECES = 256
# Before a global top-K, a sample of the scores (`SAMPLE_RUNS` runs of `SAMPLE_LEN`
# entries spread evenly over the population, read through the source's `sample_runs`)
# gives a floor: the key with about K/N·m + `FLOOR_SIGMAS`·sqrt(K/N·m) sample entries at or
# above it, so that, with a margin of that many standard deviations, at least K scores of
# the population reach it. Until the first compaction the stream lets in only entries at
# or above the floor (instead of every entry); whether K of them were seen is counted,
# and if not (the floor was too high) the top-K is streamed again without one, so the
# result never depends on the sample. At K = 1e6 of 1e9 this cuts the entrants from
# ~8.9 M to ~1.5 M (benchmarks/RESULTS.md, "fifth round").
SAMPLE_RUNS = 4096
SAMPLE_LEN = 64
FLOOR_SIGMAS = 8.0
# Ranking and statistics run in this many lanes (at most the machine's cores): threads
# that each take the next span of the scores (`_run_lanes`) and work through its blocks
# alone, torch on one thread each (restored afterwards). Measured on 1e9 scores on two
# cores (benchmarks/RESULTS.md, "seventh round"): torch's own two threads split every
# operation of every block and meet ~20 times per block; in the same runs the whole rank
# at K = 1e6 took 2.4-5.4 s from run to run with them and 2.2-3.2 s in two lanes (medians
# 1.06-1.57x faster, CPU time 0.54-0.93x); the top-K alone runs about as fast either way.
RANK_THREADS = min(2, os.cpu_count() or 1)
# Lanes take spans of at most this many entries of a tensor (rounded down to whole
# pieces); the moments are accumulated per span and merged in position order, so the
# statistics do not depend on how many lanes ran or which took which span.
SPAN_ELEMS = 2**25
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
    # Record (what `cwa.artifacts.write_selection` stores and `read_selection` restores):
    fingerprint: str = ""  # the stage fingerprint
    provenance: dict = field(default_factory=dict)  # scores, model, shapes, ...
    doc: Any = None  # the JSON document (top-K: {"stats": ...})
    arrays: dict = field(default_factory=dict)  # extra datasets (top-K: "stats/..." histograms)
    path: Path | None = None  # where it was read from or saved to
    model: Any = field(default=None, repr=False)  # the LoadedModel, in memory only (values)

    @property
    def n_draws(self) -> int:
        return len(self.draws)

    def per_tensor_counts(self, draw: int = 0) -> np.ndarray:
        return self.draws[draw].counts(len(self.params))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes the selection was made for (from its provenance)."""
        got = self.provenance.get("shapes") or {}
        return {n: tuple(int(x) for x in v) for n, v in got.items()}

    def to_pandas(self, draw: int = 0, lm: Any = None):
        """One row per selected weight: rank, param, layer, coords, flat_index, score,
        value (the weight in `lm`, or in the model it was scored on when that is in
        memory; NaN when neither is)."""
        from cwa.artifacts import selection_table

        return selection_table(self, draw=draw, lm=lm if lm is not None else self.model)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the `selection/1` artifact (atomically)."""
        from cwa.artifacts import write_selection

        self.path = write_selection(path, self)
        return self.path


class ScoresSource(Protocol):
    """What ranking, statistics, controls and stability read: `cwa.artifacts.Scores`
    (in memory), `cwa.artifacts.ScoresFile` (a file, read piece by piece) and
    `DictScores` all are one. `chunks(name, n)` is optional (else `get` is sliced), and
    so is `sample_runs(name, starts, length)` (without it, no sample floor)."""

    names: list[str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


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

    def chunks(self, name: str, chunk_elems: int, reuse: bool = False, start: int = 0,
               stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, float32 piece) pieces of flat entries [start, stop)."""
        for i, piece in iter_chunks(self._tensors[name], chunk_elems, start, stop):
            yield i, piece.float()

    def sample_runs(self, name: str, starts: list[int], length: int) -> torch.Tensor:
        return flat_runs(self._tensors[name], starts, length)


# --------------------------------------------------------------------------- helpers


def flat_runs(tensor: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """float32 runs of ``length`` entries of the flattened tensor from each start (cut
    short at its end), concatenated: a sample for `_sample_floor`."""
    flat = tensor.reshape(-1)
    return torch.cat([flat[s : s + length] for s in starts] or [flat[:0]]).float()


def _rank_threads(fn):
    """Run ``fn(scores, ...)`` with torch on one thread, restoring the caller's count:
    ranking's parallelism is its lanes (`_run_lanes`)."""

    @functools.wraps(fn)
    def run(scores, *args, **kwargs):
        before = torch.get_num_threads()
        if before == 1:
            return fn(scores, *args, **kwargs)
        torch.set_num_threads(1)  # threads started from here on run torch on one thread too
        try:
            return fn(scores, *args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


def _hashing(scores) -> bool:
    """Whether reading the scores will hash some of them (a file not verified before)."""
    hashing = getattr(scores, "needs_hashing", None)
    return hashing is not None and bool(hashing())


def _units(scores, sizes: np.ndarray, chunk_elems: int) -> list[tuple[int, int, int | None]]:
    """The work of a pass in position order: (tensor, first, end) flat ranges (end None:
    the whole tensor), spans of `_span_elems` entries where the source reads parts of a
    tensor (its ``chunks`` takes ``start``) and nothing is hashed on the way (a tensor's
    hash needs all of it, in order), else whole tensors. Empty tensors have none."""
    chunks = getattr(scores, "chunks", None)
    ranged = (chunks is not None and "start" in inspect.signature(chunks).parameters
              and not _hashing(scores))
    span = _span_elems(chunk_elems)
    out: list[tuple[int, int, int | None]] = []
    for p, n in enumerate(int(v) for v in sizes):
        if n <= span or not ranged:
            out.extend([(p, 0, None)] if n else [])
        else:
            out.extend((p, lo, min(lo + span, n)) for lo in range(0, n, span))
    return out


def _span_elems(chunk_elems: int) -> int:
    """`SPAN_ELEMS` rounded down to whole blocks (at least one), so that spans and blocks
    share one grid whether a tensor is read whole or span by span."""
    step = min(int(chunk_elems), BLOCK_ELEMS)
    return max(step, SPAN_ELEMS // step * step)


def _n_lanes(scores, n_units: int) -> int:
    """`RANK_THREADS` lanes, one fewer (at least one) when the scores are hashed on the way
    (the SHA-256 runs on a thread of its own), at most one per unit."""
    n = RANK_THREADS - 1 if _hashing(scores) else RANK_THREADS
    return max(1, min(n, n_units))


def _run_lanes(units: list, n_lanes: int, work: Callable[[int, Any, Callable[[], bool]], None]) -> None:
    """``work(lane, unit, stopped)`` for every unit, on ``n_lanes`` lanes: lane 0 is the
    calling thread, the others threads of their own. Each lane takes the next unit not yet
    taken, so every lane sees its units in ascending order. An error in a unit stops the
    units after it (``stopped()`` turns true there; work checks it between blocks) and no
    new one is taken; units before it run to their end, so the error raised, once every
    lane has stopped, is that of the earliest failing unit, whichever lane came first. An
    interrupt of the caller stops every lane."""
    todo = iter(enumerate(units))
    lock = threading.Lock()
    first_error = [math.inf]  # the index of the earliest unit that failed (-1: interrupted)
    errors: list[tuple[int, BaseException]] = []

    def lane(j: int) -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None or first_error[0] < math.inf:
                return
            i = item[0]
            try:
                work(j, item[1], lambda i=i: first_error[0] < i)
            except Exception as e:  # noqa: BLE001 - raised by the caller, below
                with lock:
                    errors.append((i, e))
                    first_error[0] = min(first_error[0], i)

    threads = [threading.Thread(target=lane, args=(j,), name=f"cwa-rank-{j}", daemon=True)
               for j in range(1, n_lanes)]
    try:
        for t in threads:
            t.start()
        lane(0)
        for t in threads:
            t.join()
    except BaseException:
        first_error[0] = -1
        for t in threads:
            t.join()
        raise
    if errors:
        raise min(errors, key=lambda e: e[0])[1]


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def population_sizes(scores) -> np.ndarray:
    """Entries per scored tensor (int64 [n_params]) from shapes alone (no data read)."""
    return np.array([_numel(scores.shape(n)) for n in scores.names], dtype=np.int64)


def iter_chunks(tensor: torch.Tensor, chunk_elems: int, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, flat slice) pieces of at most ``chunk_elems`` entries of flat entries
    [start, stop); views, no copies."""
    flat = tensor.reshape(-1)
    stop = flat.numel() if stop is None else min(int(stop), flat.numel())
    step = max(1, int(chunk_elems))
    for i in range(int(start), stop, step):
        yield i, flat[i : min(i + step, stop)]


def source_chunks(
    scores, name: str, chunk_elems: int, transient: bool = False, lo: int = 0,
    hi: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, flat piece) of one score tensor: through the source's own ``chunks()``
    when it has one (a scores file reads piece by piece, so a tensor larger than memory
    still streams), else by slicing ``get()``. ``transient``: the caller keeps no piece
    past the next one, so a source whose ``chunks`` takes ``reuse`` may read into the
    same buffers again (`cwa.artifacts.ScoresFile.chunks`). ``lo``/``hi``: only flat
    entries [lo, hi) (a part of a tensor: from a source whose ``chunks`` takes ``start``,
    see `_units`)."""
    chunks = getattr(scores, "chunks", None)
    kw: dict[str, Any] = {}
    if lo or hi is not None:
        kw = {"start": lo, "stop": hi}
    if chunks is None:
        yield from iter_chunks(scores.get(name), chunk_elems, lo, hi)
    elif transient and "reuse" in inspect.signature(chunks).parameters:
        yield from chunks(name, chunk_elems, reuse=True, **kw)
    else:
        yield from chunks(name, chunk_elems, **kw)


def _blocks(scores, name: str, chunk_elems: int, block: int, lo: int = 0,
            hi: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 flat block) of one score tensor (of its flat entries [lo, hi)):
    pieces of at most `chunk_elems` and ``block`` entries (a source's larger pieces are
    cut into views). A block is valid until the next is asked for: whatever a consumer
    keeps, it copies."""
    for start, chunk in source_chunks(scores, name, min(int(chunk_elems), block), True, lo, hi):
        chunk = chunk.float()
        n = chunk.numel()
        if n <= block:
            yield start, chunk
            continue
        for j in range(0, n, block):
            yield start + j, chunk[j : j + block]


def _check_args(k: int, mode: str, rank_by: str) -> None:
    check_topk(k)
    check_mode(mode)
    check_choice("--rank-by", rank_by, RANK_BY)


class _Scratch:
    """Reusable float32/bool/int32 buffers for per-chunk temporaries: a fresh 4 MB
    tensor per chunk costs a page fault per 4 KB on first touch (about as much as the
    arithmetic), so each temporary of a pass lives in one buffer, sized for the largest
    chunk."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n]


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces as one tensor (no copy of a single piece)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _key_of(raw: torch.Tensor, rank_by: str, lowest: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ranking keys of raw scores (the scores themselves for the top-K by value), in
    ``out`` where given, else in a new tensor."""
    if rank_by == "value" and not lowest:
        return raw
    if rank_by == "abs":
        key = torch.abs(raw, out=out) if out is not None else torch.abs(raw)
        return key.neg_() if lowest else key
    return torch.neg(raw, out=out) if out is not None else torch.neg(raw)


class _TopKStream:
    """Exact streaming top-k of (key, position) pairs fed in ascending position order.

    The buffer is a list of (positions int64, raw scores) pieces, all in position order;
    keys are computed from the raw scores where needed (`key_of`). ``thr`` is the K-th key
    of the buffer after the latest compaction (None before the first),
    ``tied_val``/``tied_out`` count rejected entries equal to the largest threshold at
    which anything was rejected (see the module docstring).
    """

    def __init__(self, k: int, rank_by: str, lowest: bool, floor: float | None = None) -> None:
        self.k, self.rank_by, self.lowest = k, rank_by, lowest
        self.floor = floor  # until the first compaction, only keys >= floor enter
        self.entered = 0  # entries that entered (each at or above the floor)
        self.pos: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []
        self.size = 0
        self.thr: float | None = None
        self.tied_val = -math.inf
        self.tied_out = 0
        self.scratch = _Scratch()

    def key_of(self, raw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _key_of(raw, self.rank_by, self.lowest, out)

    def _block_key(self, raw: torch.Tensor) -> torch.Tensor:
        """`key_of` into a scratch buffer (valid until the next block)."""
        return self.key_of(raw, self.scratch.get("key", raw.numel()))

    def _rejected(self, value: float, count: int) -> None:
        if count <= 0:
            return
        if value > self.tied_val:
            self.tied_val, self.tied_out = value, count
        elif value == self.tied_val:
            self.tied_out += count

    def _select(self, key: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Indices (ascending) of the k best of ``key`` under (key desc, index asc), and
        the k-th key."""
        kn = key.numpy()
        n = kn.size
        kth = np.partition(kn, n - self.k)[n - self.k]  # numpy's: 2x torch's kthvalue
        keep = kn > kth
        n_gt = int(np.count_nonzero(keep))
        eq_idx = np.flatnonzero(kn == kth)
        need = self.k - n_gt
        self._rejected(float(kth), eq_idx.size - need)
        keep[eq_idx[:need]] = True
        return torch.from_numpy(np.flatnonzero(keep)), float(kth)

    def group_keys(self, raw: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
        """The largest key of each group of a block's first ``GROUP_ELEMS * g`` entries,
        g = n // GROUP_ELEMS: group j holds entries j + i·g (i < GROUP_ELEMS), the columns
        of a [GROUP_ELEMS, g] view, so one reduction across its rows gives all g keys
        (vectorized along the rows; no per-entry temporary but for the bottom-K by |s|).
        ``key``: the block's keys where already computed."""
        g = raw.numel() // GROUP_ELEMS
        x = raw[: g * GROUP_ELEMS].view(GROUP_ELEMS, g)
        if key is None and self.rank_by == "abs" and self.lowest:
            key = self._block_key(raw[: g * GROUP_ELEMS])
        if key is not None:
            return torch.amax(key[: g * GROUP_ELEMS].view(GROUP_ELEMS, g), dim=0)
        if self.rank_by == "value":
            return torch.amin(x, dim=0).neg_() if self.lowest else torch.amax(x, dim=0)
        return torch.maximum(torch.amax(x, dim=0), torch.amin(x, dim=0).neg_())

    @property
    def bar(self) -> float | None:
        """What a key must reach to be looked at: the threshold, else the floor."""
        return self.thr if self.thr is not None else self.floor

    @property
    def complete(self) -> bool:
        """Whether the result is exact: no floor, or K entries at or above it were seen."""
        return self.floor is None or self.entered >= self.k

    def feed(self, start: int, raw: torch.Tensor, key: torch.Tensor | None) -> float | None:
        """Offer one block; ``start`` is the position of its first entry, ``key`` its keys
        where already computed (None: computed here, for the entries that need one).
        Returns the block's largest key when the threshold filter computed it on the way
        (NaN when the block holds a NaN: nothing of it has entered then), else None."""
        top = None
        if self.bar is None:
            idx = None
            if key is None:
                key = self._block_key(raw)
        else:
            # the groups whose largest key reaches the bar, and the last n mod GROUP_ELEMS
            # entries, in position order; then their entries that do. Against the
            # threshold, entries equal to it are ties (counted) and those above enter;
            # against the floor, every entry at or above it enters. A NaN makes its
            # group's key NaN (max and min propagate it), which compares false: it never
            # enters, and `top` says so
            strict = self.thr is not None
            n, thr = raw.numel(), np.float32(self.bar)
            g = n // GROUP_ELEMS
            gk = self.group_keys(raw, key).numpy()
            top = float(gk.max()) if g else -math.inf
            cols = np.flatnonzero(gk >= thr)
            cand = (np.arange(GROUP_ELEMS)[:, None] * g + cols).ravel()
            if n > g * GROUP_ELEMS:
                cand = np.concatenate([cand, np.arange(g * GROUP_ELEMS, n)])
            if cand.size == 0:
                return top
            cand_t = torch.from_numpy(cand)
            raw = torch.index_select(raw, 0, cand_t)
            key = self.key_of(raw) if key is None else torch.index_select(key, 0, cand_t)
            kn = key.numpy()
            if n > g * GROUP_ELEMS:
                tail = float(kn[g * GROUP_ELEMS - n :].max())
                top = tail if math.isnan(tail) or tail > top else top  # NaN wins
            if strict:
                self._rejected(self.thr, int(np.count_nonzero(kn == thr)))
            keep = np.flatnonzero(kn > thr if strict else kn >= thr)
            if keep.size == 0:
                return top
            keep_t = torch.from_numpy(keep)
            idx = cand_t[keep_t]
            raw = torch.index_select(raw, 0, keep_t)
            if keep.size > self.k:
                key = torch.index_select(key, 0, keep_t)
        self.entered += raw.numel()
        if raw.numel() > self.k:
            sel, _ = self._select(key)
            raw = raw[sel]
            idx = sel if idx is None else idx[sel]
        elif idx is None:
            # the whole block: a copy, so that no view of a block (a reused read buffer)
            # outlives it; the other branches gathered copies
            raw = raw.clone()
            idx = torch.arange(raw.numel(), dtype=torch.int64)
        self.pos.append(idx + start)
        self.raw.append(raw)
        self.size += raw.numel()
        if self.size > COMPACT_AT * self.k:
            self._compact()
        elif len(self.pos) > MAX_PIECES:  # many small pieces (a floor, no compaction)
            self.pos, self.raw = [_joined(self.pos)], [_joined(self.raw)]
        return top

    @classmethod
    def merged(cls, streams: list[_TopKStream]) -> _TopKStream:
        """One stream holding what ``streams`` hold (taking it from them), in position
        order, so that its `finish` is the top-k of everything they were fed: each was fed
        its own positions in ascending order (lanes), and the top-k of a union is within
        the union of the parts' top-ks. Rejected ties carry over: a part's rejected keys are at most its
        own k-th key, which is at most the union's, so only a part whose k-th key is the
        union's can have rejected entries equal to it, and it counted them."""
        if len(streams) == 1:
            return streams[0]
        first = streams[0]
        out = cls(first.k, first.rank_by, first.lowest, first.floor)
        out.entered = sum(t.entered for t in streams)
        for t in streams:
            out._rejected(t.tied_val, t.tied_out)
        pos = [q for t in streams for q in t.pos]
        raw = [r for t in streams for r in t.raw]
        for t in streams:  # taken over: the parts' pieces are freed as they are joined
            t.pos, t.raw, t.size = [], [], 0
        if pos:
            pos_t = _joined(pos)
            # each stream's pieces are in position order: numpy's stable sort (a merge
            # sort that finds those runs) is 4x torch's argsort here
            order = torch.from_numpy(np.argsort(pos_t.numpy(), kind="stable"))
            del pos
            pos_t = pos_t[order]
            raw_t = _joined(raw)
            del raw
            out.pos, out.raw, out.size = [pos_t], [raw_t[order]], pos_t.numel()
        return out

    def _compact(self) -> None:
        pos, raw = _joined(self.pos), _joined(self.raw)
        sel, self.thr = self._select(self.key_of(raw))
        self.pos, self.raw, self.size = [pos[sel]], [raw[sel]], sel.numel()

    def finish(self) -> tuple[np.ndarray, np.ndarray, int, float]:
        """(positions, raw scores) in rank order, ties_at_k, K-th key."""
        if self.size > self.k:
            self._compact()
        pos, raw = _joined(self.pos), _joined(self.raw)
        key = self.key_of(raw)
        order = rank_order(key)
        pos, key, raw = pos[order], key[order], raw[order]
        kth = float(key[-1])
        in_sel = int((key == key[-1]).sum())
        ties = in_sel + (self.tied_out if self.tied_val == kth else 0)
        return pos.numpy(), raw.numpy(), ties, kth


def rank_order(key: torch.Tensor) -> torch.Tensor:
    """The permutation of a stable descending sort of float32 keys (no NaN): key
    descending, index ascending among equal keys (-0.0 equal to 0.0). One unstable sort of
    unique int64 codes, (order-reversed key bits) << s | index, s the bits of the largest
    index: 46 ms vs a stable sort's 113 ms for 1e6 keys (benchmarks/RESULTS.md)."""
    n = key.numel()
    s = max(1, (n - 1).bit_length())
    if s > 31:  # codes would not fit 63 bits
        return torch.sort(key, descending=True, stable=True).indices
    b = (key + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0
    b ^= (b >> 31) & 0x7FFFFFFF  # the bits of a float32, monotone as signed integers
    code = ((0x7FFFFFFF - b) << s) | torch.arange(n, dtype=torch.int64)
    return torch.sort(code).values & ((1 << s) - 1)


def _top_key(chunk: torch.Tensor, rank_by: str, lowest: bool) -> float:
    """The largest key of a non-empty float32 chunk, from one reduction (no temporary but
    for the bottom-K by |s|); NaN when the chunk holds a NaN (min and max propagate it)."""
    if rank_by == "abs" and lowest:
        return -float(chunk.abs().min())
    lo, hi = (float(v) for v in torch.aminmax(chunk))
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    if rank_by == "abs":
        return max(-lo, hi)
    return -lo if lowest else hi


def _check_nan(top: float, chunk: torch.Tensor, name: str) -> None:
    """Refuse a block whose largest key is NaN."""
    if math.isnan(top):
        n_nan = int(torch.isnan(chunk).sum())
        raise CwaError(
            f"Scores of {name!r} contain NaN (at least {n_nan} entries); NaN cannot be "
            "ranked. Re-score, or check the model and data for non-finite values."
        )


def _stream_span(
    stream: _TopKStream | None, scores, name: str, span: tuple[int, int | None], offset: int,
    chunk_elems: int, rank_by: str, lowest: bool, stats: _StatsStream | None, p: int,
    scratch: _Scratch, stopped: Callable[[], bool],
) -> None:
    """Feed every chunk of one score tensor's flat entries ``span`` = (first, end; None:
    to the end) (positions from ``offset``) to ``stream``, raising on NaN; with ``stats`` (top-K only, or statistics
    alone when ``stream`` is None) the same chunks also feed the statistics of tensor
    ``p``, so that ranking and statistics are one read of the scores. Returns early once
    ``stopped()`` (an earlier span failed on another lane).

    The common case, once the stream has a bar (its threshold, or before that its
    floor), is a chunk whose largest key is below it: then nothing in it can enter or tie,
    and the chunk costs one reduction."""
    passing = False  # the previous block reached the threshold
    for start, chunk in _blocks(scores, name, chunk_elems, BLOCK_ELEMS, *span):
        if stopped():
            return
        if chunk.numel() == 0:
            continue
        a = top = None
        if stats is not None:
            lo, hi, a = stats.add(p, start, chunk, scratch)
            if stream is None:
                continue
            top = max(-lo, hi) if rank_by == "abs" else hi
        elif stream.bar is None or not passing:
            top = _top_key(chunk, rank_by, lowest)
        # else: while blocks keep reaching the bar, the group filter's reduction gives the
        # block's largest key, and a first reduction for it would be wasted
        if top is not None:
            _check_nan(top, chunk, name)
            if stream.bar is not None and top < stream.bar:
                passing = False
                continue
        key = a if a is not None and rank_by == "abs" and not lowest else None
        seen = stream.feed(offset + start, chunk, key)
        if seen is not None:
            _check_nan(seen, chunk, name)
            passing = not seen < stream.bar


@_rank_threads
def _rank(scores, k, mode, rank_by, chunk_elems, lowest, kind, seed, stats=None) -> Selection:
    _check_args(k, mode, rank_by)
    k = int(k)
    names = list(scores.names)
    sizes = population_sizes(scores)
    n_total = _check_population(k, mode, sizes)
    info: dict = {"n_population": n_total}
    if mode == "global":
        draw, ties, kth = _rank_global(scores, names, sizes, k, rank_by, chunk_elems, lowest, stats)
        info["kth_key"] = kth
    else:
        draw, ties, kth_keys = _rank_per_layer(
            scores, names, sizes, k, rank_by, chunk_elems, lowest, stats
        )
        info["kth_key_per_tensor"] = kth_keys
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


def _check_population(k: int, mode: str, sizes: np.ndarray) -> int:
    """The number of scored entries, refusing an empty population or a global K above it."""
    n_total = int(sizes.sum())
    if mode == "global" and k > n_total:
        raise UsageError(
            f"K = {k} is larger than the scored population ({n_total} entries); "
            f"choose K <= {n_total}."
        )
    if n_total == 0:
        raise UsageError("The scored population is empty.")
    return n_total


def _rank_global(
    scores,
    names: list[str],
    sizes: np.ndarray,
    k: int,
    rank_by: str,
    chunk_elems: int,
    lowest: bool,
    stats: _StatsStream | None = None,
) -> tuple[Draw, int, float]:
    """One stream per lane over every tensor (positions offset by tensor), merged: the
    draw, the ties at K and the K-th key."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    floor = _sample_floor(scores, names, sizes, k, rank_by, lowest)
    streams = _lanes_pass(scores, names, sizes, chunk_elems, rank_by, lowest, stats,
                          lambda p: _TopKStream(k, rank_by, lowest, floor), False)
    stream = _TopKStream.merged(streams[0])
    if not stream.complete:  # fewer than K entries reached the floor: again, without one
        streams = _lanes_pass(scores, names, sizes, chunk_elems, rank_by, lowest, None,
                              lambda p: _TopKStream(k, rank_by, lowest), False)
        stream = _TopKStream.merged(streams[0])
    pos, raw, ties, kth = stream.finish()
    param_index = np.searchsorted(offsets, pos, side="right") - 1
    flat_index = pos - offsets[param_index]
    return Draw(param_index, flat_index, raw), ties, -kth if lowest else kth


def _lanes_pass(scores, names: list[str], sizes: np.ndarray, chunk_elems: int, rank_by: str,
                lowest: bool, stats: _StatsStream | None,
                new_stream: Callable[[int], _TopKStream] | None, per_tensor: bool) -> dict:
    """One pass over the scores in lanes: every span to a top-K stream of its lane (one per
    lane, or with ``per_tensor`` one per lane and tensor, made by ``new_stream(p)``; None:
    statistics alone) and to ``stats``. Returns {stream key: [the lanes' streams]}, key
    the tensor with ``per_tensor``, else 0 (positions then run on across tensors)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    units = _units(scores, sizes, chunk_elems)
    n_lanes = _n_lanes(scores, len(units))
    lanes: list[dict[int, _TopKStream]] = [{} for _ in range(n_lanes)]
    scratch = [_Scratch() for _ in range(n_lanes)]

    def work(j: int, unit: tuple, stopped: Callable[[], bool]) -> None:
        p = unit[0]
        stream = None
        if new_stream is not None:
            key = p if per_tensor else 0
            stream = lanes[j].get(key)
            if stream is None:
                stream = lanes[j][key] = new_stream(p)
        offset = 0 if per_tensor else int(offsets[p])
        _stream_span(stream, scores, names[p], unit[1:], offset, chunk_elems, rank_by, lowest,
                     stats, p, scratch[j], stopped)

    _run_lanes(units, n_lanes, work)
    out: dict[int, list[_TopKStream]] = {}
    for lane in lanes:
        for key, stream in lane.items():
            out.setdefault(key, []).append(stream)
    return out


def _sample_floor(scores, names: list[str], sizes: np.ndarray, k: int, rank_by: str,
                  lowest: bool) -> float | None:
    """A key that at least K of the population's keys reach, with a margin of
    `FLOOR_SIGMAS` standard deviations, from `SAMPLE_RUNS` runs of `SAMPLE_LEN` entries
    at evenly spaced positions of each tensor (as many runs as its share of the
    population); None where a sample cannot tell (a small population, K too small or too
    large a share to estimate, a source without ``sample_runs``)."""
    sampler = getattr(scores, "sample_runs", None)
    n_total = int(sizes.sum())
    m_target = SAMPLE_RUNS * SAMPLE_LEN
    q = k / n_total
    if sampler is None or n_total < 4 * m_target or m_target * q < 4 or q > 0.1:
        return None
    parts = []
    for p, name in enumerate(names):
        n = int(sizes[p])
        runs = round(SAMPLE_RUNS * n / n_total)
        if runs == 0 or n < SAMPLE_LEN:
            continue
        starts = ((np.arange(runs) + 0.5) * (n / runs) - SAMPLE_LEN / 2).astype(np.int64)
        x = sampler(name, np.clip(starts, 0, n - SAMPLE_LEN).tolist(), SAMPLE_LEN)
        if x is None:
            return None
        parts.append(x.reshape(-1).float())
    key = _key_of(torch.cat(parts), rank_by, lowest) if parts else torch.zeros(0)
    key = key[~torch.isnan(key)]
    mq = key.numel() * q
    r = max(1, math.ceil(mq + FLOOR_SIGMAS * math.sqrt(mq) + 1))
    if r > key.numel() // 2:
        return None
    return float(torch.topk(key, r).values[-1])


def _rank_per_layer(
    scores,
    names: list[str],
    sizes: np.ndarray,
    k: int,
    rank_by: str,
    chunk_elems: int,
    lowest: bool,
    stats: _StatsStream | None = None,
) -> tuple[Draw, int, list[float | None]]:
    """One stream per tensor (min(K, size) entries each): the draw, the ties at K summed
    over the tensors larger than K, and each tensor's K-th key (None when empty)."""
    parts_p, parts_f, parts_s = [], [], []
    ties = 0
    kth_keys: list[float | None] = []
    streams = _lanes_pass(scores, names, sizes, chunk_elems, rank_by, lowest, stats,
                          lambda p: _TopKStream(min(k, int(sizes[p])), rank_by, lowest), True)
    for p in range(len(names)):
        n = int(sizes[p])
        if n == 0:
            kth_keys.append(None)
            continue
        pos, raw, t_ties, kth = _TopKStream.merged(streams[p]).finish()
        if n > k:
            ties += t_ties
        kth_keys.append(-kth if lowest else kth)
        parts_p.append(np.full(len(pos), p, dtype=np.int32))
        parts_f.append(pos)
        parts_s.append(raw)
    param_index = np.concatenate(parts_p) if parts_p else np.zeros(0, np.int32)
    flat_index = np.concatenate(parts_f) if parts_f else np.zeros(0, np.int64)
    raw = np.concatenate(parts_s) if parts_s else np.zeros(0, np.float32)
    return Draw(param_index, flat_index, raw), ties, kth_keys


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


@_rank_threads
def rank_with_stats(
    scores,
    k: int,
    mode: str = "global",
    rank_by: str = "abs",
    n_bins: int = 64,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
) -> tuple[Selection, dict, dict]:
    """``topk(...)`` and ``sensitivity_stats(scores, that selection)`` from one read of
    the scores (what `cwa rank` writes): ``(selection, stats, hist)``, equal to the two
    calls made separately."""
    _check_bins(n_bins)
    stats = _StatsStream(len(scores.names), chunk_elems)
    sel = _rank(scores, k, mode, rank_by, chunk_elems, False, "topk", seed, stats)
    st, hist = stats.finish(scores, sel, n_bins, chunk_elems)
    return sel, st, hist


# --------------------------------------------------------------------------- statistics


def _fsum(t: torch.Tensor) -> float:
    """Σ t of float32 values: float32 cascade sums of pieces of at most `SUM_ELEMS`
    entries (torch's `sum`; not `dot`, whose BLAS float32 accumulators lose 1e-5 relative
    on 2^18 terms), added in float64."""
    n = t.numel()
    if n <= SUM_ELEMS:
        return float(t.sum())
    m = n - n % SUM_ELEMS
    total = sum(t[:m].view(-1, SUM_ELEMS).sum(dim=1).tolist())
    return total + float(t[m:].sum()) if m < n else total


def _shifted_sums(x: torch.Tensor, c: float | None, scratch: _Scratch) -> tuple[float, float, float]:
    """(c, Σd, Σd²) of d = x − c for non-empty finite float32 x, c rounded to float32
    (None: x's own mean)."""
    nb = x.numel()
    if c is None:
        c = _fsum(x)
        if not math.isfinite(c):
            c = float(x.sum(dtype=torch.float64))
        c /= nb
    c = float(np.float32(c))  # a float32 value: x − c is computed in float32
    d = torch.sub(x, c, out=scratch.get("d", nb))
    # float32 cascade sums (`_fsum`): Σd² (non-negative terms) is within a few ulps; Σd is
    # a sum of terms of both signs near 0, whose rounding errors average out: about
    # ε·σ·sqrt(log n / n) on the mean (1e-9 σ per sum of 2^18 terms), far below the
    # resolution of float32 scores (float64 where a float32 sum would overflow)
    s1 = _fsum(d)
    s2 = _fsum(d.square_())
    if not math.isfinite(s2):  # |x − c| beyond float32's square root of its range
        dd = x.double() - c
        s1, s2 = float(dd.sum()), float(dd.square_().sum())
    return c, s1, s2


class _Moments:
    """Count, mean and M2 of finite values, float64 accumulators merged chunk by chunk.

    Within a chunk (float32), deviations are taken from a shift c, a float32 value: M2 =
    Σ(x − c)² − (Σ(x − c))²/n is exact algebra for any c, and with c near the chunk's mean
    it has no cancellation. c is the running mean of the chunks before (no pass over the
    chunk to find it), or for a first chunk its own mean; a chunk whose mean is further
    from c than its spread ((Σ(x − c))²/n > Σ(x − c)²/2, where the subtraction would lose
    digits) is summed again from its own mean. Chunks are merged with Chan et al.'s
    formula.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.abs_sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add_chunk(
        self, x: torch.Tensor, a: torch.Tensor, lo: float, hi: float, scratch: _Scratch
    ) -> None:
        """x: finite float32 values, a: their absolute values, lo/hi: their min and max."""
        nb = x.numel()
        if nb == 0:
            return
        c, s1, s2 = _shifted_sums(x, self.mean if self.n else None, scratch)
        if self.n and s1 * s1 / nb > 0.5 * s2:  # c too far from this chunk's mean
            c, s1, s2 = _shifted_sums(x, None, scratch)
        abs_sum = _fsum(a)
        if not math.isfinite(abs_sum):
            abs_sum = float(a.sum(dtype=torch.float64))
        self.abs_sum += abs_sum
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._merge(nb, c + s1 / nb, max(s2 - s1 * s1 / nb, 0.0))

    def merge(self, other: _Moments) -> None:
        if other.n == 0:
            return
        if self.n == 0:  # exactly the other's
            self.n, self.mean, self.m2 = other.n, other.mean, other.m2
            self.abs_sum, self.min, self.max = other.abs_sum, other.min, other.max
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


@_rank_threads
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
    shared by all tensors; None when no entry is positive; see the module docstring for
    where the inner edges lie), ``counts`` (int64 [n_params, n_bins]) of finite positive
    |s| per bin (the last bin includes its upper edge), ``zeros`` and ``nonfinite`` (int64
    [n_params]) and ``params``.
    """
    _check_bins(n_bins)
    names = list(scores.names)
    stream = _StatsStream(len(names), chunk_elems)
    _lanes_pass(scores, names, population_sizes(scores), chunk_elems, "abs", False, stream,
                None, False)
    return stream.finish(scores, selection, n_bins, chunk_elems)


def _check_bins(n_bins: int) -> None:
    if n_bins <= 0:
        raise UsageError(f"n_bins must be positive, got {n_bins}.")


# |s| on the float32 bit grid: the bits of a non-negative float32 are monotone in its value,
# so bits >> 16 (exponent and the top 7 mantissa bits) is a log-scale cell of relative width
# at most 2^-7; cells from _FIRST_NONFINITE on hold inf and NaN
_CELL_SHIFT = 16
_N_CELLS = 1 << (31 - _CELL_SHIFT)
_FIRST_NONFINITE = 0x7F800000 >> _CELL_SHIFT


class _StatsStream:
    """The statistics of every tensor from blocks fed once, in any block order, by any
    number of lanes at once.

    Per block: the moments (`_Moments`, one per span of `_span_elems` entries of a tensor,
    merged in position order at the end, so the result is the same whichever lane took a
    span), the zeros and non-finite entries, the exact smallest positive and largest
    finite |s|, and a count of |s| per bit-grid cell (`_N_CELLS` cells; 256 KB per
    tensor); the shared counts and extremes are updated under a lock. The histogram's
    edges depend on the range of all tensors, known only at the end; `finish` places the
    inner edges on cell boundaries, so every bin is a whole number of cells and the counts
    are exact without reading the scores again (ranges too narrow for 64 distinct cells
    between min and max take a second pass against exactly log-spaced edges)."""

    def __init__(self, n_params: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> None:
        self.span = _span_elems(chunk_elems)
        self.span_moments: dict[tuple[int, int], _Moments] = {}
        self.n_zero = np.zeros(n_params, dtype=np.int64)
        self.n_nonfinite = np.zeros(n_params, dtype=np.int64)
        self.cells = np.zeros((n_params, _N_CELLS), dtype=np.int64)
        self.abs_lo, self.abs_hi = math.inf, 0.0
        self.lock = threading.Lock()

    def add(self, p: int, start: int, chunk: torch.Tensor,
            scratch: _Scratch) -> tuple[float, float, torch.Tensor | None]:
        """Count a non-empty float32 block of tensor p, its first entry at flat index
        ``start``. Returns the block's (min, max) (NaN when it holds a NaN) and, when
        every entry is finite, |block| in ``scratch`` (valid until the next call), which
        the top-K uses as its key."""
        lo, hi = (float(v) for v in torch.aminmax(chunk))
        finite = math.isfinite(lo) and math.isfinite(hi)
        x = chunk
        if not finite:
            x = chunk[torch.isfinite(chunk)]
        if not x.numel():
            with self.lock:
                self.n_nonfinite[p] += chunk.numel()
            return lo, hi, None
        xlo, xhi = (lo, hi) if finite else (float(v) for v in torch.aminmax(x))
        a = torch.abs(x, out=scratch.get("a", x.numel()))
        cell = torch.bitwise_right_shift(a.view(torch.int32), _CELL_SHIFT,
                                         out=scratch.get("cell", x.numel(), torch.int32))
        counts = torch.bincount(cell, minlength=_N_CELLS).numpy()
        a_lo, n_zero = self._low_end(a, xlo, xhi, counts)
        key = (p, start // self.span)
        moments = self.span_moments.get(key)  # each span is fed by one lane only
        if moments is None:
            moments = self.span_moments[key] = _Moments()
        moments.add_chunk(x, a, xlo, xhi, scratch)
        with self.lock:
            self.cells[p] += counts
            self.n_nonfinite[p] += chunk.numel() - x.numel()
            self.n_zero[p] += n_zero
            self.abs_lo = min(self.abs_lo, a_lo)
            self.abs_hi = max(self.abs_hi, -xlo, xhi)
        return lo, hi, a if finite else None

    def _low_end(self, a: torch.Tensor, lo: float, hi: float,
                 counts: np.ndarray) -> tuple[float, int]:
        """The block's smallest positive |s| (inf where it cannot be below the smallest so
        far) and its zeros (``a``: |s| of finite values, lo/hi: their min and max,
        ``counts``: entries per cell; cell 0 is the only one that holds zeros)."""
        if lo > 0 or hi < 0:  # one sign: no zeros, the smallest |s| is an end
            return (lo if lo > 0 else -hi), 0
        if not counts[0]:  # no zeros: the smallest |s| is positive, in the lowest cell
            floor = np.int32(int((counts != 0).argmax()) << _CELL_SHIFT).view(np.float32)
            # a stale smallest-so-far (another lane's update not seen yet) is larger, so
            # at worst this searches a block it could have skipped
            return (float(a.min()) if self.abs_lo >= floor else math.inf), 0
        an = a.numpy()
        is_zero = an == 0
        return float(np.min(an, where=~is_zero, initial=np.inf)), int(np.count_nonzero(is_zero))

    def _tensor_moments(self, n_params: int) -> list[_Moments]:
        """Each tensor's moments: its spans' merged in position order."""
        out = [_Moments() for _ in range(n_params)]
        for key in sorted(self.span_moments):
            out[key[0]].merge(self.span_moments[key])
        return out

    def finish(self, scores, selection: Selection | None, n_bins: int, chunk_elems: int):
        """(stats, hist) as `sensitivity_stats` returns them."""
        names = list(scores.names)
        abs_lo, abs_hi = self.abs_lo, self.abs_hi
        edges = counts = None
        if abs_hi > 0:
            edges = _cell_edges(abs_lo, abs_hi, n_bins)
            if edges is not None:
                counts = self._counts_from_cells(edges, n_bins)
            else:  # a narrow range: exactly log-spaced edges and a second read
                edges = log_edges_f32(abs_lo, abs_hi, n_bins)
                counts = _histogram_pass(scores, names, chunk_elems, edges, n_bins)
        if counts is None:
            counts = np.zeros((len(names), n_bins), dtype=np.int64)
        return _summaries(scores, names, selection, n_bins, edges, counts, self,
                          self._tensor_moments(len(names)))

    def _counts_from_cells(self, edges: np.ndarray, n_bins: int) -> np.ndarray:
        """Counts per bin of positive finite |s|: whole cells between the inner edges
        (the zeros taken out of cell 0, the first and last bins closed by the range)."""
        bounds = _bits(edges[1:-1]) >> _CELL_SHIFT
        cum = np.concatenate([np.zeros((len(self.cells), 1), np.int64),
                              np.cumsum(self.cells[:, :_FIRST_NONFINITE], axis=1)], axis=1)
        at = np.concatenate([[0], bounds, [_FIRST_NONFINITE]])
        counts = cum[:, at[1:]] - cum[:, at[:-1]]
        counts[:, 0] -= self.n_zero
        return counts


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)


def _cell_edges(lo: float, hi: float, n_bins: int) -> np.ndarray | None:
    """``n_bins + 1`` edges from lo to hi (the exact smallest and largest |s|) whose inner
    edges are the cell boundaries nearest to the log-spaced ones (within 2^-8 relative),
    strictly increasing with lo < e_1 and e_{n-1} < hi; None when the range is too narrow
    for that (then `log_edges_f32` and a second pass)."""
    if not hi > lo:
        return None
    inner = np.geomspace(lo, hi, n_bins + 1)[1:-1].astype(np.float32)
    step = 1 << _CELL_SHIFT
    cells = (_bits(inner) + step // 2) >> _CELL_SHIFT
    grid = (cells << _CELL_SHIFT).astype(np.int32).view(np.float32).astype(np.float64)
    e = np.concatenate([[float(np.float32(lo))], grid, [float(np.float32(hi))]])
    if n_bins > 1 and not (np.all(np.diff(e) > 0) and _bits(e[:1])[0] < cells[0] << _CELL_SHIFT):
        return None
    return e


def _summaries(scores, names, selection, n_bins, edges, counts, stream: _StatsStream,
               moments: list[_Moments]):
    """The stats document and the histogram arrays from the accumulators (``moments``:
    each tensor's)."""
    abs_lo, abs_hi = stream.abs_lo, stream.abs_hi
    sel_counts = _selection_counts(selection, names)

    def block(mom: _Moments, count: int, nz: int, nnf: int, hist: np.ndarray) -> dict:
        quantiles = _abs_quantiles(hist, int(nz), edges, abs_lo, abs_hi)
        return _stats_block(mom, count, nz, nnf, quantiles)

    per: dict[str, dict] = {}
    total = _Moments()
    sizes = population_sizes(scores)
    n_zero, n_nonfinite = stream.n_zero, stream.n_nonfinite
    for p, name in enumerate(names):
        total.merge(moments[p])
        per[name] = block(moments[p], sizes[p], n_zero[p], n_nonfinite[p], counts[p])
        per[name]["shape"] = list(scores.shape(name))
        if sel_counts is not None:
            per[name].update(_topk_share(sel_counts, p))
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
    hist = dict(params=names, edges=edges, counts=counts, zeros=n_zero, nonfinite=n_nonfinite)
    return stats, hist


def _finite_chunks(
    scores, name: str, chunk_elems: int
) -> Iterator[tuple[torch.Tensor, int, float, float]]:
    """(the finite values of a chunk as float32, how many were not finite, their min and
    max); the common all-finite chunk costs one reduction (min/max propagate NaN)."""
    for _, chunk in _blocks(scores, name, chunk_elems, BLOCK_ELEMS):
        x = chunk
        if x.numel() == 0:
            continue
        lo, hi = (float(v) for v in torch.aminmax(x))
        if math.isfinite(lo) and math.isfinite(hi):
            yield x, 0, lo, hi
            continue
        x = x[torch.isfinite(x)]
        n_bad = chunk.numel() - x.numel()
        if x.numel():
            lo, hi = (float(v) for v in torch.aminmax(x))
        yield x, n_bad, lo, hi


class _LogBinner:
    """``bincount(bin_abs(a, edges))`` for float32 |s| by arithmetic instead of a binary
    search: t = S·log2 a + C in float32 with S = n/(log2 eₙ − log2 e₀) and C placing edge
    i at i + 1 + δ, bin = ⌊t⌋ (the ``bucketize(right=True)`` index, e_{b−1} ≤ a < e_b).

    Exact against the stored float32 edges: the same float32 arithmetic puts edge i at
    Tᵢ (measured), and t is non-decreasing in a up to ``margin`` (log2 within one ulp,
    then correctly rounded operations). With δ ≥ max|Tᵢ − (i + 1 + δ)| + margin an entry
    of bin b has t in [b, b + 1 + 2δ], so when frac(t) > 2δ, ⌊t⌋ = b. The others (a
    fraction of about 2δ of the entries; every entry on an edge or one ulp from it) are
    binned by ``bucketize`` against the edges. Ranges too narrow for this (δ ≥ 1/32) or
    with a subnormal lowest edge use ``bucketize`` for every entry.
    """

    def __init__(self, edges: np.ndarray) -> None:
        e32 = edges.astype(np.float32)
        self.n = len(e32) - 1
        self.edges_t = torch.from_numpy(e32)
        self.scratch = _Scratch()
        l0, l1 = math.log2(float(e32[0])), math.log2(float(e32[-1]))
        self.scale = float(np.float32(self.n / (l1 - l0))) if l1 > l0 else math.inf
        margin = 4 * 2.0**-23 * (self.scale * max(1.0, abs(l0), abs(l1)) + self.n + 2)
        if not math.isfinite(margin):  # a single value: no range to compute in
            self.offset, self.delta, self.exact = 0.0, math.inf, True
            return
        target = np.arange(1, self.n + 2, dtype=np.float64)
        self.offset = float(np.float32(1.0 - self.scale * l0))
        self.delta = 2 * (self._dev(target) + margin)  # then check it with δ in C
        self.offset = float(np.float32(1.0 + self.delta - self.scale * l0))
        ok = self._dev(target + self.delta) + margin <= self.delta
        self.exact = not (ok and self.delta < 1 / 32 and float(e32[0]) >= 2.0**-126)

    def _dev(self, target: np.ndarray) -> float:
        """max |T_i − target_i| over the edges, with the current offset."""
        t = self._t(torch.log2(self.edges_t), torch.empty(self.n + 1))
        return float(np.abs(t.double().numpy() - target).max())

    def _t(self, log2a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """t from log2 |s| (one fused multiply-add); zeros (log2 = −inf) clamp to 1/2: bin 0."""
        t = torch.add(torch.tensor(self.offset), log2a, alpha=self.scale, out=out)
        return t.clamp_(0.5, self.n + 1.5)

    def counts(self, a: torch.Tensor) -> np.ndarray:
        """Entries per ``bucketize(right=True)`` bin of ``a``, int64 [n + 2]."""
        n2 = self.n + 2
        if self.exact:
            return torch.bincount(bin_abs(a, self.edges_t), minlength=n2).numpy()
        m, buf = a.numel(), self.scratch.get
        t = torch.log2(a, out=buf("t", m))
        t = self._t(t, t)
        g = buf("g", m, torch.int32).copy_(t)  # t >= 1/2: truncation is the floor
        full = torch.bincount(g, minlength=n2).numpy()
        frac = torch.frac(t, out=buf("frac", m)).numpy()
        near_mask = np.less_equal(frac, 2 * self.delta, out=buf("near", m, torch.bool).numpy())
        near = np.flatnonzero(near_mask)
        if near.size:
            exact = bin_abs(a[torch.from_numpy(near)], self.edges_t).numpy()
            gn = g.numpy()[near]
            full += np.bincount(exact, minlength=n2) - np.bincount(gn, minlength=n2)
        return full


def _histogram_pass(
    scores, names: list[str], chunk_elems: int, edges: np.ndarray | None, n_bins: int
) -> np.ndarray:
    """Pass 2: counts of the positive finite |s| per tensor and log bin (the maximum in
    the last bin); all zero when no entry is positive."""
    counts = np.zeros((len(names), n_bins), dtype=np.int64)
    if edges is None:
        return counts
    binner = _LogBinner(edges)
    for p, name in enumerate(names):
        for x, _, _, _ in _finite_chunks(scores, name, chunk_elems):
            full = binner.counts(torch.abs(x, out=binner.scratch.get("a", x.numel())))
            counts[p] += full[1 : n_bins + 1]
            counts[p, -1] += full[n_bins + 1]  # the maximum itself
    return counts


def _stats_block(mom: _Moments, count: int, nz: int, nnf: int, quantiles: dict) -> dict:
    """One summary (a tensor or the whole population)."""
    return {
        "count": int(count),
        "mean": mom.mean if mom.n else None,
        "std": math.sqrt(mom.m2 / mom.n) if mom.n else None,
        "min": mom.min if mom.n else None,
        "max": mom.max if mom.n else None,
        "abs_mean": mom.abs_sum / mom.n if mom.n else None,
        "n_zero": int(nz),
        "n_nonfinite": int(nnf),
        "abs_quantiles": quantiles,
    }


def _selection_counts(selection: Selection | None, names: list[str]) -> np.ndarray | None:
    """The selection's draw-0 entries per tensor (None without a selection)."""
    if selection is None:
        return None
    if list(selection.params) != names:
        raise UsageError("The selection was made from scores with other parameters.")
    return selection.per_tensor_counts(0)


def _topk_share(sel_counts: np.ndarray, p: int) -> dict:
    """The selection's entries in tensor `p` and their share of the selection."""
    sel_total = int(sel_counts.sum())
    return {
        "topk_count": int(sel_counts[p]),
        "topk_share": float(sel_counts[p]) / sel_total if sel_total else 0.0,
    }
