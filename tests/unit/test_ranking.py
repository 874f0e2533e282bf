"""Streaming top-K / bottom-K against a stable sort of the concatenation, and score stats.

The reference is `np.argsort(-key, kind="stable")` over all scores concatenated in parameter
order: exactly the definition in the SPEC (ties by parameter position, then flat index).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwa.errors import CwaError, UsageError
from cwa.ranking import DictScores, bottomk, rank_with_stats, sensitivity_stats, topk

# ----------------------------------------------------------------------------- reference


def _concat(tensors: dict[str, torch.Tensor]):
    flat = [t.reshape(-1).double().numpy() for t in tensors.values()]
    sizes = [len(f) for f in flat]
    pidx = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    fidx = np.concatenate([np.arange(n) for n in sizes])
    return np.concatenate(flat), pidx, fidx


def _key(x: np.ndarray, rank_by: str) -> np.ndarray:
    return np.abs(x) if rank_by == "abs" else x


def _ref_global(tensors, k, rank_by, lowest=False):
    vals, pidx, fidx = _concat(tensors)
    key = _key(vals, rank_by)
    order = np.argsort(key if lowest else -key, kind="stable")[:k]
    ties = int((key == key[order[-1]]).sum())
    return pidx[order], fidx[order], vals[order], ties


def _ref_per_layer(tensors, k, rank_by, lowest=False):
    ps, fs, vs, ties = [], [], [], 0
    for i, t in enumerate(tensors.values()):
        x = t.reshape(-1).double().numpy()
        key = _key(x, rank_by)
        order = np.argsort(key if lowest else -key, kind="stable")[:k]
        if len(x) > k:
            ties += int((key == key[order[-1]]).sum())
        ps.append(np.full(len(order), i))
        fs.append(order)
        vs.append(x[order])
    return np.concatenate(ps), np.concatenate(fs), np.concatenate(vs), ties


def _check(sel, ref):
    p, f, v, ties = ref
    d = sel.draws[0]
    np.testing.assert_array_equal(d.param_index, p)
    np.testing.assert_array_equal(d.flat_index, f)
    np.testing.assert_array_equal(d.score, v.astype(np.float32))
    assert sel.ties_at_k == ties
    assert d.param_index.dtype == np.int32 and d.flat_index.dtype == np.int64
    assert d.score.dtype == np.float32


def _tensors(rng: np.random.Generator, shapes, integer: bool):
    out = {}
    for i, shape in enumerate(shapes):
        if integer:  # few distinct values: many ties, signed
            x = rng.integers(-4, 5, size=shape).astype(np.float32)
        else:
            x = rng.standard_normal(size=shape).astype(np.float32)
        out[f"layer{i}.weight"] = torch.from_numpy(x)
    return out


SHAPES = [(7, 5), (3,), (4, 2, 3), (1, 1), (20,), (6, 6)]


# ----------------------------------------------------------------------------- top-K


@pytest.mark.parametrize("rank_by", ["abs", "value"])
@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 8, 2**24])
def test_global_topk_equals_stable_sort(rank_by, integer, chunk):
    rng = np.random.default_rng(1)
    tensors = _tensors(rng, SHAPES, integer)
    n = sum(t.numel() for t in tensors.values())
    scores = DictScores(tensors, metric="m")
    for k in (1, 2, 5, 21, 40, n - 1, n):
        sel = topk(scores, k, rank_by=rank_by, chunk_elems=chunk)
        _check(sel, _ref_global(tensors, k, rank_by))
        assert sel.kind == "topk" and sel.k == k and sel.metric == "m"
        assert sel.params == list(tensors)


@pytest.mark.parametrize("rank_by", ["abs", "value"])
@pytest.mark.parametrize("chunk", [2, 5, 2**24])
def test_global_bottomk_equals_stable_sort(rank_by, chunk):
    rng = np.random.default_rng(2)
    tensors = _tensors(rng, SHAPES, integer=True)
    scores = DictScores(tensors)
    for k in (1, 4, 17, 50):
        sel = bottomk(scores, k, rank_by=rank_by, chunk_elems=chunk)
        _check(sel, _ref_global(tensors, k, rank_by, lowest=True))
        assert sel.kind == "bottom_k"


@pytest.mark.parametrize("rank_by", ["abs", "value"])
@pytest.mark.parametrize("lowest", [False, True])
def test_per_layer_equals_per_tensor_sort(rank_by, lowest):
    rng = np.random.default_rng(3)
    tensors = _tensors(rng, SHAPES, integer=True)
    scores = DictScores(tensors)
    fn = bottomk if lowest else topk
    for k in (1, 3, 10, 36, 100):  # 10 > some tensors: those are taken whole
        sel = fn(scores, k, mode="per_layer", rank_by=rank_by, chunk_elems=4)
        _check(sel, _ref_per_layer(tensors, k, rank_by, lowest))
        assert sel.mode == "per_layer"
        counts = [min(k, t.numel()) for t in tensors.values()]
        assert sel.info["per_tensor_counts"] == [counts]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    n_values=st.integers(1, 6),
    chunk=st.integers(1, 12),
    data=st.data(),
)
def test_hypothesis_topk_and_bottomk(shapes, n_values, chunk, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tensors = {
        f"t{i}": torch.from_numpy(rng.integers(-n_values, n_values + 1, size=s).astype(np.float32))
        for i, s in enumerate(shapes)
    }
    n = sum(shapes)
    k = data.draw(st.integers(1, n))
    rank_by = data.draw(st.sampled_from(["abs", "value"]))
    scores = DictScores(tensors)
    _check(topk(scores, k, rank_by=rank_by, chunk_elems=chunk), _ref_global(tensors, k, rank_by))
    _check(
        bottomk(scores, k, rank_by=rank_by, chunk_elems=chunk),
        _ref_global(tensors, k, rank_by, lowest=True),
    )
    _check(
        topk(scores, k, mode="per_layer", rank_by=rank_by, chunk_elems=chunk),
        _ref_per_layer(tensors, k, rank_by),
    )


def test_all_equal_scores_tie_break_by_position():
    tensors = {"a": torch.ones(4, 3), "b": torch.ones(5)}
    sel = topk(DictScores(tensors), 6, chunk_elems=2)
    d = sel.draws[0]
    assert d.param_index.tolist() == [0] * 6
    assert d.flat_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert sel.ties_at_k == 17
    sel = topk(DictScores(tensors), 14, chunk_elems=5)
    assert sel.draws[0].param_index.tolist() == [0] * 12 + [1, 1]
    assert sel.draws[0].flat_index.tolist()[-2:] == [0, 1]


def test_ties_counted_across_chunks_and_tensors():
    # the K-th key (2) appears in three tensors, partly rejected early by the threshold
    tensors = {
        "a": torch.tensor([2.0, 5.0, 2.0, 1.0]),
        "b": torch.tensor([3.0, 2.0, 2.0]),
        "c": torch.tensor([2.0, -2.0, 0.0, 4.0]),
    }
    for chunk in (1, 2, 3, 100):
        sel = topk(DictScores(tensors), 4, chunk_elems=chunk)
        assert sel.ties_at_k == 6  # every |2| in the population
        assert sel.info["kth_key"] == 2.0
        sel_v = topk(DictScores(tensors), 4, rank_by="value", chunk_elems=chunk)
        assert sel_v.ties_at_k == 5  # -2 is not tied by value


def test_inf_ranks_highest_and_neg_inf_by_value_lowest():
    tensors = {
        "a": torch.tensor([1.0, float("-inf"), 3.0]),
        "b": torch.tensor([float("inf"), 2.0]),
    }
    s = DictScores(tensors)
    d = topk(s, 2, chunk_elems=1).draws[0]
    assert list(zip(d.param_index, d.flat_index, strict=True)) == [(0, 1), (1, 0)]
    assert np.isinf(d.score).all()
    d = topk(s, 1, rank_by="value").draws[0]
    assert (d.param_index[0], d.flat_index[0]) == (1, 0)
    d = bottomk(s, 1, rank_by="value").draws[0]
    assert (d.param_index[0], d.flat_index[0]) == (0, 1)
    d = bottomk(s, 5, rank_by="abs").draws[0]  # infinities come last
    assert np.isinf(d.score[-2:]).all()


def test_score_is_raw_signed():
    s = DictScores({"a": torch.tensor([-5.0, 1.0, 4.0])})
    d = topk(s, 2).draws[0]
    assert d.score.tolist() == [-5.0, 4.0]


def test_nan_raises_naming_the_tensor():
    tensors = {"good": torch.ones(3), "blocks.1.attn.weight": torch.tensor([1.0, float("nan")])}
    for mode in ("global", "per_layer"):
        with pytest.raises(CwaError, match=r"blocks\.1\.attn\.weight"):
            topk(DictScores(tensors), 2, mode=mode)
    with pytest.raises(CwaError, match="NaN"):
        bottomk(DictScores(tensors), 1, chunk_elems=1)


def test_invalid_k_and_options():
    s = DictScores({"a": torch.ones(3, 2), "b": torch.ones(4)})
    for k in (0, -1):
        with pytest.raises(UsageError):
            topk(s, k)
    with pytest.raises(UsageError, match=r"11.*10|10.*11"):
        topk(s, 11)
    with pytest.raises(UsageError):
        bottomk(s, 11)
    topk(s, 11, mode="per_layer")  # per tensor: whole tensors, no error
    with pytest.raises(UsageError):
        topk(s, 2, mode="blockwise")
    with pytest.raises(UsageError):
        topk(s, 2, rank_by="square")


def test_large_k_multiple_compactions():
    rng = np.random.default_rng(5)
    tensors = {
        f"w{i}": torch.from_numpy(rng.integers(0, 50, size=400).astype(np.float32))
        for i in range(6)
    }
    for k in (7, 150, 999):
        _check(topk(DictScores(tensors), k, chunk_elems=64), _ref_global(tensors, k, "abs"))


# ----------------------------------------------------------------------------- stats


def test_sensitivity_stats_against_numpy():
    rng = np.random.default_rng(7)
    tensors = {
        "a": torch.from_numpy((rng.standard_normal((60, 50)) * 3).astype(np.float32)),
        "b": torch.from_numpy(rng.lognormal(0, 2, size=2000).astype(np.float32)),
        "c": torch.from_numpy(np.zeros(40, dtype=np.float32)),
    }
    tensors["a"][0, :5] = 0.0
    tensors["b"][:3] = float("inf")
    scores = DictScores(tensors, metric="m")
    before = {n: t.clone() for n, t in tensors.items()}
    sel = topk(scores, 100, rank_by="value")
    stats, hist = sensitivity_stats(scores, sel, n_bins=64, chunk_elems=256)
    for n, t in tensors.items():  # the scores are read, never modified
        assert torch.equal(t, before[n])

    def check(block, x):
        finite = x[np.isfinite(x)]
        assert block["count"] == x.size
        assert block["n_nonfinite"] == x.size - finite.size
        assert block["n_zero"] == int((finite == 0).sum())
        assert math.isclose(block["mean"], finite.mean(), rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(block["std"], finite.std(), rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(block["abs_mean"], np.abs(finite).mean(), rel_tol=1e-6)
        assert block["min"] == finite.min() and block["max"] == finite.max()
        edges = hist["edges"]
        for q, est in block["abs_quantiles"].items():
            ref = np.quantile(np.abs(finite), float(q), method="inverted_cdf")
            if ref == 0:
                assert est == 0
            else:  # in the bin of the exact quantile: accurate to one bin width
                b = min(np.searchsorted(edges, ref, side="right") - 1, len(edges) - 2)
                assert edges[b] <= est <= edges[b + 1], (q, est, ref)

    all_x = np.concatenate([t.reshape(-1).double().numpy() for t in tensors.values()])
    check(stats["overall"], all_x)
    for name, t in tensors.items():
        if name != "c":
            check(stats["per_tensor"][name], t.reshape(-1).double().numpy())
    c = stats["per_tensor"]["c"]
    assert c["n_zero"] == 40 and c["std"] == 0.0
    assert all(v == 0 for v in c["abs_quantiles"].values())

    # top-K share and the histograms
    counts = np.bincount(sel.draws[0].param_index, minlength=3)
    for p, name in enumerate(tensors):
        assert stats["per_tensor"][name]["topk_count"] == counts[p]
        assert math.isclose(stats["per_tensor"][name]["topk_share"], counts[p] / 100)
    pos = np.abs(all_x[np.isfinite(all_x) & (all_x != 0)])
    assert hist["edges"][0] == pos.min() and hist["edges"][-1] == pos.max()
    ref_edges = np.geomspace(pos.min(), pos.max(), 65)
    # log-spaced: the inner edges are the nearest cells of the float32 bit grid (bits >> 16)
    np.testing.assert_allclose(hist["edges"], ref_edges, rtol=2**-8)
    assert np.all(hist["edges"] == hist["edges"].astype(np.float32))
    inner_bits = hist["edges"][1:-1].astype(np.float32).view(np.int32)
    assert np.all(inner_bits % 2**16 == 0) and np.all(np.diff(hist["edges"]) > 0)
    assert hist["counts"].shape == (3, 64)
    for p, t in enumerate(tensors.values()):
        x = np.abs(t.reshape(-1).double().numpy())
        x = x[np.isfinite(x) & (x > 0)]
        ref_counts, _ = np.histogram(x, bins=hist["edges"])  # last bin closed, as ours
        np.testing.assert_array_equal(hist["counts"][p], ref_counts)
    assert hist["zeros"].tolist() == [5, 0, 40]
    assert hist["nonfinite"].tolist() == [0, 3, 0]
    import json

    json.dumps(stats)  # the stats part is JSON-able as is


def test_stats_no_cancellation_with_a_large_offset():
    rng = np.random.default_rng(8)
    x = (1e4 + rng.standard_normal(50_000) * 0.05).astype(np.float32)
    stats, _ = sensitivity_stats(DictScores({"a": torch.from_numpy(x)}), chunk_elems=4096)
    ref = x.astype(np.float64)
    assert math.isclose(stats["overall"]["mean"], ref.mean(), rel_tol=1e-12)
    assert math.isclose(stats["overall"]["std"], ref.std(), rel_tol=1e-6)


# ----------------------------------------------------------------------------- threshold filter


def _filter_tensors():
    """Chunks of 4 after a first one that sets a threshold of |3|: chunks entirely below
    it (skipped by one reduction), chunks whose top equals it (ties only), chunks with a
    few entrants among ties, +-inf late, zeros throughout."""
    return {
        "a": torch.tensor([3.0, -3.0, 3.0, 3.0, 1.0, 0.0, -2.0, 0.5, 3.0, -3.0, 0.0, 2.0]),
        "b": torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0, 3.0, -3.0, 1.0, -3.0, 2.0, 3.0, 3.0]),
        "c": torch.tensor([1.0, float("inf"), 3.0, 0.0, float("-inf"), 3.0, -5.0, 3.0, 0.0]),
    }


@pytest.mark.parametrize("rank_by", ["abs", "value"])
@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 64])
def test_threshold_filter_against_sort(rank_by, lowest, chunk):
    tensors = _filter_tensors()
    scores, fn = DictScores(tensors), (bottomk if lowest else topk)
    n = sum(t.numel() for t in tensors.values())
    for k in (1, 2, 3, 4, 6, 9, n):
        sel = fn(scores, k, rank_by=rank_by, chunk_elems=chunk)
        _check(sel, _ref_global(tensors, k, rank_by, lowest))
    for k in (1, 2, 4, 7):
        sel = fn(scores, k, mode="per_layer", rank_by=rank_by, chunk_elems=chunk)
        _check(sel, _ref_per_layer(tensors, k, rank_by, lowest))


def test_threshold_filter_many_chunks_of_random_ties():
    # integer scores: every chunk after the first compaction has entries equal to the
    # running threshold, most chunks have none above it
    rng = np.random.default_rng(11)
    x = rng.integers(-6, 7, size=5000).astype(np.float32)
    x[rng.integers(0, 5000, size=3)] = 9.0  # a few late entrants
    tensors = {"a": torch.from_numpy(x[:3000]), "b": torch.from_numpy(x[3000:])}
    for rank_by in ("abs", "value"):
        for lowest in (False, True):
            fn = bottomk if lowest else topk
            for k in (2, 3, 50, 700):
                sel = fn(DictScores(tensors), k, rank_by=rank_by, chunk_elems=16)
                _check(sel, _ref_global(tensors, k, rank_by, lowest))


@pytest.mark.parametrize("group", [1, 8, 64])
def test_group_filter_against_sort(monkeypatch, group):
    # blocks of many groups, whose lengths are not multiples of the group size (a tail
    # compared entry by entry), integer scores (ties at the threshold inside groups),
    # groups partly above the threshold, and a late tensor of entrants
    import cwa.ranking as R

    monkeypatch.setattr(R, "GROUP_ELEMS", group)
    rng = np.random.default_rng(5)
    tensors = {
        "a": torch.from_numpy(rng.integers(-20, 21, size=2999).astype(np.float32)),
        "b": torch.from_numpy(rng.standard_normal(1001).astype(np.float32) * 10),
        "c": torch.from_numpy(rng.integers(-30, 31, size=517).astype(np.float32)),
    }
    for rank_by in ("abs", "value"):
        for lowest in (False, True):
            fn = bottomk if lowest else topk
            for chunk in (100, 257, 1000):
                for k in (1, 7, 60, 400):
                    sel = fn(DictScores(tensors), k, rank_by=rank_by, chunk_elems=chunk)
                    _check(sel, _ref_global(tensors, k, rank_by, lowest))
                sel = fn(DictScores(tensors), 30, mode="per_layer", rank_by=rank_by, chunk_elems=chunk)
                _check(sel, _ref_per_layer(tensors, 30, rank_by, lowest))
    for chunk in (100, 257):
        sel, _, _ = rank_with_stats(DictScores(tensors), 60, chunk_elems=chunk)
        _check(sel, _ref_global(tensors, 60, "abs"))


def test_nan_in_a_chunk_below_the_threshold_still_raises():
    # the threshold (100) skips chunks whose largest key is below it: a NaN must not hide
    x = torch.cat([torch.full((8,), 100.0), torch.zeros(8), torch.tensor([0.1, float("nan")])])
    for lowest in (False, True):
        for rank_by in ("abs", "value"):
            with pytest.raises(CwaError, match="NaN"):
                (bottomk if lowest else topk)(DictScores({"a": x}), 2, rank_by=rank_by, chunk_elems=4)


def _passing_blocks(rank_by: str, lowest: bool, n: int) -> torch.Tensor:
    """Scores whose every block ranks above all earlier ones, so that each block reaches
    the running threshold (the top-K then skips its first reduction)."""
    up = torch.arange(1, n + 1, dtype=torch.float32)
    if rank_by == "abs":
        up = up * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)  # both signs
        return up.flip(0) if lowest else up
    return -up if lowest else up


@pytest.mark.parametrize("where", ["group", "tail"])
def test_nan_in_a_block_that_skips_the_first_reduction_still_raises(where):
    # blocks of 61 entries: 7 groups of 8 and a tail of 5; every block reaches the
    # threshold, so the group keys (or the tail) are the only check the NaN meets
    for rank_by in ("abs", "value"):
        for lowest in (False, True):
            x = _passing_blocks(rank_by, lowest, 61 * 40)
            x[61 * 30 + (3 if where == "group" else 58)] = float("nan")
            fn = bottomk if lowest else topk
            with pytest.raises(CwaError, match="NaN"):
                fn(DictScores({"a": x}), 5, rank_by=rank_by, chunk_elems=61)
            x[61 * 30 + (3 if where == "group" else 58)] = 0.5
            _check(fn(DictScores({"a": x}), 5, rank_by=rank_by, chunk_elems=61),
                   _ref_global({"a": x}, 5, rank_by, lowest))


def test_rank_order_is_a_stable_descending_sort():
    from cwa.ranking import rank_order

    special = torch.tensor([-0.0, 0.0, 1.0, -1.0, float("inf"), float("-inf"), 1.0, -0.0,
                            2.5, -2.5, 0.0, 1e-45, -1e-45, 3.4e38, -3.4e38])
    rng = np.random.default_rng(11)
    for x in [special, special[:1], torch.from_numpy(rng.integers(-4, 5, 3001).astype(np.float32) / 2),
              torch.from_numpy(rng.standard_normal(4096).astype(np.float32))]:
        want = np.argsort(-x.numpy().astype(np.float64), kind="stable")  # -0.0 == 0.0: ties
        assert np.array_equal(rank_order(x).numpy(), want)


def test_ranking_runs_torch_on_one_thread_per_lane_and_restores_the_count(two_lanes):
    R, lanes_of = two_lanes
    seen = []

    class Spy(DictScores):
        def chunks(self, *args, **kwargs):
            seen.append(torch.get_num_threads())
            yield from super().chunks(*args, **kwargs)

    before = torch.get_num_threads()
    caller = 3
    torch.set_num_threads(caller)
    try:
        sc = Spy({"a": torch.randn(3000), "b": torch.randn(40)})
        topk(sc, 5, chunk_elems=64)
        rank_with_stats(sc, 5, chunk_elems=64)
        sensitivity_stats(sc, chunk_elems=64)
        assert torch.get_num_threads() == caller
        with pytest.raises(CwaError, match="NaN"):
            topk(Spy({"a": torch.tensor([1.0, float("nan")])}), 1)
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert len(set(lanes_of)) == 2  # both lanes took spans


@pytest.fixture
def two_lanes(monkeypatch):
    """Two lanes and spans of 256 entries (with chunk_elems=64), each lane made to take
    one span before either goes on (so both lanes always work); yields (the module, the
    thread name of every span fed, in feeding order)."""
    import threading

    import cwa.ranking as R

    monkeypatch.setattr(R, "RANK_THREADS", 2)
    monkeypatch.setattr(R, "SPAN_ELEMS", 256)
    names: list[str] = []
    met: set[str] = set()
    barrier = threading.Barrier(2, timeout=10)
    real_span, real_run = R._stream_span, R._run_lanes

    def span(*args, **kwargs):
        me = threading.current_thread().name
        names.append(me)
        if barrier.parties and me not in met:
            met.add(me)
            barrier.wait()  # both lanes have a span in hand
        return real_span(*args, **kwargs)

    def run(units, n_lanes, work):
        nonlocal barrier
        met.clear()
        barrier = threading.Barrier(n_lanes if n_lanes == 2 else 0, timeout=10)
        return real_run(units, n_lanes, work)

    monkeypatch.setattr(R, "_stream_span", span)
    monkeypatch.setattr(R, "_run_lanes", run)
    yield R, names


def _lane_tensors():
    rng = np.random.default_rng(5)
    return {  # spans of 256: "a" and "c" are split, ties (integers) across spans and lanes
        "a": torch.from_numpy(rng.integers(-6, 7, size=(40, 60)).astype(np.float32)),
        "b": torch.from_numpy(rng.standard_normal(70).astype(np.float32)),
        "c": torch.from_numpy(np.concatenate([rng.standard_normal(1500) * 3,
                                              np.zeros(100), np.full(50, 6)]).astype(np.float32)),
    }


def test_two_lanes_rank_exactly_and_their_statistics_equal_one_lanes(two_lanes, monkeypatch):
    """Spans of a tensor ranked on two lanes at once: the exact stable-sort top/bottom-K,
    global and per layer, ties included, and statistics identical to one lane's, to the
    last bit (the moments are merged span by span in position order)."""
    R, lanes_of = two_lanes
    tensors = _lane_tensors()
    got = {}
    for n_lanes in (2, 1):
        monkeypatch.setattr(R, "RANK_THREADS", n_lanes)
        for rank_by in ("abs", "value"):
            for lowest in (False, True):
                for k in (7, 300, 2000):
                    fn = bottomk if lowest else topk
                    _check(fn(DictScores(tensors), k, rank_by=rank_by, chunk_elems=64),
                           _ref_global(tensors, k, rank_by, lowest))
                    _check(fn(DictScores(tensors), k, mode="per_layer", rank_by=rank_by, chunk_elems=64),
                           _ref_per_layer(tensors, k, rank_by, lowest))
        lanes_of.clear()
        for mode in ("global", "per_layer"):
            sel, st, hist = rank_with_stats(DictScores(tensors), 300, mode=mode, chunk_elems=64)
            got[n_lanes, mode] = (sel, st, hist)
        assert len(set(lanes_of)) == n_lanes
    for mode in ("global", "per_layer"):
        (s2, st2, h2), (s1, st1, h1) = got[2, mode], got[1, mode]
        assert st2 == st1  # floats compared exactly
        for key in ("counts", "zeros", "nonfinite", "edges"):
            np.testing.assert_array_equal(h2[key], h1[key])
        np.testing.assert_array_equal(s2.draws[0].flat_index, s1.draws[0].flat_index)
    ref = np.concatenate([t.reshape(-1).double().numpy() for t in tensors.values()])
    assert math.isclose(got[2, "global"][1]["overall"]["std"], ref.std(), rel_tol=1e-7)


def test_ties_split_between_lanes_go_to_the_earliest_positions_and_are_all_counted(two_lanes):
    """8192 equal keys in 32 spans, about half on each lane, each lane compacting (and
    rejecting ties) on its own: the top-1000 is positions 0..999 and ties_at_k counts all
    8192 (a merge out of position order, or one that drops a lane's rejected ties, would
    miss)."""
    R, lanes_of = two_lanes
    x = torch.ones(8192)
    for fn in (topk, bottomk):
        sel = fn(DictScores({"w": x}), 1000, chunk_elems=64)
        np.testing.assert_array_equal(sel.draws[0].flat_index, np.arange(1000))
        assert sel.ties_at_k == 8192
    assert len(set(lanes_of)) == 2


def test_lanes_on_a_scores_file_and_a_source_without_ranges_agree(two_lanes, tmp_path, monkeypatch):
    """A scores file read in spans on two lanes (mapped windows, and plain reads), and a
    source whose `chunks` takes no range (whole tensors per lane) rank and summarize the
    same as the tensors in memory."""
    from cwa import artifacts as A

    R, lanes_of = two_lanes
    tensors = _lane_tensors()

    class Whole:  # chunks(name, n) only: no spans
        def __init__(self, t):
            self.inner = DictScores(t)
            self.names = self.inner.names

        def shape(self, name):
            return self.inner.shape(name)

        def get(self, name):
            return self.inner.get(name)

        def chunks(self, name, chunk_elems):
            yield from self.inner.chunks(name, chunk_elems)

    want = rank_with_stats(DictScores(tensors), 300, chunk_elems=64)
    sc = A.open_scores(A.write_scores(tmp_path / "s.safetensors", tensors, {}))
    sc.verify()
    for source, map_bytes in ((sc, A.MAP_BYTES), (sc, 0), (Whole(tensors), A.MAP_BYTES)):
        monkeypatch.setattr(A, "MAP_BYTES", map_bytes)
        got = rank_with_stats(source, 300, chunk_elems=64)
        np.testing.assert_array_equal(got[0].draws[0].flat_index, want[0].draws[0].flat_index)
        np.testing.assert_array_equal(got[0].draws[0].param_index, want[0].draws[0].param_index)
        assert got[0].ties_at_k == want[0].ties_at_k
        assert {**got[1], "metric": ""} == {**want[1], "metric": ""}
        np.testing.assert_array_equal(got[2]["counts"], want[2]["counts"])


def test_an_error_on_any_lane_is_raised_and_the_earliest_span_wins(two_lanes, monkeypatch):
    """NaN at the end of the first tensor and at the start of the second, one span each,
    one per lane: the second lane fails first, but the first lane finishes its span (it
    comes before the failure) and its error, the earliest in position order, is raised."""
    R, lanes_of = two_lanes
    monkeypatch.setattr(R, "SPAN_ELEMS", 1 << 20)
    t = {"a": torch.randn(64 * 200), "b": torch.randn(200), "c": torch.randn(100)}
    t["a"][-1] = float("nan")
    t["b"][0] = float("nan")
    for _ in range(3):
        with pytest.raises(CwaError, match="'a'"):
            rank_with_stats(DictScores(t), 5, chunk_elems=64)
        assert set(lanes_of[-2:]) == {"MainThread", "cwa-rank-1"}


def test_an_interrupt_of_the_caller_stops_every_lane(monkeypatch):
    import threading

    import cwa.ranking as R

    monkeypatch.setattr(R, "RANK_THREADS", 2)
    monkeypatch.setattr(R, "SPAN_ELEMS", 64)
    fed = []
    real = R._stream_span

    def span(*args, **kwargs):
        fed.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread() and len(fed) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_stream_span", span)
    with pytest.raises(KeyboardInterrupt):
        topk(DictScores({"w": torch.randn(64 * 400)}), 5, chunk_elems=64)
    assert not [t for t in threading.enumerate() if t.name.startswith("cwa-rank")]
    assert len(fed) < 400  # the other lane stopped too


def test_ranking_a_file_first_read_is_one_lane_of_whole_tensors(tmp_path, monkeypatch):
    """The first read of a scores file hashes it on a thread of its own, tensor by tensor:
    ranking then runs one lane of whole tensors; once the file is verified, two lanes of
    spans."""
    import functools
    import threading

    import cwa.ranking as R
    from cwa import artifacts as A

    monkeypatch.setattr(R, "RANK_THREADS", 2)
    monkeypatch.setattr(R, "SPAN_ELEMS", 256)
    tensors = {"a": torch.randn(3000), "b": torch.randn(2000)}
    sc = A.open_scores(A.write_scores(tmp_path / "s.safetensors", tensors, {}))
    seen, chunks = [], sc.chunks

    @functools.wraps(chunks)
    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, kwargs.get("start", 0), kwargs.get("stop")))
        yield from chunks(*args, **kwargs)

    sc.chunks = spy
    assert sc.needs_hashing()
    first = topk(sc, 5, chunk_elems=64)
    assert not sc.needs_hashing()
    assert seen == [("MainThread", 0, None)] * 2
    seen.clear()
    again = rank_with_stats(sc, 5, chunk_elems=64)[0]
    assert len(seen) == 12 + 8 and all(s[2] is not None for s in seen)  # spans of 256
    assert np.array_equal(first.draws[0].flat_index, again.draws[0].flat_index)


@pytest.fixture
def small_sample(monkeypatch):
    """A sample floor for populations of thousands (the defaults need millions)."""
    import cwa.ranking as R

    monkeypatch.setattr(R, "SAMPLE_RUNS", 64)
    monkeypatch.setattr(R, "SAMPLE_LEN", 4)
    monkeypatch.setattr(R, "RANK_THREADS", 1)  # one stream per pass (lanes: test_lanes_*)
    return R


def _floor_tensors():
    rng = np.random.default_rng(21)
    return {  # ties (integers), a scale that grows along the order, a late block of entrants
        "a": torch.from_numpy(rng.integers(-9, 10, size=(30, 70)).astype(np.float32)),
        "b": torch.from_numpy(rng.standard_normal(2500).astype(np.float32) * 4),
        "c": torch.from_numpy(np.concatenate([rng.integers(-12, 13, 1400), np.full(60, 40)]).astype(np.float32)),
    }


def test_sample_floor_is_used_and_exact(small_sample):
    R = small_sample
    tensors = _floor_tensors()
    sizes = R.population_sizes(DictScores(tensors))
    for rank_by in ("abs", "value"):
        for lowest in (False, True):
            for k in (150, 300, 500):
                floor = R._sample_floor(DictScores(tensors), list(tensors), sizes, k, rank_by, lowest)
                assert floor is not None  # the floor path is what this test is about
                fn = bottomk if lowest else topk
                for chunk in (16, 64, 500):  # 16: over 256 pieces, joined
                    _check(fn(DictScores(tensors), k, rank_by=rank_by, chunk_elems=chunk),
                           _ref_global(tensors, k, rank_by, lowest))
            sel, _, _ = rank_with_stats(DictScores(tensors), 150, rank_by=rank_by, chunk_elems=64)
            _check(sel, _ref_global(tensors, 150, rank_by))


def test_a_floor_too_high_streams_again_and_stays_exact(small_sample, monkeypatch):
    # a floor that fewer than K entries reach (but some do): the top-K is streamed again
    # without one, and the statistics (fed by the first pass) are not counted twice
    R = small_sample
    tensors = _floor_tensors()
    k = 300
    streams = []
    real = R._TopKStream

    class Counting(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            streams.append(self)

    monkeypatch.setattr(R, "_TopKStream", Counting)
    vals = _concat(tensors)[0]
    for rank_by in ("abs", "value"):
        for lowest in (False, True):
            key = _key(vals, rank_by) * (-1 if lowest else 1)
            distinct = np.unique(key)
            reach = np.array([np.count_nonzero(key >= v) for v in distinct])
            floor = float(distinct[reach < k].min())  # the lowest floor fewer than K reach
            monkeypatch.setattr(R, "_sample_floor", lambda *a, f=floor: f)
            streams.clear()
            fn = bottomk if lowest else topk
            _check(fn(DictScores(tensors), k, rank_by=rank_by, chunk_elems=64),
                   _ref_global(tensors, k, rank_by, lowest))
            assert streams[0].floor == floor and 0 < streams[0].entered < k
            assert len(streams) == 2 and streams[1].floor is None
            if rank_by == "abs" and not lowest:
                sel, st, hist = rank_with_stats(DictScores(tensors), k, chunk_elems=64)
                _check(sel, _ref_global(tensors, k, "abs"))
                want, want_hist = sensitivity_stats(DictScores(tensors), sel, chunk_elems=64)
                assert st == want
                np.testing.assert_array_equal(hist["counts"], want_hist["counts"])


def test_a_floor_at_the_kth_key_needs_one_pass_and_skips_blocks_below_it(small_sample, monkeypatch):
    # 50 blocks of 64 entries below the floor, then 10 with ties at the K-th key (the
    # floor itself): entries equal to the floor enter, so one pass suffices, and the
    # blocks below it are never offered to the stream
    R = small_sample
    low = np.full(50 * 64, 0.5, dtype=np.float32)
    high = np.tile(np.arange(1, 65, dtype=np.float32) % 8, 10)  # keys 0..7, many ties
    tensors = {"a": torch.from_numpy(np.concatenate([low, high]))}
    k = 100
    kth = float(np.sort(np.concatenate([low, high]))[::-1][k - 1])
    assert np.count_nonzero(high == kth) > 1  # ties at the K-th key
    monkeypatch.setattr(R, "_sample_floor", lambda *a: kth)
    streams, fed = [], []
    real = R._TopKStream

    class Counting(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            streams.append(self)

        def feed(self, start, raw, key):
            fed.append(start)
            return super().feed(start, raw, key)

    monkeypatch.setattr(R, "_TopKStream", Counting)
    _check(topk(DictScores(tensors), k, rank_by="value", chunk_elems=64),
           _ref_global(tensors, k, "value"))
    assert len(streams) == 1 and streams[0].complete
    assert min(fed) >= 50 * 64 and len(fed) == 10


def test_sample_floor_from_a_scores_file(small_sample, tmp_path, monkeypatch):
    # the floor of a file's top-K comes from its `sample_runs` (plain reads of the runs),
    # and ranking the file equals ranking the same tensors in memory
    from cwa.artifacts import open_scores, write_scores

    R = small_sample
    tensors = _floor_tensors()
    sc = open_scores(write_scores(tmp_path / "s.safetensors", tensors, {}))
    floors = []
    real = R._sample_floor
    monkeypatch.setattr(R, "_sample_floor", lambda *a: floors.append(real(*a)) or floors[-1])
    for lowest in (False, True):
        sel = (bottomk if lowest else topk)(sc, 300, chunk_elems=64)
        _check(sel, _ref_global(tensors, 300, "abs", lowest))
    assert len(floors) == 2 and None not in floors


def test_many_small_pieces_under_a_floor_are_joined_exactly(small_sample, monkeypatch):
    # 700 blocks of 8, one entrant each above the floor: 700 pieces and no compaction
    # (K < 700 <= 2K); the buffer joins its pieces along the way, losing none
    R = small_sample
    x = np.zeros((700, 8), dtype=np.float32)
    x[np.arange(700), np.arange(700) % 8] = 10 + np.random.default_rng(3).permutation(700)
    tensors = {"a": torch.from_numpy(x.reshape(-1))}
    monkeypatch.setattr(R, "_sample_floor", lambda *a: 5.0)
    _check(topk(DictScores(tensors), 400, rank_by="value", chunk_elems=8),
           _ref_global(tensors, 400, "value"))


def test_no_floor_for_small_k_small_populations_or_sources_without_samples(small_sample):
    R = small_sample
    tensors = _floor_tensors()
    sizes = R.population_sizes(DictScores(tensors))
    assert R._sample_floor(DictScores(tensors), list(tensors), sizes, 1, "abs", False) is None  # K·m/N < 4
    assert R._sample_floor(DictScores(tensors), list(tensors), sizes, 1000, "abs", False) is None  # K/N > 0.1

    class NoSamples:
        names = list(tensors)

        def shape(self, name):
            return tuple(tensors[name].shape)

        def get(self, name):
            return tensors[name]

    assert R._sample_floor(NoSamples(), list(tensors), sizes, 150, "abs", False) is None
    _check(topk(NoSamples(), 150, chunk_elems=64), _ref_global(tensors, 150, "abs"))


# ----------------------------------------------------------------------------- arithmetic binning


def _on_edges(x: np.ndarray, n_bins: int, edges: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x with every edge of its log histogram appended, and the float32 neighbours of each
    edge inside the range (the edges do not move: min and max are unchanged). ``edges``:
    the histogram's (default: the exactly log-spaced ones)."""
    from cwa.ranking import log_edges_f32

    a = np.abs(x[np.isfinite(x) & (x != 0)])
    if edges is None:
        edges = log_edges_f32(float(a.min()), float(a.max()), n_bins)
    e32 = edges.astype(np.float32)
    near = np.concatenate([e32, np.nextafter(e32, np.float32(0)), np.nextafter(e32, np.float32(np.inf))])
    near = near[(near >= e32[0]) & (near <= e32[-1])]
    signs = np.where(np.arange(len(near)) % 2 == 0, 1, -1).astype(np.float32)
    return np.concatenate([x, near * signs]).astype(np.float32), e32


