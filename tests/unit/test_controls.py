"""Controls: uniformity (chi-square), reproducibility, exclusion, matching, bottom_k.

scipy is not a dependency: the chi-square critical values at p = 0.001 are hard-coded
(checked against the regularized incomplete gamma function). Every random test uses a
fixed seed, so a pass is deterministic; a biased sampler fails by a wide margin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cwa.controls import CONTROLS, make_control, sample_distinct, sample_excluding
from cwa.errors import UsageError
from cwa.ranking import DictScores, bottomk, topk
from cwa.rng import stream

CHI2_999 = {2: 13.816, 3: 16.266, 39: 72.055, 99: 148.23}


def _chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def _scores(seed=0, shapes=((30, 20), (100,), (8, 8, 4), (50,))):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


def _positions(sel, draw=0):
    d = sel.draws[draw]
    return set(zip(d.param_index.tolist(), d.flat_index.tolist(), strict=True))


def _mag_bins(w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Independent reference binning: 0 for zeros, 1..100 by log-spaced edges."""
    b = np.clip(np.searchsorted(edges, w, side="right") - 1, 0, 99) + 1
    b[w == 0] = 0
    return b


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("m,k", [(40, 8), (40, 30), (40, 40), (100, 1)])
def test_sample_distinct_uniform_over_positions(m, k):
    counts = np.zeros(m)
    for d in range(2000 if k < m else 3):
        s = sample_distinct(stream(11, "control", d), m, k)
        assert len(s) == k and len(np.unique(s)) == k and np.all(np.diff(s) > 0)
        assert s.min() >= 0 and s.max() < m
        counts[s] += 1
    if k < m:
        stat = _chi2(counts, np.full(m, counts.sum() / m))
        assert stat < CHI2_999[m - 1], stat


def test_sample_excluding_uniform_and_excludes():
    m, k = 100, 20
    excluded = np.array([0, 1, 2, 50, 51, 97, 99])
    allowed = np.setdiff1d(np.arange(m), excluded)
    counts = np.zeros(m)
    for d in range(1500):
        s = sample_excluding(stream(3, "control", d), m, k, excluded)
        assert len(np.unique(s)) == k and not np.isin(s, excluded).any()
        counts[s] += 1
    obs = counts[allowed]
    stat = _chi2(obs, np.full(len(allowed), obs.sum() / len(allowed)))
    assert stat < 137.0, stat  # chi2(0.999, dof 92) = 136.9


# ----------------------------------------------------------------------------- random_k


def test_random_k_uniform_over_tensors_and_reproducible():
    tensors = _scores()
    sizes = np.array([t.numel() for t in tensors.values()], dtype=float)
    scores = DictScores(tensors)
    ref = topk(scores, 60)
    sel = make_control("random_k", scores, ref, draws=300, seed=5)
    assert sel.kind == "random_k" and sel.n_draws == 300 and sel.ties_at_k == 0
    pooled = np.zeros(len(sizes))
    ref_pos = _positions(ref)
    for i, d in enumerate(sel.draws):
        pos = _positions(sel, i)
        assert len(pos) == len(d) == 60  # no duplicates
        assert sel.info["overlap_with_topk"][i] == len(pos & ref_pos)
        key = d.param_index.astype(np.int64) * 10**6 + d.flat_index
        assert np.all(np.diff(key) > 0)  # ascending (param, flat)
        np.testing.assert_array_equal(
            d.score,
            np.array(
                [
                    tensors[f"p{p}"].reshape(-1)[f].item()
                    for p, f in zip(d.param_index, d.flat_index, strict=True)
                ],
                dtype=np.float32,
            ),
        )
        pooled += np.bincount(d.param_index, minlength=len(sizes))
    stat = _chi2(pooled, pooled.sum() * sizes / sizes.sum())
    assert stat < CHI2_999[3], stat
    assert sum(sel.info["overlap_with_topk"]) > 0  # may overlap, and does here (60/1406 x 300)

    again = make_control("random_k", scores, ref, draws=3, seed=5)
    for d in range(3):  # draw d depends only on (seed, d)
        assert _positions(again, d) == _positions(sel, d)
    other = make_control("random_k", scores, ref, draws=3, seed=6)
    assert _positions(other, 0) != _positions(sel, 0)
    assert _positions(sel, 0) != _positions(sel, 1)


def test_random_k_per_layer_matches_counts():
    tensors = _scores()
    scores = DictScores(tensors)
    ref = topk(scores, 25, mode="per_layer")
    sel = make_control("random_k", scores, ref, draws=4, seed=0)
    for d in range(4):
        np.testing.assert_array_equal(sel.per_tensor_counts(d), ref.per_tensor_counts(0))
        assert len(_positions(sel, d)) == len(sel.draws[d])


def test_random_k_dense_population():
    tensors = {"a": torch.randn(5), "b": torch.randn(3)}
    scores = DictScores(tensors)
    ref = topk(scores, 7)
    sel = make_control("random_k", scores, ref, draws=5, seed=0)
    for d in range(5):
        assert len(_positions(sel, d)) == 7


# ----------------------------------------------------------------------------- matched


def test_layer_matched_counts_and_exclusion():
    tensors = _scores()
    scores = DictScores(tensors)
    for mode, k in (("global", 80), ("per_layer", 12)):
        ref = topk(scores, k, mode=mode)
        sel = make_control("layer_matched", scores, ref, draws=10, seed=1)
        for d in range(10):
            np.testing.assert_array_equal(sel.per_tensor_counts(d), ref.per_tensor_counts(0))
            assert not (_positions(sel, d) & _positions(ref))
            assert len(_positions(sel, d)) == len(sel.draws[d])
        assert sel.info["overlap_with_topk"] == [0] * 10


