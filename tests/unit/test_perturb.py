"""Perturbations against hand computations, exact restore (whole-tensor hashes), statistics."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from cwa.errors import UsageError
from cwa.perturbation import (
    PERTURBATIONS,
    apply,
    paired_bootstrap_ci,
    perturbed,
    restore,
    summarize,
)
from cwa.ranking import Draw
from cwa.rng import uniform

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
N_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _draw(pairs):
    p = [a for a, _ in pairs]
    f = [b for _, b in pairs]
    return Draw(np.array(p), np.array(f), np.zeros(len(p)))


def _param(values, dtype=torch.float32):
    return torch.nn.Parameter(torch.tensor(values, dtype=dtype))


def _hash_module(m: torch.nn.Module) -> dict[str, str]:
    return {
        n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, p in m.state_dict().items()
    }


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(6, 5).to(dtype)
        self.b = torch.nn.Linear(5, 4, bias=False).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(dtype))

    def params(self):
        return [self.a.weight, self.b.weight]


def _tiny_draw():
    # rank order, not sorted: the code must not rely on it
    return _draw([(1, 7), (0, 3), (0, 29), (1, 0), (0, 0), (1, 19)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


# ----------------------------------------------------------------------------- methods


def test_zero_and_sign_flip_by_hand():
    p = _param([1.5, -2.0, 0.0, 3.25, 7.0])
    d = _draw([(0, 3), (0, 1), (0, 2)])
    a = apply([p], d, "zero")
    assert p.data.tolist() == [1.5, 0.0, 0.0, 0.0, 7.0]
    assert a.n_changed == 2  # zeroing a zero changes nothing
    assert math.isclose(a.delta_w_norm, math.hypot(3.25, 2.0))
    assert a.bits is None
    assert restore([p], a) and p.data.tolist() == [1.5, -2.0, 0.0, 3.25, 7.0]

    a = apply([p], d, "sign_flip", scale=2.0)
    assert p.data.tolist() == [1.5, 4.0, -0.0, -6.5, 7.0]
    assert a.n_changed == 3  # 0.0 -> -0.0 changes the stored bits
    assert math.isclose(a.delta_w_norm, math.hypot(9.75, 6.0))
    restore([p], a)
    a = apply([p], d, "sign_flip")  # default s = 1
    assert a.scale == 1.0 and p.data.tolist()[:4] == [1.5, 2.0, -0.0, -3.25]
    restore([p], a)


def test_gauss_noise_by_hand_and_stream():
    p = _param(list(np.linspace(-3, 3, 50)))
    orig = p.data.clone()
    d = _draw([(0, 40), (0, 5), (0, 17)])
    a = apply([p], d, "gauss_noise", scale=0.3, seed=4, draw_index=2)
    assert a.scale == 0.3
    # hand computation: uniforms of (seed, noise, draw, param), pairs in flat-index order
    u = uniform(4, "noise", 2, 0, shape=(6,), dtype=torch.float64).view(3, 2).numpy()
    eps = np.sqrt(-2 * np.log1p(-u[:, 0])) * np.cos(2 * np.pi * u[:, 1])
    w = orig.double().numpy()[[5, 17, 40]]
    expect = (w + 0.3 * np.abs(w) * eps).astype(np.float32)
    np.testing.assert_array_equal(p.data.numpy()[[5, 17, 40]], expect)
    delta = expect.astype(np.float64) - orig.double().numpy()[[5, 17, 40]]
    assert math.isclose(a.delta_w_norm, float(np.sqrt((delta**2).sum())), rel_tol=1e-12)
    restore([p], a)
    # the noise of an entry depends on its rank in its tensor, not on other entries
    a2 = apply([p], _draw([(0, 5), (0, 17)]), "gauss_noise", scale=0.3, seed=4, draw_index=2)
    np.testing.assert_array_equal(p.data.numpy()[[5, 17]], expect[:2])
    restore([p], a2)
    # different seeds or draws give different noise
    a3 = apply([p], d, "gauss_noise", scale=0.3, seed=4, draw_index=3)
    assert not np.array_equal(p.data.numpy()[[5, 17, 40]], expect)
    restore([p], a3)


def test_gauss_noise_is_standard_normal():
    p = _param([1.0] * 20000)
    d = _draw([(0, i) for i in range(20000)])
    with perturbed([p], d, "gauss_noise", scale=1.0, seed=1):
        eps = p.data.double().numpy() - 1.0
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
    assert abs((np.abs(eps) < 1).mean() - 0.6827) < 0.015


@pytest.mark.parametrize("dtype", FLOATS)
def test_bit_flip_named_bits(dtype):
    p = _param([0.5, 1.5, 1.0, -1.5], dtype)
    d = _draw([(0, 0), (0, 1), (0, 2), (0, 3)])
    with perturbed([p], d, "bit_flip", bit="sign") as a:
        assert p.data.float().tolist() == [-0.5, -1.5, -1.0, 1.5]
        assert a.n_changed == 4 and (a.bits == N_BITS[dtype] - 1).all()
    with perturbed([p], _draw([(0, 2)]), "bit_flip", bit="mantissa_msb"):
        assert p.data[2].item() == 1.5
    with perturbed([p], _draw([(0, 0)]), "bit_flip", bit="exponent_msb") as a:
        if dtype == torch.float32:
            assert p.data[0].item() == 2.0**127
        # in every format flipping the exponent MSB of 0.5 (biased exponent 0111..10)
        # gives exponent 1111..10: the largest binade, value 2**(bias)
        bias = {torch.float32: 127, torch.bfloat16: 127, torch.float16: 15}[dtype]
        assert p.data[0].item() == 2.0**bias
        assert math.isclose(a.delta_w_norm, 2.0**bias - 0.5)
    assert p.data.float().tolist() == [0.5, 1.5, 1.0, -1.5]


@pytest.mark.parametrize("dtype", FLOATS)
def test_bit_flip_index_and_range(dtype):
    p = _param([1.0, 3.0], dtype)
    before = _bits(p.data).clone()
    with perturbed([p], _draw([(0, 1)]), "bit_flip", bit=0) as a:
        after = _bits(p.data)
        assert int(after[1]) == int(before[1]) ^ 1 and int(after[0]) == int(before[0])
        assert a.bits.tolist() == [0]
    with perturbed([p], _draw([(0, 1)]), "bit_flip", bit="3"):
        assert int(_bits(p.data)[1]) == int(before[1]) ^ 8
    for bad in (N_BITS[dtype], -1, "exponent", 2.5):
        with pytest.raises(UsageError):
            apply([p], _draw([(0, 0)]), "bit_flip", bit=bad)
    assert torch.equal(_bits(p.data), before)


@pytest.mark.parametrize("dtype", FLOATS)
def test_bit_flip_random_bit_uniform(dtype):
    n = 4000
    p = _param([0.75] * n, dtype)
    before = _bits(p.data).clone().long()
    d = _draw([(0, i) for i in range(n)])
    with perturbed([p], d, "bit_flip", bit="random", seed=3) as a:
        nb = N_BITS[dtype]
        assert a.bits.min() >= 0 and a.bits.max() < nb
        # the recorded bit is the one that flipped
        diff = (_bits(p.data).long() ^ before) & ((1 << nb) - 1)
        np.testing.assert_array_equal(diff.numpy(), (1 << a.bits.astype(np.int64)))
        counts = np.bincount(a.bits, minlength=nb)
        stat = ((counts - n / nb) ** 2 / (n / nb)).sum()
        assert stat < {16: 37.697, 32: 61.098}[nb]  # chi2(0.999, nb - 1)


def test_bit_flip_probability():
    n = 5000
    p = _param([1.25] * n)
    d = _draw([(0, i) for i in range(n)])
    with perturbed([p], d, "bit_flip", prob=0.0) as a:
        assert a.n_changed == 0 and (a.bits == -1).all() and a.delta_w_norm == 0.0
        assert (p.data == 1.25).all()
    with perturbed([p], d, "bit_flip", prob=1.0, bit="sign") as a:
        assert a.n_changed == n and (p.data == -1.25).all()
    with perturbed([p], d, "bit_flip", prob=0.5, bit="sign", seed=8) as a:
        flipped = (p.data == -1.25).numpy()
        assert abs(flipped.mean() - 0.5) < 0.03  # 4.2 sigma
        assert a.n_changed == flipped.sum()
        np.testing.assert_array_equal(a.bits >= 0, flipped)
        assert math.isclose(a.delta_w_norm, 2.5 * math.sqrt(flipped.sum()))


def test_bits_recorded_in_draw_order():
    p = _param([1.0, 2.0, 3.0, 4.0])
    d = _draw([(0, 3), (0, 0), (0, 2)])
    with perturbed([p], d, "bit_flip", bit="random", seed=1) as a:
        before = _bits(torch.tensor([4.0, 1.0, 3.0]))
        after = _bits(p.data[[3, 0, 2]])
        np.testing.assert_array_equal(
            (after ^ before).numpy().astype(np.int64) & 0xFFFFFFFF, 1 << a.bits.astype(np.int64)
        )


def test_validation_leaves_weights_alone():
    p = _param([1.0, 2.0])
    d = _draw([(0, 0)])
    with pytest.raises(UsageError):
        apply([p], d, "gauss_noise", scale=-0.1)
    with pytest.raises(UsageError):
        apply([p], d, "sign_flip", scale=float("nan"))
    for prob in (-0.1, 1.5):
        with pytest.raises(UsageError):
            apply([p], d, "bit_flip", prob=prob)
    with pytest.raises(UsageError, match="Did you mean"):
        apply([p], d, "zeros")
    with pytest.raises(UsageError):
        apply([p], _draw([(0, 0), (0, 0)]), "zero")
    with pytest.raises(UsageError):
        apply([p], _draw([(0, 5)]), "zero")
    assert p.data.tolist() == [1.0, 2.0]
    assert set(PERTURBATIONS.names()) == {"zero", "sign_flip", "gauss_noise", "bit_flip"}


# ----------------------------------------------------------------------------- restore


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "method,kw",
    [
        ("zero", {}),
        ("sign_flip", {"scale": 3.0}),
        ("gauss_noise", {"scale": 5.0}),
        ("bit_flip", {"bit": "exponent_msb"}),  # produces inf / NaN / huge values
        ("bit_flip", {"bit": "random", "prob": 0.7}),
    ],
)
def test_restore_bit_exact_whole_tensors(dtype, method, kw):
    m = Tiny(dtype)
    h0 = _hash_module(m)
    params = m.params()
    d = _tiny_draw()
    sel = {(int(a), int(b)) for a, b in zip(d.param_index, d.flat_index, strict=True)}
    before = [p.detach().clone() for p in params]
    a = apply(params, d, method, seed=1, **kw)
    # untouched entries never change
    for i, (p, b) in enumerate(zip(params, before, strict=True)):
        mask = torch.ones(p.numel(), dtype=torch.bool)
        for q, f in sel:
            if q == i:
                mask[f] = False
        assert torch.equal(_bits(p.detach().reshape(-1))[mask], _bits(b.reshape(-1))[mask])
    if method == "bit_flip" and kw["bit"] == "exponent_msb":
        assert a.n_changed == len(d)
        assert not math.isfinite(a.delta_w_norm) or a.delta_w_norm > 1e4
    # delta_w_norm against a direct computation on the stored values
    new = torch.cat([p.detach().reshape(-1).double() for p in params])
    old = torch.cat([b.reshape(-1).double() for b in before])
    changed = torch.cat(
        [
            _bits(p.detach().reshape(-1)) != _bits(b.reshape(-1))
            for p, b in zip(params, before, strict=True)
        ]
    )
    ref = torch.where(changed, new - old, torch.zeros_like(new)).pow(2).sum().sqrt().item()
    if math.isnan(ref):
        assert math.isnan(a.delta_w_norm)
    else:
        assert a.delta_w_norm == pytest.approx(ref, rel=1e-12)
    assert a.n_changed == int(changed.sum())
    assert _hash_module(m) != h0 or a.n_changed == 0
    assert restore(params, a) is True and a.restored is True
    assert _hash_module(m) == h0


def test_perturbed_restores_when_the_body_raises():
    m = Tiny()
    h0 = _hash_module(m)
    with (
        pytest.raises(RuntimeError, match="boom"),
        perturbed(m.params(), _tiny_draw(), "bit_flip", bit="exponent_msb") as a,
    ):
        assert _hash_module(m) != h0
        raise RuntimeError("boom")
    assert a.restored is True
    assert _hash_module(m) == h0


def test_restore_reports_a_mismatch():
    # a parameter swapped to another dtype can no longer be restored bit for bit
    q = _param([1.0, 2.0, 3.0])
    b = apply([q], _draw([(0, 1)]), "zero")
    q.data = q.data.to(torch.float16)
    assert restore([q], b) is False


def test_grad_state_untouched():
    m = Tiny()
    with perturbed(m.params(), _tiny_draw(), "sign_flip"):
        assert all(p.grad is None for p in m.parameters())
        assert all(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------- statistics


def test_paired_bootstrap_contains_true_mean_and_is_deterministic():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, size=200)  # window difficulty varies a lot...
    true_delta = 0.2
    cond = base + rng.normal(true_delta, 0.05, size=200)  # ...and cancels in the pairing
    lo, hi = paired_bootstrap_ci(base, cond, B=1000, seed=0)
    assert lo < true_delta < hi
    assert hi - lo < 0.03  # paired: the width reflects the delta noise, not the base spread
    assert (lo, hi) == paired_bootstrap_ci(base, cond, B=1000, seed=0)
    assert (lo, hi) != paired_bootstrap_ci(base, cond, B=1000, seed=1)
    # the CI of a constant delta is that constant
    lo, hi = paired_bootstrap_ci(base, base + 0.5, B=200)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_paired_bootstrap_weights_and_nan():
    base = np.zeros(4)
    cond = np.array([1.0, 1.0, 1.0, 5.0])
    # nearly all weight on window 3: a replicate containing it is ~5, one without it is 1
    lo, hi = paired_bootstrap_ci(base, cond, token_counts=np.array([1, 1, 1, 1e12]), B=500)
    assert hi == pytest.approx(5.0) and lo == pytest.approx(1.0)
    lo, hi = paired_bootstrap_ci(base, cond, B=500)  # unweighted: strictly inside
    assert 1.0 <= lo < 2.0 < hi < 5.0
    lo, hi = paired_bootstrap_ci(base, np.array([1.0, np.nan, 1.0, 1.0]), B=100)
    assert math.isnan(lo) and math.isnan(hi)


def test_summarize_by_hand():
    base = np.array([2.0, 3.0, 4.0])
    conds = [
        {"name": "topk", "seed": 0, "draw": 0, "k": 10, "delta_nll": 1.0},
        {"name": "topk", "seed": 1, "draw": 0, "k": 10, "delta_nll": 9.0},
        {"name": "bottom_k", "seed": 0, "draw": 0, "k": 10, "delta_nll": 0.01},
    ]
    random_deltas = [0.1, 0.3, 1.0, 0.2, 1.5]
    for d, v in enumerate(random_deltas):
        conds.append({"name": "random_k", "seed": 0, "draw": d, "k": 10, "delta_nll": v})
    conds.append({"name": "random_k", "seed": 1, "draw": 0, "k": 10, "delta_nll": 99.0})
    rows = np.array([base + c["delta_nll"] for c in conds])
    out = summarize(conds, {"baseline": base, "conditions": rows}, B=200)

    assert out["topk"]["delta_nll"] == 1.0
    assert out["topk"]["ci95"] == pytest.approx([1.0, 1.0])
    r = out["random_k"]
    x = np.array(random_deltas)
    assert r["n_draws"] == 5
    assert r["mean"] == pytest.approx(x.mean())
    assert r["std"] == pytest.approx(x.std(ddof=1))
    assert r["ci95"] == pytest.approx(list(np.percentile(x, [2.5, 97.5])))
    assert r["topk_p_value"] == pytest.approx((1 + 2) / (5 + 1))  # 1.0 and 1.5 are >= 1.0
    assert r["topk_z"] == pytest.approx((1.0 - x.mean()) / x.std(ddof=1))
    assert out["bottom_k"]["delta_nll"] == 0.01 and out["bottom_k"]["n_draws"] == 1


def test_summarize_degenerate_values_do_not_crash():
    base = np.zeros(3)
    conds = [{"name": "topk", "seed": 0, "draw": 0, "k": 5, "delta_nll": 2.0}]
    conds += [
        {"name": "random_k", "seed": 0, "draw": d, "k": 5, "delta_nll": 0.5} for d in range(3)
    ]
    conds += [
        {"name": "layer_matched", "seed": 0, "draw": d, "k": 5, "delta_nll": v}
        for d, v in enumerate([np.nan, 0.1])
    ]
    rows = np.array([base + (c["delta_nll"]) for c in conds])
    out = summarize(conds, {"baseline": base, "conditions": rows}, B=50)
    assert out["random_k"]["std"] == 0.0 and out["random_k"]["topk_z"] == math.inf
    assert out["random_k"]["topk_p_value"] == pytest.approx(1 / 4)
    lm = out["layer_matched"]
    assert math.isnan(lm["mean"]) and lm["topk_p_value"] == pytest.approx(2 / 3)  # NaN counts as >=
    conds[0]["delta_nll"] = float("nan")
    rows[0] = np.nan
    out = summarize(conds, {"baseline": base, "conditions": rows}, B=50)
    assert math.isnan(out["topk"]["ci95"][0]) and math.isnan(out["random_k"]["topk_p_value"])
