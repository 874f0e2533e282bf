"""Sensitivity metrics: one module per metric, all behind the `Metric` interface.

`METRICS` maps names (and aliases) to metric classes; `select_params` picks the scored
parameters; `compute_scores` runs a metric over calibration windows and returns one
float32 CPU tensor per scored parameter (plus notes for the user).

| name              | score                                  | module              |
|-------------------|----------------------------------------|---------------------|
| magnitude         | |w|                                    | magnitude.py        |
| grad_x_weight     | |w·g|                                  | grad_x_weight.py    |
| grad_squared      | (1/N) Σ_n g_n²                         | grad_squared.py     |
| hessian_diag      | (T/(N·S)) Σ_n Σ_s ĝ_{n,s}²             | hessian_diag.py     |
| hutchinson_diag   | (1/P) Σ_p z_p ⊙ H z_p                  | hutchinson_diag.py  |
| act_mag           | |W_ij|·RMS_j                           | act_mag.py          |

`--obd` turns a curvature score c into ½·c·w² (curvature metrics only).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from contextlib import contextmanager

from cwa.errors import UsageError
from cwa.metrics.act_mag import ActMag
from cwa.metrics.base import Metric, MetricOptions, input_device, window_index_tensor
from cwa.metrics.grad_squared import GradSquared
from cwa.metrics.grad_x_weight import GradXWeight
from cwa.metrics.hessian_diag import HessianDiag
from cwa.metrics.hutchinson_diag import HutchinsonDiag
from cwa.metrics.magnitude import Magnitude
from cwa.registry import Registry
from cwa.stop import check_stop

__all__ = [
    "METRICS",
    "Metric",
    "MetricOptions",
    "compute_scores",
    "get_metric",
    "obd_saliency",
    "select_params",
]

METRICS: Registry[type[Metric]] = Registry("metric")
METRICS.add("magnitude", Magnitude, aliases=("weight_magnitude", "abs"))
METRICS.add("grad_x_weight", GradXWeight, aliases=("taylor", "gradxweight", "grad_weight"))
METRICS.add("grad_squared", GradSquared, aliases=("fisher", "empirical_fisher"))
METRICS.add("hessian_diag", HessianDiag, aliases=("gauss_newton", "ggn", "true_fisher"))
METRICS.add("hutchinson_diag", HutchinsonDiag, aliases=("hutchinson",))
METRICS.add("act_mag", ActMag, aliases=("wanda",))


def get_metric(name: str) -> type[Metric]:
    """The metric class for a name or alias (UsageError with suggestions if unknown)."""
    return METRICS.get(name)


def select_params(model, include: list[str] | None = None, exclude: list[str] | None = None):
    """The scored parameters, `{name: Parameter}` in `named_parameters()` order.

    Default: every parameter with two or more dimensions. `include` (fnmatch globs)
    replaces the default by every parameter matching any pattern, whatever its
    dimension; `exclude` then removes every parameter matching any pattern. A tied
    parameter is listed once, under the name `named_parameters()` gives it, and
    patterns match any of its names (so `lm_head.weight` selects GPT-2's tied
    `transformer.wte.weight`). An empty result is a UsageError naming the patterns.
    """
    include = [p for p in (include or []) if p]
    exclude = [p for p in (exclude or []) if p]
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)

    def matches(p, patterns) -> bool:
        return any(fnmatch.fnmatchcase(n, pat) for n in aliases[id(p)] for pat in patterns)

    chosen = {}
    for name, p in model.named_parameters():
        keep = matches(p, include) if include else p.ndim >= 2
        if keep and not (exclude and matches(p, exclude)):
            chosen[name] = p
    if not chosen:
        raise UsageError(
            "No parameters left to score "
            f"(include={include or ['<every parameter with 2+ dims>']}, exclude={exclude}). "
            "Check the --include/--exclude patterns against the model's parameter names "
            "(`cwa info MODEL` lists them)."
        )
    return chosen


def obd_saliency(curvature: dict, params: dict) -> dict:
    """Optimal Brain Damage saliency ½·c·w² (float32 CPU) for curvature scores c."""
    import torch

    return {
        name: (0.5 * c * params[name].detach().to("cpu", torch.float32).square()).contiguous()
        for name, c in curvature.items()
    }


@contextmanager
def scoring_mode(model, params: dict, needs_grad: bool):
    """eval(), gradients only for the scored parameters; restores flags and mode after."""
    import torch

    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    scored = {id(p) for p in params.values()}
    try:
        model.eval()
        for p, _ in saved:
            want = needs_grad and id(p) in scored
            if p.requires_grad != want:
                p.requires_grad_(want)
        with torch.enable_grad() if needs_grad else torch.no_grad():
            yield
    finally:
        for p, flag in saved:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        model.train(was_training)


def _checkpoint_blocks(model) -> list:
    """The modules to checkpoint: transformers' per-block `GradientCheckpointingLayer`s,
    else the classes the model names in `_no_split_modules` (its transformer blocks)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as layer_cls
    except ImportError:  # pragma: no cover - older transformers
        layer_cls = None
    named = list(model.named_modules())
    chosen = [(n, m) for n, m in named if layer_cls is not None and isinstance(m, layer_cls)]
    if not chosen:
        classes = set(getattr(model, "_no_split_modules", None) or [])
        chosen = [(n, m) for n, m in named if type(m).__name__ in classes]
    # outermost only: a block inside a checkpointed block is recomputed with it anyway
    outer, prefixes = [], []
    for n, m in chosen:
        if not any(n.startswith(p + ".") for p in prefixes):
            outer.append(m)
            prefixes.append(n)
    return outer


