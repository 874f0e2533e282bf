"""`grad_squared` (alias `fisher`): score = (1/N) Σ_n g_n², g_n = ∂ℓ_n/∂w the gradient
of window n's loss.

What it estimates: the diagonal of the *empirical* Fisher information of the calibration
windows (per-window gradients with the true next tokens as labels), a cheap stand-in for
the loss curvature along each weight.

Intuition: a weight whose gradient is consistently large across windows sits on a steep,
curved part of the loss surface; perturbing it costs loss on many windows. Squaring each
window's gradient *before* averaging keeps windows that pull in opposite directions from
cancelling, which the square of the mean gradient ((Σ g_n / N)²) would not.

Caveat: the empirical Fisher uses the data's labels, not the model's, so it is not the
Fisher information nor the Gauss-Newton matrix (see `hessian_diag` for the unbiased
version; Kunstner et al. 2019 on the difference). Its scale is that of squared gradients
of a mean loss, not of the Hessian. With `--obd`, ½·c·w² is the OBD saliency.

Cost: one forward and one backward pass *per window* (batch size 1), i.e. N forwards and
N backwards. Per-window gradients are never held at once: each is squared into the
accumulator and dropped. torch.func `vmap` per-sample gradients were measured as the
alternative (CPU, 2-layer GPT-2, batch 8): faster only on toy models (≤ 2x at width 16),
as fast or slower from width 256 / 128 tokens on (1.0 s vs 1.1 s at width 512 / 256
tokens), and they hold B gradient copies, which breaks the memory budget
(model + gradients + one accumulator) on large models; so the loop is used.

Source: empirical Fisher / squared-gradient (Fisher pruning) importance, e.g. Molchanov
et al. 2019 and LLM-Pruner (Ma et al. 2023, second-order term approximated by the Fisher);
OBD saliency: LeCun et al. 1990.
"""

from __future__ import annotations

from cwa.losses import window_losses
from cwa.metrics.base import Metric, as_float32_cpu
from cwa.stop import check_stop


class GradSquared(Metric):
    name = "grad_squared"
    summary = "(1/N) sum_n g_n^2: empirical Fisher diagonal from per-window gradients"
    curvature = True

    def accumulate(self, ids, window_indices, n_total) -> None:
        scale = 1.0 / n_total
        for n in range(ids.shape[0]):
            check_stop()  # stop between windows (one backward each)
            loss = window_losses(self.model, ids[n : n + 1])[0]
            for acc, g in zip(self.acc.values(), self._grads(loss), strict=True):
                if g is not None:
                    g = g.float()
                    acc.addcmul_(g, g, value=scale)

    def finish(self):
        return {name: as_float32_cpu(acc) for name, acc in self.acc.items()}
