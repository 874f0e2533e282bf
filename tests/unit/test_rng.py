"""The counter-based generator of `cwa.rng`: a plain-Python reference of the hash, chunk and
batch independence, separation of streams, and the distribution of what it yields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cwa import rng
from cwa.controls import sample_distinct
from cwa.metrics.hessian_diag import sample_labels
from cwa.metrics.hutchinson_diag import rademacher as probe
from cwa.perturbation import _uniforms


def _unsigned(t: torch.Tensor) -> list[int]:
    return [int(x) % (1 << 64) for x in t.tolist()]


@pytest.mark.parametrize("key", [(0, "probe", 0, 0), (7, "label", 123, 1), (2**40 + 3, "noise", 5, 9, 2)])
def test_words_match_the_python_reference(key):
    elements = [0, 1, 2, 1000, 2**31 + 5, 2**40 - 1]
    for e in elements:
        got = _unsigned(rng.bits(*key, shape=(1,), offset=e))[0]
        assert got == rng.reference_word(*key, element=e)
    # a block, not only offsets of length-1 draws
    got = _unsigned(rng.bits(*key, shape=(2, 3), offset=17).view(-1))
    assert got == [rng.reference_word(*key, element=17 + i) for i in range(6)]


def test_float_conversion_uses_the_top_bits():
    w = _unsigned(rng.bits(3, "noise", 1, shape=(50,)))
    u64 = rng.uniform(3, "noise", 1, shape=(50,), dtype=torch.float64).tolist()
    u32 = rng.uniform(3, "noise", 1, shape=(50,), dtype=torch.float32).tolist()
    assert u64 == [(x >> 11) / 2.0**53 for x in w]
    assert u32 == [(x >> 40) / 2.0**24 for x in w]
    r = rng.rademacher(3, "noise", 1, shape=(50,)).tolist()
    assert r == [-1.0 if x >> 63 else 1.0 for x in w]
    assert rng.bits(3, "noise", 1, shape=(50,), nbits=62).tolist() == [x >> 2 for x in w]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_uniforms_in_unit_interval(dtype):
    u = rng.uniform(1, "noise", 0, shape=(200_000,), dtype=dtype)
    assert u.dtype == dtype
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.double().mean()) - 0.5) < 0.01


def test_chunked_equals_whole(monkeypatch):
    whole = rng.bits(5, "probe", 2, 3, shape=(1000,))
    pieces = torch.cat([rng.bits(5, "probe", 2, 3, shape=(n,), offset=a)
                        for a, n in ((0, 1), (1, 333), (334, 600), (934, 66))])
    assert torch.equal(whole, pieces)
    monkeypatch.setattr(rng, "_CHUNK", 7)  # the internal passes do not matter either
    assert torch.equal(rng.bits(5, "probe", 2, 3, shape=(1000,)), whole)
    u = rng.uniform(5, "probe", 2, 3, shape=(10, 100), dtype=torch.float64)
    assert torch.equal(u.view(-1), rng.uniform(5, "probe", 2, 3, shape=(1000,), dtype=torch.float64))


def test_int64_ops_match_reference_on_every_device():
    """What makes CPU and CUDA agree: integer ops only. On CUDA, compare directly."""
    ref = rng.bits(9, "control", 4, shape=(4096,))
    if torch.cuda.is_available():
        assert torch.equal(rng.bits(9, "control", 4, shape=(4096,), device="cuda").cpu(), ref)
        u = rng.uniform(9, "label", 1, 0, shape=(4096,), dtype=torch.float64)
        assert torch.equal(rng.uniform(9, "label", 1, 0, shape=(4096,), dtype=torch.float64,
                                       device="cuda").cpu(), u)


def test_stream_continues_where_it_stopped():
    s = rng.stream(2, "control", 0, 3)
    parts = [s.bits(n) for n in (1, 10, 0, 100)]
    assert torch.equal(torch.cat(parts), rng.bits(2, "control", 0, 3, shape=(111,)))
    assert s.offset == 111


def test_keys_give_different_streams():
    keys = [(0, "probe", 0, 0), (1, "probe", 0, 0), (0, "probe", 1, 0), (0, "probe", 0, 1),
            (0, "noise", 0, 0), (0, "label", 0, 0), (0, "control", 0), (0, "control", 0, 0)]
    streams = [rng.bits(*k, shape=(4096,)) for k in keys]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            # independent 64-bit words essentially never coincide; their signs agree half the time
            assert int((streams[i] == streams[j]).sum()) == 0, (keys[i], keys[j])
            agree = float(((streams[i] < 0) == (streams[j] < 0)).double().mean())
            assert abs(agree - 0.5) < 0.05, (keys[i], keys[j])
    with pytest.raises(ValueError):
        rng.bits(0, "nonsense", shape=(1,))


def test_uniform_chi_square_and_ks():
    n, bins = 200_000, 64
    u = rng.uniform(11, "noise", 0, 0, shape=(n,), dtype=torch.float64).numpy()
    counts = np.bincount((u * bins).astype(np.int64), minlength=bins)
    chi2 = float((((counts - n / bins) ** 2) / (n / bins)).sum())
    # 63 degrees of freedom: mean 63, sd ~11.2; 130 is beyond the 99.999th percentile
    assert chi2 < 130, chi2
    s = np.sort(u)
    ks = float(np.max(np.maximum(np.arange(1, n + 1) / n - s, s - np.arange(n) / n)))
    assert ks < 1.95 / math.sqrt(n), ks  # the 0.1% critical value
    # consecutive pairs: no serial dependence between neighbouring words
    pairs = (u[0::2] * 8).astype(np.int64) * 8 + (u[1::2] * 8).astype(np.int64)
    c2 = np.bincount(pairs, minlength=64)
    chi2 = float((((c2 - n / 2 / 64) ** 2) / (n / 2 / 64)).sum())
    assert chi2 < 130, chi2


def test_rademacher_mean_zero():
    r = rng.rademacher(4, "probe", 0, 0, shape=(100_000,))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(r.mean())) < 5 / math.sqrt(100_000)


def test_bits_uniform_over_small_ranges():
    w = rng.bits(6, "control", 1, shape=(80_000,), nbits=3).numpy()
    assert w.min() >= 0 and w.max() < 8
    counts = np.bincount(w, minlength=8)
    chi2 = float((((counts - 10_000) ** 2) / 10_000).sum())
    assert chi2 < 40, chi2  # 7 degrees of freedom


# --------------------------------------------------------------------------- callers


def test_probes_do_not_depend_on_batching_or_device_placement():
    """A probe is a function of (seed, probe, parameter): the same for every batch, of
    any size, and equal to the stream's signs."""
    w = torch.nn.Parameter(torch.zeros(8, 5))
    z = probe(3, 1, 2, w)
    assert z.device == w.device and z.dtype == torch.float32
    assert torch.equal(z, rng.rademacher(3, "probe", 1, 2, shape=(8, 5)))
    assert torch.equal(z, probe(3, 1, 2, (8, 5)))
    assert not torch.equal(z, probe(3, 0, 2, w)) and not torch.equal(z, probe(3, 1, 3, w))