@contextmanager
def checkpointed_blocks(model, enabled: bool = True):
    """Activation (gradient) checkpointing of every transformer block while scoring.

    transformers' own switch (`gradient_checkpointing_enable`) only acts in training
    mode, and scoring runs in eval mode (no dropout), so each block's `forward` is
    wrapped here instead: with gradients enabled it runs under non-reentrant
    `torch.utils.checkpoint`, which keeps only the block's inputs and recomputes its
    activations when the backward pass needs them. Non-reentrant checkpointing supports
    `torch.autograd.grad`, `retain_graph` and double backward (Hessian-vector products),
    and without dropout the recomputation is exact, so the scores do not change. The
    wrappers are removed on exit.
    """
    if not enabled:
        yield
        return
    import torch
    from torch.utils.checkpoint import checkpoint

    blocks = _checkpoint_blocks(model)
    if not blocks:
        raise UsageError(
            f"--grad-checkpointing: no transformer blocks found in {type(model).__name__} "
            "(neither transformers' GradientCheckpointingLayer nor _no_split_modules)."
        )

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return checkpointed

    wrapped = []
    try:
        for block in blocks:
            if "forward" in vars(block):  # already wrapped by someone: leave it alone
                continue
            block.forward = wrap(block.forward)
            wrapped.append(block)
        yield
    finally:
        for block in wrapped:
            del block.forward


def compute_scores(
    model,
    params: dict,
    ids,
    window_indices: Sequence[int] | None,
    metric: str,
    options: MetricOptions | None = None,
    batch_size: int = 8,
    progress: Callable[[int], object] | None = None,
    *,
    dist=None,
    grad_checkpointing: bool = False,
) -> tuple[dict, list[str]]:
    """Score `params` of `model` on calibration windows `ids` `[N, T]`.

    `window_indices` are the windows' global indices (they seed the per-window label
    draws, so a window scores the same in any batch or shard). Returns
    `(scores, notes)`: float32 CPU tensors in `params` order (act_mag may leave some
    out, explained in `notes`). `progress(n_done)` is called after each batch with the
    number of windows this process has done so far. Batch size changes neither the
    definition nor, up to float summation order, the result.

    `dist` (a `cwa.distributed.Dist`): this process accumulates only its shard of the
    windows (each still divided by the global N), then the accumulators are summed over
    the ranks, so every rank returns the scores of all N windows. `grad_checkpointing`
    recomputes each transformer block's activations during the backward pass instead
    of keeping them (less memory, about one more forward; same result).

    A pending stop request (`cwa.stop.check_stop()`: SIGTERM / Ctrl-C under the console
    script) raises between batches, and inside the metrics between windows, label draws
    and Hessian-vector products.
    """
    options = options if options is not None else MetricOptions()
    options.validate()
    cls = get_metric(metric)
    _check_request(model, params, cls, options, batch_size)
    ids, windows = _check_windows(cls, ids, window_indices) if cls.needs_data else (None, None)
    _check_not_offloaded(params)

    scorer = cls(options)
    checkpoint = grad_checkpointing and cls.needs_grad
    with scoring_mode(model, params, needs_grad=cls.needs_grad), checkpointed_blocks(
        model, checkpoint
    ):
        try:
            scorer.begin(model, params)
            if cls.needs_data:
                _accumulate_windows(scorer, model, ids, windows, int(batch_size), progress, dist)
            scores = scorer.finish()
        finally:
            scorer.close()
    if options.obd:
        scores = obd_saliency(scores, params)
    ordered = {name: scores[name] for name in params if name in scores}
    return ordered, list(scorer.notes)


