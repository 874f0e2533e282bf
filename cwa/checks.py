"""Every option's check, in one place and one wording: `FLAG VALUE: what it must be`.

The CLI, `cwa run`, the Python API and the lower layers (ranking, controls, metrics) call
these same functions, so a bad value reads the same wherever it is caught. Choices that
come from a registry (metrics, perturbations, controls) are checked by the registry
(`Registry.resolve`), which suggests the closest name.
"""

from __future__ import annotations

import math
import numbers

from cwa.errors import UsageError
from cwa.registry import check_choice

MODES = ("global", "per_layer")
RANK_BY = ("abs", "value")
SCORE_DTYPES = ("float32", "bfloat16", "float16")
SEED_LIMIT = 2**63  # seeds are stored as int64 in HDF5 attributes
MAX_CONTROL_DRAWS = 10_000  # each draw is one evaluation pass in cwa perturb


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_positive(flag: str, value: object, what: str = "a positive integer") -> int:
    if not _is_int(value) or int(value) <= 0:
        raise UsageError(f"{flag} {value}: must be {what}")
    return int(value)


def check_topk(k: object, flag: str = "--topk") -> int:
    return check_positive(flag, k, "a positive integer (K)")


def check_mode(mode: str) -> str:
    return check_choice("--mode", mode, MODES)


def check_rank_by(rank_by: str | None) -> str:
    """The ranking key; None means the default, abs."""
    return check_choice("--rank-by", rank_by or "abs", RANK_BY)


def check_seed(seed: object, flag: str = "--seed") -> int:
    if not _is_int(seed) or not -SEED_LIMIT <= int(seed) < SEED_LIMIT:
        raise UsageError(f"{flag} {seed}: a seed must be an integer that fits in 64 bits (|seed| < 2**63)")
    return int(seed)


def check_draws(draws: object) -> int:
    if not _is_int(draws) or not 1 <= int(draws) <= MAX_CONTROL_DRAWS:
        raise UsageError(
            f"--control-draws {draws}: must be between 1 and {MAX_CONTROL_DRAWS} "
            "(each draw costs one evaluation pass)"
        )
    return int(draws)


def check_score_dtype(dtype: str, metric_cls) -> str:
    """`--score-dtype`: one of SCORE_DTYPES, float16 only for metrics whose scores fit it."""
    check_choice("--score-dtype", dtype, SCORE_DTYPES)
    if dtype == "float16" and not getattr(metric_cls, "float16_scores", False):
        raise UsageError(
            f"--score-dtype float16: scores of {metric_cls.name} underflow float16; use bfloat16 or float32"
        )
    return dtype


def check_obd(obd: bool, metric_cls, metrics) -> None:
    """`--obd` (½·c·w²) needs a curvature metric (`metrics` is the registry)."""
    if obd and not getattr(metric_cls, "curvature", False):
        curvature = ", ".join(n for n in metrics.names() if metrics.get(n).curvature)
        raise UsageError(f"--obd needs a curvature metric ({curvature}), not {metric_cls.name}")


def check_scale(scale: float | None) -> float | None:
    if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale >= 0):
        raise UsageError(f"--perturb-scale {scale}: must be a finite number >= 0")
    return None if scale is None else float(scale)


def check_prob(prob: float) -> float:
    if not (isinstance(prob, numbers.Real) and math.isfinite(prob) and 0.0 <= prob <= 1.0):
        raise UsageError(f"--perturb-prob {prob}: must be a probability in [0, 1]")
    return float(prob)


BIT_NAMES = ("sign", "exponent_msb", "mantissa_msb", "random")


def check_bit(bit: str | int) -> str | int:
    """A named bit or a non-negative index (its range depends on the dtype: see
    `cwa.perturbation.resolve_bit`)."""
    if bit in BIT_NAMES:
        return bit
    try:
        v = int(bit)
    except (TypeError, ValueError):
        raise UsageError(
            f"--bit {bit!r}: choose {', '.join(BIT_NAMES)} or a bit index (0 = least significant)"
        ) from None
    if v < 0:
        raise UsageError(f"--bit {bit}: a bit index must be non-negative")
    return v


# The perturbation options and their defaults when not given (`None`): see
# `check_perturb_flags`.
PERTURB_FLAGS = {"scale": "--perturb-scale", "prob": "--perturb-prob", "bit": "--bit"}
DEFAULT_PROB = 1.0
DEFAULT_BIT = "exponent_msb"


def check_perturb_flags(
    method: str, *, scale: float | None = None, prob: float | None = None, bit: str | int | None = None
) -> tuple[float, str | int]:
    """Refuse a perturbation option given for a method that does not use it, instead of
    ignoring it: `--perturb-prob` and `--bit` mean something to bit_flip only,
    `--perturb-scale` to sign_flip and gauss_noise (each method's `uses` in the
    perturbation registry says which). None means "not given"; an option given at its
    default value (`--perturb zero --perturb-prob 1.0`) is refused too, since it was
    asked for. `method` "none" (`cwa run --perturb none`) uses none of them. Returns
    (prob, bit) with the defaults filled in (1.0, exponent_msb); their values are
    checked later, with the method's other options."""
    from cwa.perturbation import PERTURBATIONS

    uses: tuple[str, ...] = () if method == "none" else PERTURBATIONS.get(method).uses
    name = "none" if method == "none" else PERTURBATIONS.resolve(method)
    for opt, value in (("scale", scale), ("prob", prob), ("bit", bit)):
        if value is None or opt in uses:
            continue
        users = [n for n in PERTURBATIONS.names() if opt in PERTURBATIONS.get(n).uses]
        raise UsageError(
            f"{PERTURB_FLAGS[opt]} {value}: only --perturb {' or '.join(users)} uses it, "
            f"not --perturb {name}; drop the flag"
        )
    return (DEFAULT_PROB if prob is None else prob), (DEFAULT_BIT if bit is None else bit)


def check_controls(text: str) -> list[str]:
    """`--controls`: a comma list of control names exactly as listed (`cwa.controls.CONTROLS`,
    no aliases or abbreviations: `random` is refused, naming `random_k`), or `none`.
    Spaces around the commas are allowed; an empty entry, an unknown name or a duplicate
    is a usage error."""
    from cwa.controls import CONTROLS
    from cwa.registry import did_you_mean

    if text.strip() == "none":
        return []
    names = [x.strip() for x in text.split(",")]
    listed = CONTROLS.names()
    for n in names:
        if n not in listed:
            what = "an empty name" if not n else f"{n!r} is not a control"
            raise UsageError(
                f"--controls {text!r}: {what}.{did_you_mean(n, [*listed, 'none'])} "
                f"Choose from {', '.join(listed)} (comma-separated), or none."
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--controls {text!r}: contains duplicates")
    return names