def test_labels_one_window_at_a_time_equal_a_batch():
    """hessian_diag labels depend on (seed, window index, draw) only: sampling window 5 of a
    batch of 8 equals sampling it alone."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 12, 30, generator=g) * 3
    cdf = torch.softmax(logits, dim=-1, dtype=torch.float64).cumsum(-1)
    windows = list(range(40, 48))
    batch = [sample_labels(cdf[n], 7, windows[n], 0) for n in range(8)]
    alone = sample_labels(cdf[5].clone(), 7, 45, 0)
    assert torch.equal(batch[5], alone)
    assert not torch.equal(sample_labels(cdf[5], 7, 45, 1), alone)


def test_labels_follow_the_predictive_distribution():
    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    cdf = p.cumsum(0).expand(50_000, 5).contiguous()
    labels = sample_labels(cdf, 1, 0, 0)
    counts = np.bincount(labels.numpy(), minlength=5) / 50_000
    assert counts[1] == 0 and counts[4] == 0  # zero-probability tokens are never drawn
    assert np.allclose(counts, p.numpy(), atol=0.01)
    # by hand: the first token whose cdf exceeds u·total
    u = rng.uniform(1, "label", 0, 0, shape=(50_000,), dtype=torch.float64)
    expect = torch.tensor([int(np.searchsorted(p.cumsum(0).numpy(), x, side="right")) for x in u[:20]])
    assert torch.equal(labels[:20], expect)


def test_noise_uniforms_of_one_parameter_do_not_depend_on_k():
    big = _uniforms(4, 2, 0, 8)
    assert torch.equal(_uniforms(4, 2, 0, 1), big[:1])
    assert torch.equal(big.view(-1), rng.uniform(4, "noise", 2, 0, shape=(16,), dtype=torch.float64))


def test_control_draws_are_reproducible_and_uniform():
    a = sample_distinct(rng.stream(1, "control", 0), 1000, 50)
    assert np.array_equal(a, sample_distinct(rng.stream(1, "control", 0), 1000, 50))
    assert not np.array_equal(a, sample_distinct(rng.stream(1, "control", 1), 1000, 50))
    assert len(np.unique(a)) == 50 and a.min() >= 0 and a.max() < 1000