def _check_request(
    model, params: dict, cls: type[Metric], options: MetricOptions, batch_size: int
) -> None:
    """The options, batch size and parameters make sense for this metric and model."""
    from cwa.checks import check_obd, check_positive

    check_obd(options.obd, cls, METRICS)
    check_positive("--batch-size", batch_size)
    if not params:
        raise UsageError("No parameters to score.")
    owned = {id(p) for p in model.parameters()}
    stray = [n for n, p in params.items() if id(p) not in owned]
    if stray:
        raise ValueError(f"parameters not in the model: {stray[:5]}")


def _check_windows(cls: type[Metric], ids, window_indices: Sequence[int] | None) -> tuple:
    """The calibration windows as `[N, T]` int64 token ids, and their global indices."""
    import torch

    if ids is None:
        raise UsageError(f"Metric {cls.name!r} needs calibration data.")
    ids = torch.as_tensor(ids)
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] < 1:
        raise UsageError(
            f"Calibration windows must be [N, T] token ids with N >= 1 and T >= 2, "
            f"got shape {tuple(ids.shape)}."
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise UsageError(f"Calibration windows must be integer token ids, got {ids.dtype}.")
    ids = ids.long()
    n_total = ids.shape[0]
    windows = window_index_tensor(window_indices, n_total)
    if windows.numel() != n_total:
        raise UsageError(f"{windows.numel()} window indices for {n_total} calibration windows.")
    return ids, windows


def _check_not_offloaded(params: dict) -> None:
    offloaded = [n for n, p in params.items() if p.device.type == "meta"]
    if offloaded:
        raise UsageError(
            f"{len(offloaded)} scored parameter(s) are offloaded (on the meta device), e.g. "
            f"{offloaded[0]!r}: a score needs the weights and their gradients in memory. Give "
            "the model more device or CPU memory (--device-map auto keeps what fits in GPU "
            "memory and the rest on the CPU), or score fewer parameters with --include."
        )


def _accumulate_windows(
    scorer: Metric,
    model,
    ids,
    windows,
    batch_size: int,
    progress: Callable[[int], object] | None,
    dist,
) -> None:
    """Feed this process's windows (all of them, or its shard under `dist`) to the scorer
    batch by batch, then sum the accumulators over the ranks."""
    import torch

    n_total = ids.shape[0]
    device = input_device(model)
    mine = (
        torch.arange(n_total, dtype=torch.long)
        if dist is None
        else torch.as_tensor(list(dist.shard(n_total)), dtype=torch.long)
    )
    done = 0
    for start in range(0, mine.numel(), batch_size):
        check_stop()  # SIGTERM / Ctrl-C: stop between batches (cwa.stop)
        pos = mine[start : start + batch_size]
        scorer.accumulate(ids[pos].to(device), windows[pos], n_total)
        done += pos.numel()
        if progress is not None:
            progress(done)
    check_stop()
    if dist is not None:
        scorer.reduce(dist.all_reduce)
