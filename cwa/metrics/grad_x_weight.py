"""`grad_x_weight`: score = |w · g|, g = ∂L/∂w over all calibration windows.

What it estimates: the first-order Taylor estimate of the change of the calibration loss L
when w is set to zero: L(w=0) − L ≈ −g·w, so |g·w| is the predicted loss change in
absolute value.

Intuition: a weight matters when the loss is steep along it *and* removing it is a long
step (large |w|).

Caveat: at a well-trained minimum g → 0 and the first-order term underestimates the true
change, which is then dominated by the second-order term ½·H_ww·w² (see the curvature
metrics with `--obd`). g is the gradient of the mean loss, so per-window gradients of
opposite sign cancel (compare `grad_squared`).

Cost: one forward and one backward pass per batch of windows.

Source: Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning" (Taylor
importance); LLM-Pruner (Ma et al. 2023) uses the same element-wise first-order term.
"""

from __future__ import annotations

from cwa.losses import window_losses
from cwa.metrics.base import Metric, as_float32_cpu


class GradXWeight(Metric):
    name = "grad_x_weight"
    summary = "|w·g|, g = dL/dw: first-order Taylor estimate of the loss change when w is zeroed"

    def accumulate(self, ids, window_indices, n_total) -> None:
        # L is a mean over all N windows, so this batch contributes sum(losses) / N.
        objective = window_losses(self.model, ids).sum() / n_total
        for acc, g in zip(self.acc.values(), self._grads(objective), strict=True):
            if g is not None:
                acc.add_(g.float())

    def finish(self):
        # |w·g| is built in the accumulator itself (g·w and w·g are the same floats), so no
        # second float32 tensor per scored weight is made beside the accumulators: on the
        # CPU, where the scores are the accumulators, the peak is 4 bytes per weight lower
        return {
            name: as_float32_cpu(acc.mul_(self._weights_f32(name)).abs_())
            for name, acc in self.acc.items()
        }
