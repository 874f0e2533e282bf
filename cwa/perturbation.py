"""Perturbations of selected weights with exact restore, and the statistics of their effects.

Perturbations
-------------
Only the selected entries are touched, in place, through a flat view of each parameter
(``p.data.view(-1)``) under ``torch.no_grad``; their original values (O(K), never a copy
of a tensor or of the model) are saved and written back by ``restore``, which then
compares the restored entries bit for bit with the saved ones.

- ``zero``: w -> +0
- ``sign_flip``: w -> -s·w (s = ``scale``, default 1)
- ``gauss_noise``: w -> w + s·|w|·ε, ε ~ N(0, 1), one ε per weight (default s = 0.1)
- ``bit_flip``: one bit of w flipped in its stored dtype, with probability ``prob``

New values are computed in float64 from the originals and rounded once to the stored
dtype. ``n_changed`` counts entries whose stored bits changed (so zeroing a zero, or a
noise draw too small to change the rounded value, does not count); ``delta_w_norm`` is
‖Δw‖₂ in float64 over the stored values (inf or nan when a perturbation produces them:
non-finite results are results, never errors).

bit_flip works on the integer view of the stored dtype (float32: int32, bfloat16 and
float16: int16, float64: int64). ``bit`` is ``sign`` (the top bit), ``exponent_msb``
(the one below it), ``mantissa_msb`` (the highest stored mantissa bit: 22 in float32, 9 in
float16, 6 in bfloat16), ``random`` (uniform over the dtype's bits, per weight) or an
integer index, 0 = least significant. The flipped bit of each entry is recorded, -1 when
the Bernoulli(prob) draw left it alone.

Randomness: for each parameter index p holding selected entries, the counter-based stream
(seed, "noise", draw_index, p) of ``cwa.rng`` yields float64 uniforms u_0, u_1, ... (exact
multiples of 2^-53, u_i from word i alone, bit-identical on every device). The selected entries of p, sorted by flat index, take the pairs
(u_2j, u_2j+1) in that order: gauss_noise uses ε_j = sqrt(-2 ln(1 − u_2j))·cos(2π u_2j+1)
(Box–Muller), bit_flip flips when u_2j < prob and, for ``random``, picks bit
floor(u_2j+1 · n_bits) (exactly uniform, n_bits being a power of two). So ε_j depends only
on (seed, draw, p) and j — not on K elsewhere, batch sizes or devices.

Statistics
----------
``paired_bootstrap_ci`` resamples evaluation windows (the same windows for baseline and
condition, hence paired) and ``summarize`` builds the ``summary`` block of
``perturbation_results.json``; see their docstrings.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from cwa import rng
from cwa.errors import CwaError, UsageError
from cwa.ranking import Draw
from cwa.registry import Registry

# dtype -> (integer view dtype, number of bits, stored mantissa bits)
_BIT_LAYOUT = {
    torch.float32: (torch.int32, 32, 23),
    torch.float16: (torch.int16, 16, 10),
    torch.bfloat16: (torch.int16, 16, 7),
    torch.float64: (torch.int64, 64, 52),
}
BIT_NAMES = ("sign", "exponent_msb", "mantissa_msb", "random")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Perturbation:
    """How one method maps the selected originals to new values.

    ``fn(old, scale, prob, bit, u)`` gets the originals (1-D, stored dtype), the pairs of
    uniforms ``u`` (float64 [n, 2], see the module docstring) and returns the new values
    (stored dtype) and the flipped bits (int64 [n], -1 = none) or None.
    """

    name: str
    fn: object
    default_scale: float | None  # None: the method takes no scale
    uses: tuple[str, ...] = ()  # the options that change its result: scale, prob, bit, seed
    summary: str = ""

    @property
    def needs_random(self) -> bool:
        return "seed" in self.uses


def _zero(old, scale, prob, bit, u):
    return torch.zeros_like(old), None


def _sign_flip(old, scale, prob, bit, u):
    return (-scale * old.to(torch.float64)).to(old.dtype), None


def _gauss_noise(old, scale, prob, bit, u):
    eps = torch.sqrt(-2.0 * torch.log1p(-u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
    w = old.to(torch.float64)
    return (w + scale * w.abs() * eps).to(old.dtype), None


def resolve_bit(bit, dtype: torch.dtype) -> int | None:
    """The bit index for ``bit`` in ``dtype``; None for ``random``. Raises UsageError."""
    if dtype not in _BIT_LAYOUT:
        raise UsageError(
            f"bit_flip supports float32, bfloat16, float16 and float64 weights, not {dtype}."
        )
    _, n_bits, n_mant = _BIT_LAYOUT[dtype]
    if isinstance(bit, str) and bit.strip().lstrip("-").isdigit():
        bit = int(bit)
    if isinstance(bit, (int, np.integer)) and not isinstance(bit, bool):
        if not 0 <= bit < n_bits:
            raise UsageError(f"--bit {bit} is out of range for {dtype}: use 0..{n_bits - 1}.")
        return int(bit)
    named = {"sign": n_bits - 1, "exponent_msb": n_bits - 2, "mantissa_msb": n_mant - 1}
    if bit == "random":
        return None
    if bit in named:
        return named[bit]
    raise UsageError(f"Unknown --bit {bit!r}; use {', '.join(BIT_NAMES)} or an index.")


def _bit_flip(old, scale, prob, bit, u):
    int_dtype, n_bits, _ = _BIT_LAYOUT[old.dtype]
    idx = resolve_bit(bit, old.dtype)
    flip = u[:, 0] < prob
    if idx is None:
        bits = torch.floor(u[:, 1] * n_bits).to(torch.int64).clamp_(0, n_bits - 1)
    else:
        bits = torch.full((old.numel(),), idx, dtype=torch.int64)
    bits = torch.where(flip, bits, torch.full_like(bits, -1))
    # mask as the signed integer with the same bit pattern as 1 << bit
    one = torch.ones_like(bits)
    mask = torch.where(flip, torch.bitwise_left_shift(one, bits.clamp(min=0)), 0)
    if n_bits < 64:
        half = 1 << (n_bits - 1)
        mask = (mask + half) % (1 << n_bits) - half
    new_int = torch.bitwise_xor(old.view(int_dtype), mask.to(int_dtype))
    return new_int.view(old.dtype), bits


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")
PERTURBATIONS.add("zero", Perturbation("zero", _zero, None, (), "w -> 0"))
PERTURBATIONS.add("sign_flip", Perturbation("sign_flip", _sign_flip, 1.0, ("scale",), "w -> -s*w"))
PERTURBATIONS.add(
    "gauss_noise", Perturbation("gauss_noise", _gauss_noise, 0.1, ("scale", "seed"), "w -> w + s*|w|*eps"),
    aliases=("noise",),
)
PERTURBATIONS.add("bit_flip", Perturbation("bit_flip", _bit_flip, None, ("prob", "bit", "seed"),
                                           "flip one IEEE bit with probability p"))


# --------------------------------------------------------------------------- apply/restore


@dataclass(eq=False)
class Applied:
    """What ``apply`` did: enough to restore exactly and to report the condition."""

    method: str
    scale: float | None
    prob: float
    bit: object
    seed: int
    draw_index: int
    n_changed: int
    delta_w_norm: float
    bits: np.ndarray | None  # flipped bit per draw entry (draw order), -1 = none
    saved: list[tuple[int, torch.Tensor, torch.Tensor]] = field(repr=False)
    restored: bool | None = None

    def record(self) -> dict:
        """The JSON-able fields of a condition (the caller adds names and metrics)."""
        return {
            "method": self.method,
            "scale": self.scale,
            "prob": self.prob if self.method == "bit_flip" else None,
            "bit": self.bit if self.method == "bit_flip" else None,
            "n_changed": self.n_changed,
            "delta_w_norm": self.delta_w_norm,
            "restored": self.restored,
        }


def _flat(param: torch.Tensor) -> torch.Tensor:
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    if not data.is_contiguous():
        raise CwaError("cannot perturb a non-contiguous parameter in place")
    return data.view(-1)


def _uniforms(seed: int, draw_index: int, p: int, n: int) -> torch.Tensor:
    """The pairs (u_2j, u_2j+1) of the first n selected entries of parameter p (float64,
    on the CPU, where the K entries' arithmetic runs)."""
    return rng.uniform(seed, "noise", draw_index, p, shape=(n, 2), dtype=torch.float64)


def apply(
    params: list,
    draw: Draw,
    method: str,
    *,
    scale: float | None = None,
    prob: float = 1.0,
    bit="exponent_msb",
    seed: int = 0,
    draw_index: int = 0,
) -> Applied:
    """Perturb the entries of ``draw`` in ``params`` (aligned with Selection.params).

    Validates everything before touching any weight, so a usage error leaves the model
    unchanged. Returns the record needed by ``restore``.
    """
    pert = PERTURBATIONS.get(method)
    scale, prob = _check_scale_prob(pert, scale, prob)
    order = _sort_order(draw)
    pi_s = np.asarray(draw.param_index, dtype=np.int64)[order]
    fi_s = np.asarray(draw.flat_index, dtype=np.int64)[order]
    plan = _plan_groups(params, pert, bit, pi_s, fi_s)

    saved = []
    bits_sorted = np.full(len(pi_s), -1, dtype=np.int64) if pert.name == "bit_flip" else None
    n_changed = 0
    sq = 0.0
    with torch.no_grad():
        for p, flat, f, grp in plan:
            u = _uniforms(seed, draw_index, p, len(f)) if pert.needs_random else None
            idx, old, changed, d2, bits = _perturb_group(pert, flat, f, scale, prob, bit, u)
            saved.append((p, idx, old))
            n_changed += changed
            sq += d2
            if bits_sorted is not None:
                bits_sorted[grp] = bits.numpy()
    bits_out = None
    if bits_sorted is not None:
        bits_out = np.empty(len(bits_sorted), dtype=np.int8)  # bit indices are < 64
        bits_out[order] = bits_sorted
    return Applied(
        method=pert.name,
        scale=scale,
        prob=prob,
        bit=bit,
        seed=int(seed),
        draw_index=int(draw_index),
        n_changed=n_changed,
        delta_w_norm=math.sqrt(sq),
        bits=bits_out,
        saved=saved,
    )


def _check_scale_prob(
    pert: Perturbation, scale: float | None, prob: float
) -> tuple[float | None, float]:
    """The scale (the method's default when None; None for a method without one) and the
    probability, checked."""
    from cwa.checks import check_prob, check_scale

    scale = None if pert.default_scale is None else check_scale(pert.default_scale if scale is None else scale)
    return scale, check_prob(prob)


def _sort_order(draw: Draw) -> np.ndarray:
    """The draw's entries by parameter, then flat index. The sort is the largest cost of
    apply for big K, and a draw is applied once per condition, so it is kept on the draw."""
    pi = np.asarray(draw.param_index, dtype=np.int64)
    fi = np.asarray(draw.flat_index, dtype=np.int64)
    order = draw.__dict__.get("_cwa_sort_order")
    if order is None or len(order) != len(pi):
        dp, df = np.diff(pi), np.diff(fi)
        if bool(np.all((dp > 0) | ((dp == 0) & (df >= 0)))):
            order = np.arange(len(pi))  # random controls are stored sorted already
        else:
            order = np.lexsort((fi, pi))
        draw.__dict__["_cwa_sort_order"] = order
    return order


def _plan_groups(
    params: list, pert: Perturbation, bit, pi_s: np.ndarray, fi_s: np.ndarray
) -> list[tuple[int, torch.Tensor, np.ndarray, np.ndarray]]:
    """(param, its flat view, sorted flat indices, positions in the sorted draw) per
    parameter, every index and the bit checked before any weight is touched."""
    bounds = np.flatnonzero(np.diff(pi_s)) + 1
    groups = np.split(np.arange(len(pi_s)), bounds) if len(pi_s) else []
    plan = []
    for grp in groups:
        p = int(pi_s[grp[0]])
        if not 0 <= p < len(params):
            raise UsageError(f"selection refers to parameter {p}, but {len(params)} were given")
        flat = _flat(params[p])
        f = fi_s[grp]
        if f[0] < 0 or f[-1] >= flat.numel():
            raise UsageError(f"selection index out of range for parameter {p}")
        if len(f) > 1 and bool((np.diff(f) == 0).any()):
            raise UsageError(f"selection lists an entry of parameter {p} twice")
        if pert.name == "bit_flip":
            resolve_bit(bit, flat.dtype)
        plan.append((p, flat, f, grp))
    return plan


def _perturb_group(
    pert: Perturbation, flat: torch.Tensor, f: np.ndarray, scale: float | None, prob: float, bit,
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, int, float, torch.Tensor | None]:
    """Perturb entries `f` of one parameter in place: (their index on its device, the old
    values, how many changed, the squared size of the change, the bits flipped)."""
    idx = torch.from_numpy(f).to(flat.device)
    old = flat[idx].clone()
    # the arithmetic runs on the CPU copy of the K entries: float64 everywhere, the CPU
    # random streams, and no dependence on the device
    old_c = old.cpu()
    new, bits = pert.fn(old_c, scale, prob, bit, u)
    new = new.to(flat.dtype)
    flat.index_put_((idx,), new.to(flat.device))
    int_dtype = _BIT_LAYOUT.get(flat.dtype, (None,))[0]
    if int_dtype is not None:
        changed = old_c.view(int_dtype) != new.view(int_dtype)
    else:
        changed = old_c != new
    # unchanged bits count 0 even for a NaN; a changed non-finite entry gives inf/nan
    d = new.to(torch.float64) - old_c.to(torch.float64)
    d = torch.where(changed, d, torch.zeros_like(d))
    return idx, old, int(changed.sum()), float((d * d).sum()), bits


def restore(params: list, applied: Applied) -> bool:
    """Write the saved originals back; True when every touched entry is bit-identical."""
    ok = True
    with torch.no_grad():
        for p, idx, old in applied.saved:
            flat = _flat(params[p])
            if flat.dtype != old.dtype:  # the parameter was replaced: cannot be bit-exact
                flat.index_put_((idx,), old.to(flat.dtype))
                ok = False
                continue
            flat.index_put_((idx,), old)
            int_dtype = _BIT_LAYOUT.get(flat.dtype, (None,))[0]
            now = flat[idx]
            if int_dtype is not None:
                ok &= bool(torch.equal(now.view(int_dtype), old.view(int_dtype)))
            else:
                ok &= bool(torch.equal(now, old))
    applied.restored = ok
    return ok


@contextmanager
def perturbed(params: list, draw: Draw, method: str, **kwargs):
    """``with perturbed(params, draw, "zero") as rec:`` — restored on exit, even on error.

    ``rec.restored`` is set on exit.
    """
    applied = apply(params, draw, method, **kwargs)
    try:
        yield applied
    finally:
        restore(params, applied)


# --------------------------------------------------------------------------- statistics


def paired_bootstrap_ci(
    per_window_base: np.ndarray,
    per_window_cond: np.ndarray,
    token_counts: np.ndarray | None = None,
    B: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the delta NLL, resampling evaluation windows.

    Windows are resampled with replacement (the same resample for baseline and condition:
    the test is paired, so window difficulty cancels). Each replicate's delta is the
    target-weighted mean of the window deltas, Σ t_w (cond_w − base_w) / Σ t_w, which
    equals the mean over the replicate's targets; with equal target counts it is the plain
    mean. Randomness from ``rng.numpy_rng(seed, "bootstrap")``. A NaN window delta makes
    the interval NaN (it is reported, not raised).
    """
    base = np.asarray(per_window_base, dtype=np.float64)
    cond = np.asarray(per_window_cond, dtype=np.float64)
    if base.shape != cond.shape or base.ndim != 1:
        raise ValueError("per-window arrays must be 1-D and of the same length")
    n = len(base)
    if n == 0:
        return (math.nan, math.nan)
    t = np.ones(n) if token_counts is None else np.asarray(token_counts, dtype=np.float64)
    with np.errstate(all="ignore"):
        d = cond - base
        g = rng.numpy_rng(seed, "bootstrap")
        reps = np.empty(B)
        block = max(1, 2**22 // n)  # bounded memory for many windows
        for s in range(0, B, block):
            idx = g.integers(0, n, size=(min(block, B - s), n))
            tw = t[idx]
            reps[s : s + len(idx)] = (tw * d[idx]).sum(axis=1) / tw.sum(axis=1)
        if np.isnan(reps).any():
            return (math.nan, math.nan)
        alpha = (1.0 - level) / 2.0
        lo, hi = np.percentile(reps, [100 * alpha, 100 * (1 - alpha)])
    return (float(lo), float(hi))


def summarize(
    conditions: list[dict],
    per_window: dict,
    B: int = 1000,
    seed: int = 0,
) -> dict:
    """The ``summary`` block of ``perturbation_results.json``.

    ``conditions`` are the condition records (``name``, ``seed``, ``draw``, ``k``,
    ``delta_nll``, ...). ``per_window`` holds ``"baseline"`` (per-window NLL, [W]),
    ``"conditions"`` ([len(conditions), W], rows aligned with ``conditions``) and
    optionally ``"token_counts"`` ([W]).

    Only the conditions of the first top-K condition's seed and K are summarized (the
    other seeds are in ``conditions``; the summary keeps one comparison per file):

    - ``topk``: its ``delta_nll`` and a paired bootstrap ``ci95`` over windows (B
      replicates, bootstrap seed ``seed``).
    - a control with R ≥ 2 draws: ``mean``, ``std`` (ddof=1) and ``ci95`` (2.5th and 97.5th
      percentiles) of its draws' delta NLL, ``topk_p_value`` = (1 + #{draws ≥ topk}) / (R + 1)
      — a one-sided permutation-style p-value that the top-K hurts more than the control;
      NaN draws count as ≥ (conservative) — and ``topk_z`` = (topk − mean) / std (inf or
      nan when std is 0).
    - a control with one draw (bottom_k): ``delta_nll`` and its paired bootstrap ``ci95``,
      like the top-K.

    Every block also has ``n_draws`` and ``seed``.
    """
    out: dict = {}
    first = next((c for c in conditions if c.get("name") == "topk"), None)
    if first is None:
        return out
    the_seed, the_k = first.get("seed"), first.get("k")
    chosen = [
        i for i, c in enumerate(conditions) if c.get("seed") == the_seed and c.get("k") == the_k
    ]

    def boot(i: int) -> list[float]:
        return _bootstrap_ci(per_window, i, B, seed)

    i_top = conditions.index(first)
    topk_delta = _delta_of(conditions[i_top])
    out["topk"] = {
        "delta_nll": topk_delta,
        "ci95": boot(i_top),
        "n_draws": 1,
        "seed": the_seed,
    }
    for n in _control_names(conditions, chosen):
        idx = [i for i in chosen if conditions[i].get("name") == n]
        deltas = np.array([_delta_of(conditions[i]) for i in idx], dtype=np.float64)
        if len(deltas) == 1:
            out[n] = {"delta_nll": float(deltas[0]), "ci95": boot(idx[0]), "n_draws": 1}
        else:
            out[n] = _draws_summary(deltas, topk_delta)
        out[n]["seed"] = the_seed
    return out


def _delta_of(condition: dict) -> float:
    v = condition.get("delta_nll")
    return math.nan if v is None else float(v)


def _bootstrap_ci(per_window: dict, i: int, B: int, seed: int) -> list[float]:
    """The paired bootstrap ci95 of condition row `i` against the baseline (NaN without
    per-window values)."""
    base = per_window.get("baseline")
    rows = per_window.get("conditions")
    if base is None or rows is None:
        return [math.nan, math.nan]
    tokens = per_window.get("token_counts")
    return list(paired_bootstrap_ci(base, np.asarray(rows[i]), tokens, B=B, seed=seed))


def _control_names(conditions: list[dict], chosen: list[int]) -> list[str]:
    """The controls among the chosen conditions, in order of first appearance."""
    names: list[str] = []
    for i in chosen:
        n = conditions[i].get("name")
        if n != "topk" and n not in names:
            names.append(n)
    return names


def _draws_summary(deltas: np.ndarray, topk_delta: float) -> dict:
    """A control of R >= 2 draws against the top-K (see `summarize`)."""
    r = len(deltas)
    with np.errstate(all="ignore"):
        mean = float(np.mean(deltas))
        std = float(np.std(deltas, ddof=1))
        ci = [float(v) for v in np.percentile(deltas, [2.5, 97.5])]
        ge = int(np.sum((deltas >= topk_delta) | np.isnan(deltas)))
        p = math.nan if math.isnan(topk_delta) else (1 + ge) / (r + 1)
        z = float(np.float64(topk_delta - mean) / np.float64(std))
    return {
        "mean": mean,
        "std": std,
        "ci95": ci,
        "topk_p_value": p,
        "topk_z": z,
        "n_draws": r,
    }
