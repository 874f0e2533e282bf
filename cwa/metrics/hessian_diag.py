"""`hessian_diag`: score = (T/(N·S)) Σ_n Σ_s ĝ_{n,s}², a Monte-Carlo estimate of the
diagonal of the Gauss-Newton (= true Fisher) matrix of the calibration loss L.

ĝ_{n,s} is the gradient of window n's mean loss with every target replaced by a label
y_t ~ p_θ(· | context_t) drawn from the model's own predictive distribution (softmax of
the float32 logits, detached) at that position; S = `--mc-samples` draws per window;
T = seq_len − 1 targets per window; N windows.

What it estimates: for the cross-entropy of a softmax output the Gauss-Newton matrix
equals the Fisher, G = (1/N) Σ_n (1/T) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t, and its diagonal
is (1/N) Σ_n (1/T) Σ_t E_{y~p_t}[(∂ℓ_t(y)/∂w)²]. Labels at different positions are drawn
independently and E_y[∂ℓ_t(y)/∂w] = 0, so the cross terms of ĝ² vanish in expectation:
E[ĝ²] = (1/T²) Σ_t E[(∂ℓ_t/∂w)²], hence T·ĝ² is unbiased for the window's diagonal and the
score is unbiased for diag(G), on the scale of the Hessian of L. It is non-negative.

Intuition: G is the part of the Hessian that survives near a good fit (the residual term
vanishes where the model's predictions are right), and unlike `grad_squared` it does not
depend on which labels the data happen to contain.

Caveat: it is the Gauss-Newton / Fisher diagonal, not the exact Hessian diagonal (that has
an extra, indefinite term; see `hutchinson_diag`); with S = 1 the estimate per weight is
noisy (relative std about sqrt(2/N) for a roughly Gaussian ĝ), larger S averages it down.
Labels are drawn on the logits' device by inverse CDF: position t takes the first
token whose cumulative probability (float64 cumsum of the softmax) exceeds u_t times the
total, u_t word t of the counter-based stream `(seed, "label", window_index, s)` of
`cwa.rng` — so each window's labels never depend on the batch size or the rank, the
uniforms not on the device, and nothing of size [T, V] leaves the device.

Cost: per window one forward and S backward passes (the S draws share the forward graph),
i.e. N forwards and N·S backwards at batch size 1. Memory: model + one gradient set + one
float32 accumulator (+ one window's graph).

Source: Fisher / Gauss-Newton diagonal as a curvature proxy: Martens 2014 ("New insights
and perspectives on the natural gradient method"), sampled-label ("true") Fisher vs the
empirical Fisher: Kunstner et al. 2019; curvature-based saliency: OBD (LeCun et al. 1990).
"""

from __future__ import annotations

from cwa import rng
from cwa.losses import logits_of, token_nll
from cwa.metrics.base import Metric, as_float32_cpu
from cwa.stop import check_stop


def sample_labels(cdf, seed: int, window_index: int, draw: int):
    """One label per row of ``cdf`` ([T, V] cumulative probabilities, on any device):
    the first token v with cdf[t, v] > u_t · cdf[t, -1], u_t from (seed, "label", window,
    draw). A token of probability zero is never drawn (its cdf equals its predecessor's)."""
    import torch

    u = rng.uniform(seed, "label", window_index, draw, shape=(cdf.shape[0],), device=cdf.device,
                    dtype=torch.float64)
    total = cdf[:, -1:].contiguous()
    labels = torch.searchsorted(cdf, u.unsqueeze(1).mul_(total), right=True)
    # u·total rounds up to total at most once in 2^53: fall back to the last likely token
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(labels, last).squeeze(1)


class HessianDiag(Metric):
    name = "hessian_diag"
    summary = "(T/(N*S)) sum_n sum_s g_hat^2 with labels sampled from the model: Gauss-Newton/Fisher diagonal"
    curvature = True
    options = ("mc_samples",)
    stochastic = True

    def accumulate(self, ids, window_indices, n_total) -> None:
        import torch

        draws = int(self.options.mc_samples)
        targets = ids.shape[1] - 1
        scale = targets / (n_total * draws)
        for n in range(ids.shape[0]):
            check_stop()  # stop between windows and between draws (one backward each)
            window = ids[n : n + 1]
            logits = logits_of(self.model, window)
            cdf = torch.softmax(logits[0, :-1].detach(), dim=-1, dtype=torch.float64).cumsum_(-1)
            for s in range(draws):
                if s:
                    check_stop()
                labels = sample_labels(cdf, self.options.seed, int(window_indices[n]), s)
                # token_nll reads targets from positions 1..T-1 of its ids: put the draws there.
                sampled = torch.cat([window[0, :1], labels.to(window.device)]).unsqueeze(0)
                loss = token_nll(logits, sampled).mean()
                grads = self._grads(loss, retain_graph=s < draws - 1)
                for acc, g in zip(self.acc.values(), grads, strict=True):
                    if g is not None:
                        g = g.float()
                        acc.addcmul_(g, g, value=scale)
            del logits

    def finish(self):
        return {name: as_float32_cpu(acc) for name, acc in self.acc.items()}
