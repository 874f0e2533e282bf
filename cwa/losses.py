"""The loss every stage agrees on.

A window is a row of token ids `[T]`. Its targets are positions 1..T-1 (the first
position, BOS when the tokenizer has one, is never a target). The loss of a window is the
mean next-token NLL over its targets; the calibration objective L is the mean of the
window losses. Logits are upcast to float32 before the log-softmax, so the loss is float32
whatever the model's dtype.
"""

from __future__ import annotations


def logits_of(model, ids):
    """Logits `[B, T, V]` of a causal LM for token ids `[B, T]` (no attention mask: windows are full)."""
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def token_nll(logits, ids):
    """Per-target NLL `[B, T-1]` in float32: -log p(ids[:, t+1] | ids[:, :t+1])."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def window_losses(model, ids):
    """Mean target NLL of each window, `[B]` float32 (differentiable)."""
    return token_nll(logits_of(model, ids), ids).mean(dim=1)
