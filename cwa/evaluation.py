"""Evaluation on held-out windows: NLL, perplexity, token accuracy, bits per byte, and,
against a kept baseline pass, the exact KL divergence and top-1 agreement.

- `nll`: mean token NLL (nats) over all targets of all windows (float32 log-softmax,
  accumulated in float64);
- `perplexity` = exp(nll); `token_accuracy`: fraction of targets where argmax = target;
- `bits_per_byte`: summed NLL in bits over the summed UTF-8 bytes of the text the target
  tokens add, `windows.window_bytes` (counted in context by `cwa.data.count_window_bytes`;
  a window's first target is not decoded alone, which would lose a SentencePiece word's
  leading space). Null for `.npy` token windows, whose text is unknown. Windows built by
  hand with only the per-token table `windows.byte_lengths` sum the table over targets;
- `kl_from_baseline` = mean over targets of KL(p_baseline || p_perturbed), exact: the
  baseline's log-probabilities are kept (in memory up to `budget_bytes`, in a
  memory-mapped temporary file beyond it) so a baseline pass is computed once and reused
  by every perturbation condition; `top1_agreement`: fraction of targets where the two
  argmaxes agree.

Non-finite logits give `inf`/`nan` metrics, never an exception.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUDGET = 1 << 30  # bytes of baseline log-probabilities kept in RAM

#: The version of these definitions, part of every `eval` and `perturb` fingerprint: a
#: result computed under an older definition is never a cache hit. 2: bits_per_byte
#: counts the bytes a window's targets add in context (1 decoded each token alone).
EVAL_VERSION = 2


@dataclass
class BaselineCache:
    """Log-probabilities `[N, T-1, V]` and argmax `[N, T-1]` of the unperturbed model."""

    logp: Any  # np.ndarray or np.memmap, float32
    argmax: Any  # np.ndarray int64
    _tmpfile: str | None = None

    def close(self) -> None:
        self.logp = None
        if self._tmpfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmpfile)
            self._tmpfile = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_window_nll: Any  # np.ndarray [N] float64, mean NLL of each window
    baseline: BaselineCache | None = field(default=None, repr=False)


def evaluate(
    model,
    windows,
    *,
    batch_size: int = 8,
    baseline: BaselineCache | None = None,
    keep_baseline: bool = False,
    budget_bytes: int = DEFAULT_BUDGET,
    progress=None,
) -> EvalResult:
    """Evaluate `model` on `windows` (a `cwa.data.Windows`)."""
    import numpy as np
    import torch

    ids_all = windows.ids
    n, t = ids_all.shape
    device = next(model.parameters()).device
    wb, bl = _byte_counts(windows, n)
    sums = _EvalSums(per_window=np.zeros(n, dtype=np.float64))
    sums.total_bytes = int(wb.sum()) if wb is not None else 0
    if keep_baseline:
        sums.cache = _new_cache(n, t - 1, None, budget_bytes)

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            ids = ids_all[s : s + batch_size].to(device)
            _eval_batch(model, ids, s, sums, bl, baseline, keep_baseline, budget_bytes)
            if progress is not None:
                progress(ids.shape[0])
    if was_training:
        model.train()
    return EvalResult(_metrics(sums, n * (t - 1), n, baseline), sums.per_window, sums.cache)


@dataclass
class _EvalSums:
    """What `evaluate` accumulates over the batches."""

    per_window: Any  # np.ndarray [N] float64
    total_nll: float = 0.0
    correct: int = 0
    total_bytes: int = 0
    kl_sum: float = 0.0
    agree: int = 0
    cache: BaselineCache | None = None


def _byte_counts(windows, n: int) -> tuple[Any, Any]:
    """The windows' target bytes ([N] int64), or else the per-token byte table as a tensor
    (None when neither is known)."""
    import numpy as np
    import torch

    wb = getattr(windows, "window_bytes", None)
    if wb is not None:
        wb = np.asarray(wb, dtype=np.int64)
        if wb.shape != (n,):
            raise ValueError(f"window_bytes has shape {wb.shape}, expected ({n},)")
    bl = None if wb is not None or windows.byte_lengths is None else torch.as_tensor(windows.byte_lengths)
    return wb, bl


def _eval_batch(
    model, ids, s: int, sums: _EvalSums, bl, baseline: BaselineCache | None, keep_baseline: bool,
    budget_bytes: int,
) -> None:
    """One batch of windows `ids` (from window `s`, on the model's device) into `sums`."""
    import numpy as np
    import torch

    from cwa.losses import logits_of

    logits = logits_of(model, ids)[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = ids[:, 1:]
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()
    rows = slice(s, s + ids.shape[0])
    sums.per_window[rows] = nll.mean(dim=1).cpu().numpy()
    sums.total_nll += float(nll.sum())
    pred = logits.argmax(dim=-1)
    sums.correct += int((pred == tgt).sum())
    if bl is not None:
        sums.total_bytes += int(bl[tgt.cpu().clamp(max=len(bl) - 1)].sum())
    if keep_baseline:
        if sums.cache.logp is None:
            n, t = len(sums.per_window), ids.shape[1]
            sums.cache = _new_cache(n, t - 1, logp.shape[-1], budget_bytes)
        sums.cache.logp[rows] = logp.cpu().numpy()
        sums.cache.argmax[rows] = pred.cpu().numpy()
    if baseline is not None:
        lb = torch.from_numpy(np.asarray(baseline.logp[rows])).to(ids.device)
        kl = (lb.exp() * (lb - logp)).sum(-1)
        sums.kl_sum += float(kl.double().sum())
        ab = torch.from_numpy(baseline.argmax[rows]).to(ids.device)
        sums.agree += int((ab == pred).sum())


def _metrics(sums: _EvalSums, n_tok: int, n: int, baseline: BaselineCache | None) -> dict[str, Any]:
    nll_mean = sums.total_nll / n_tok
    metrics: dict[str, Any] = {
        "nll": nll_mean,
        "perplexity": _exp(nll_mean),
        "token_accuracy": sums.correct / n_tok,
        "bits_per_byte": (
            sums.total_nll / math.log(2) / sums.total_bytes if sums.total_bytes > 0 else None
        ),
        "n_tokens": n_tok,
        "n_windows": n,
    }
    if baseline is not None:
        metrics["kl_from_baseline"] = sums.kl_sum / n_tok
        metrics["top1_agreement"] = sums.agree / n_tok
    return metrics


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _new_cache(n: int, t: int, v: int | None, budget: int) -> BaselineCache:
    import numpy as np

    argmax = np.zeros((n, t), dtype=np.int64)
    if v is None:
        return BaselineCache(None, argmax)
    size = n * t * v * 4
    if size <= budget:
        return BaselineCache(np.empty((n, t, v), dtype=np.float32), argmax)
    fd, path = tempfile.mkstemp(prefix="cwa-baseline-", suffix=".f32")
    os.close(fd)
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, t, v))
    return BaselineCache(mm, argmax, path)