@pytest.mark.parametrize("n_bins", [1, 3, 64, 500])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 20.0])
def test_histogram_counts_equal_np_histogram_with_entries_on_edges(n_bins, spread):
    rng = np.random.default_rng(12)
    base = rng.lognormal(0, spread, size=3000).astype(np.float32) * np.where(rng.random(3000) < 0.5, -1, 1)
    # the edges the histogram takes (cell-aligned, or exactly log-spaced for the narrow range)
    _, first = sensitivity_stats(DictScores({"a": torch.from_numpy(base)}), n_bins=n_bins)
    x, e32 = _on_edges(base.astype(np.float32), n_bins, first["edges"])
    x = np.concatenate([x, np.zeros(7, np.float32), np.float32([np.inf, -np.inf])])
    rng.shuffle(x)
    tensors = {"a": torch.from_numpy(x[: len(x) // 3].copy()), "b": torch.from_numpy(x[len(x) // 3 :].copy())}
    for mode_chunk in (7, 1000, 2**24):
        _, hist = sensitivity_stats(DictScores(tensors), n_bins=n_bins, chunk_elems=mode_chunk)
        np.testing.assert_array_equal(hist["edges"], e32.astype(np.float64))
        for p, t in enumerate(tensors.values()):
            a = np.abs(t.numpy().astype(np.float64))
            a = a[np.isfinite(a) & (a > 0)]
            ref, _ = np.histogram(a, bins=e32.astype(np.float64))  # last bin closed, as ours
            np.testing.assert_array_equal(hist["counts"][p], ref)
        assert hist["zeros"].sum() == 7 and hist["nonfinite"].sum() == 2


def test_log_binner_is_bucketize_and_takes_the_arithmetic_path():
    from cwa.ranking import _LogBinner, bin_abs

    rng = np.random.default_rng(13)
    for lo, hi, n_bins in ((1e-30, 1e30, 64), (0.5, 7.0, 64), (1e-8, 3.0, 1000), (1.0, 1.001, 8)):
        a = np.exp(rng.uniform(np.log(lo), np.log(hi), 20000)).astype(np.float32)
        a[:2] = [lo, hi]
        x, e32 = _on_edges(a, n_bins)
        x = np.concatenate([np.abs(x), np.zeros(5, np.float32)])
        binner = _LogBinner(e32.astype(np.float64))
        assert not binner.exact  # these ranges are binned by arithmetic
        got = binner.counts(torch.from_numpy(x.copy()))
        ref = np.bincount(bin_abs(torch.from_numpy(x), torch.from_numpy(e32)).numpy(), minlength=n_bins + 2)
        np.testing.assert_array_equal(got, ref)
        # and the fix-up mattered: the entries on edges are where bare arithmetic errs
        assert binner.delta > 0


def test_log_binner_narrow_range_falls_back_to_bucketize():
    from cwa.ranking import _LogBinner, bin_abs, log_edges_f32

    x = (1.0 + np.arange(50, dtype=np.float32) * np.float32(2**-23)).astype(np.float32)
    e = log_edges_f32(float(x.min()), float(x.max()), 64)
    binner = _LogBinner(e)
    assert binner.exact
    ref = np.bincount(bin_abs(torch.from_numpy(x), torch.from_numpy(e.astype(np.float32))).numpy(), minlength=66)
    np.testing.assert_array_equal(binner.counts(torch.from_numpy(x.copy())), ref)


# ----------------------------------------------------------------------------- one pass


@pytest.mark.parametrize("mode", ["global", "per_layer"])
@pytest.mark.parametrize("spread", [1e-3, 2.0])
def test_rank_with_stats_is_topk_and_stats_in_one_read(mode, spread):
    """`cwa rank`'s single pass equals the top-K and the statistics computed apart, and
    reads every tensor once (twice only for a range too narrow for cell-aligned edges)."""
    from cwa.ranking import rank_with_stats

    rng = np.random.default_rng(21)
    tensors = {
        "a": torch.from_numpy((rng.lognormal(0, spread, (300, 70)) * np.where(rng.random((300, 70)) < 0.5, -1, 1)).astype(np.float32)),
        "b": torch.from_numpy(rng.lognormal(0, spread, 5000).astype(np.float32)),
    }
    tensors["a"][3, :4] = 0.0
    tensors["b"][:2] = float("inf")
    reads = []

    class Counting(DictScores):
        def chunks(self, name, chunk_elems):
            reads.append(name)
            from cwa.ranking import iter_chunks
            yield from iter_chunks(self.get(name), chunk_elems)

    sc = Counting(tensors, metric="m")
    sel, st, hist = rank_with_stats(sc, 50, mode=mode, chunk_elems=1000)
    assert reads == (["a", "b"] if spread > 1 else ["a", "b", "a", "b"])
    ref_sel = topk(DictScores(tensors, metric="m"), 50, mode=mode, chunk_elems=1000)
    ref_st, ref_hist = sensitivity_stats(DictScores(tensors, metric="m"), ref_sel, chunk_elems=1000)
    for f in ("param_index", "flat_index", "score"):
        np.testing.assert_array_equal(getattr(sel.draws[0], f), getattr(ref_sel.draws[0], f))
    assert sel.ties_at_k == ref_sel.ties_at_k
    assert st == ref_st
    for key in ("edges", "counts", "zeros", "nonfinite"):
        np.testing.assert_array_equal(hist[key], ref_hist[key])
    # counts are np.histogram's with the stored edges
    for p, t in enumerate(tensors.values()):
        a = np.abs(t.numpy().astype(np.float64))
        ref, _ = np.histogram(a[np.isfinite(a) & (a > 0)], bins=hist["edges"])
        np.testing.assert_array_equal(hist["counts"][p], ref)


def test_moments_of_a_chunk_far_from_the_running_mean_are_float64_accurate():
    """A chunk is shifted by the running mean of the chunks before it; one whose mean is
    far from that (here 1e4 away, with a spread of 1) is summed again from its own mean:
    shifted by 1e4, its float32 Σd² would lose the spread (M2 off by about 10%)."""
    from cwa.ranking import _Moments, _Scratch

    rng = np.random.default_rng(3)
    chunks = [np.array([1e4], dtype=np.float32),
              rng.standard_normal(1_000_000).astype(np.float32),
              (np.float32(0.5) + rng.standard_normal(1000)).astype(np.float32)]
    m, scratch = _Moments(), _Scratch()
    for x in chunks:
        t = torch.from_numpy(x)
        lo, hi = float(t.min()), float(t.max())
        m.add_chunk(t, t.abs(), lo, hi, scratch)
    ref = np.concatenate(chunks).astype(np.float64)
    assert m.n == ref.size
    assert abs(m.mean - ref.mean()) <= 1e-8 * ref.std()
    assert math.isclose(m.m2, ((ref - ref.mean()) ** 2).sum(), rel_tol=1e-8)


def test_moments_of_heavy_tailed_scores_are_float64_accurate():
    """Mean and std of 3 M heavy-tailed float32 scores with a shifted mean to 1e-8
    relative of numpy's float64 (a float32 BLAS dot for Σd² loses 1e-5 here), abs_mean
    (a float32 cascade sum of |x|) to a few float32 ulps."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(3_000_000).astype(np.float32)
    idx = rng.choice(len(x), 3000, replace=False)
    x[idx] = (rng.uniform(100, 1000, 3000) * np.sign(rng.standard_normal(3000))).astype(np.float32)
    x += np.float32(5.0)
    st, _ = sensitivity_stats(DictScores({"a": torch.from_numpy(x)}))
    ref = x.astype(np.float64)
    for f, r, tol in (("mean", ref.mean(), 1e-8), ("std", ref.std(), 1e-8), ("abs_mean", np.abs(ref).mean(), 3e-7)):
        assert abs(st["overall"][f] - r) <= tol * abs(r), (f, st["overall"][f], r)