def test_layer_matched_without_room_is_a_usage_error():
    scores = DictScores({"a": torch.randn(4), "b": torch.randn(100)})
    ref = topk(scores, 3, mode="per_layer")
    with pytest.raises(UsageError, match="'a'"):
        make_control("layer_matched", scores, ref, draws=1, seed=0)


@pytest.mark.parametrize("mode,k", [("global", 60), ("per_layer", 10)])
def test_magnitude_matched_histogram_and_exclusion(mode, k):
    g = torch.Generator().manual_seed(9)
    weights = {
        "p0": torch.randn(40, 30, generator=g),
        "p1": torch.randn(200, generator=g) * 0.01,
        "p2": torch.randn(16, 16, generator=g) * 10,
    }
    weights["p0"][0, :20] = 0.0  # exact zeros get their own bin
    # scores mildly correlated with |w|: the top-K's magnitudes are skewed (so matching is
    # not the same as uniform sampling) yet every bin keeps room for partners
    tensors = {
        n: w.abs() ** 0.3 * torch.exp(2 * torch.randn(w.shape, generator=g))
        for n, w in weights.items()
    }
    tensors["p0"][0, :3] = 100.0  # three zero weights in the top-K
    scores = DictScores(tensors)
    ref = topk(scores, k, mode=mode)
    sel = make_control(
        "magnitude_matched", scores, ref, draws=6, seed=2, weights=weights, chunk_elems=97
    )
    all_w = np.concatenate([w.reshape(-1).double().numpy() for w in weights.values()])
    a = np.abs(all_w)
    edges = np.array(sel.info["magnitude_bins"]["edges"])
    # the reported edges are the 100 log-spaced bins over the population (float32 values)
    np.testing.assert_allclose(edges, np.geomspace(a[a > 0].min(), a.max(), 101), rtol=1e-6)
    assert edges[0] == a[a > 0].min() and edges[-1] == a.max()
    names = list(weights)

    def bins_of(draw, p=None):
        m = np.ones(len(draw), bool) if p is None else draw.param_index == p
        w = np.array(
            [
                abs(weights[names[q]].reshape(-1)[f].item())
                for q, f in zip(draw.param_index[m], draw.flat_index[m], strict=True)
            ]
        )
        return np.bincount(_mag_bins(w, edges), minlength=101)

    assert sel.info["n_fallback"] == 0
    for d in range(6):
        assert not (_positions(sel, d) & _positions(ref))
        assert len(_positions(sel, d)) == len(sel.draws[d]) == len(ref.draws[0])
        if mode == "global":
            np.testing.assert_array_equal(bins_of(sel.draws[d]), bins_of(ref.draws[0]))
        else:
            for p in range(3):
                np.testing.assert_array_equal(bins_of(sel.draws[d], p), bins_of(ref.draws[0], p))
    assert _positions(sel, 0) != _positions(sel, 1)
    if mode == "global":  # the check has power: a uniform draw does not match
        rk = make_control("random_k", scores, ref, draws=1, seed=2)
        assert (bins_of(rk.draws[0]) != bins_of(ref.draws[0])).any()
    again = make_control("magnitude_matched", scores, ref, draws=2, seed=2, weights=weights)
    assert _positions(again, 1) == _positions(sel, 1)  # chunk size does not matter


def test_magnitude_matched_fallback_to_nearest_bin():
    # top-K: the 3 largest |w| (each alone in the top bins); partners must fall back
    w = torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4, 50.0, 60.0, 100.0, 0.001])
    scores = DictScores({"w": w.clone()})
    ref = topk(scores, 3)
    sel = make_control("magnitude_matched", scores, ref, draws=3, seed=0, weights={"w": w})
    assert sel.info["n_fallback"] == 3
    for d in range(3):
        chosen = set(sel.draws[d].flat_index.tolist())
        assert not chosen & {5, 6, 7}
        assert 8 not in chosen  # the far smallest weight is never nearest
        assert len(chosen) == 3


def test_magnitude_matched_needs_weights():
    scores = DictScores({"w": torch.randn(10)})
    ref = topk(scores, 2)
    with pytest.raises(UsageError, match="weights"):
        make_control("magnitude_matched", scores, ref, draws=1, seed=0)


# ----------------------------------------------------------------------------- bottom_k


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_bottom_k_equals_bottomk(mode):
    tensors = {n: t.round() for n, t in _scores().items()}  # ties
    scores = DictScores(tensors)
    ref = topk(scores, 30, mode=mode, rank_by="value")
    sel = make_control("bottom_k", scores, ref, draws=20, seed=0)
    direct = bottomk(scores, 30, mode=mode, rank_by="value")
    assert sel.n_draws == 1 and sel.kind == "bottom_k"
    np.testing.assert_array_equal(sel.draws[0].param_index, direct.draws[0].param_index)
    np.testing.assert_array_equal(sel.draws[0].flat_index, direct.draws[0].flat_index)
    assert sel.ties_at_k == direct.ties_at_k
    assert sel.info["overlap_with_topk"] == [len(_positions(sel) & _positions(ref))]


def test_registry_and_validation():
    assert set(CONTROLS.names()) == {"random_k", "bottom_k", "layer_matched", "magnitude_matched"}
    scores = DictScores({"w": torch.randn(10)})
    ref = topk(scores, 2)
    with pytest.raises(UsageError, match="Did you mean"):
        make_control("random_kk", scores, ref, draws=1, seed=0)
    with pytest.raises(UsageError):
        make_control("random_k", scores, ref, draws=0, seed=0)
    with pytest.raises(UsageError):
        make_control("random_k", DictScores({"v": torch.randn(10)}), ref, draws=1, seed=0)
