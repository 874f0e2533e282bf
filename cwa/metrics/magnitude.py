"""`magnitude`: score = |w|.

What it estimates: nothing about the data; it is the classic magnitude-pruning criterion
(small weights are assumed to matter least) and the baseline every data-driven metric
must beat.

Intuition: zeroing w changes a layer's output by w·x, so with inputs of similar scale the
largest weights cause the largest changes.

Caveat: it ignores the input scale (a large weight on a feature that is always ~0 is
harmless; see `act_mag`) and the loss curvature (see `hessian_diag`); across tensors of
different scale a global ranking mostly ranks tensors.

Cost: no forward or backward pass; one pass over the parameters.

Source: magnitude pruning (Han et al. 2015, "Learning both Weights and Connections").
"""

from __future__ import annotations

from cwa.metrics.base import Metric, as_float32_cpu


class Magnitude(Metric):
    name = "magnitude"
    summary = "|w|, no data needed"
    needs_data = False
    needs_grad = False
    float16_scores = True

    def begin(self, model, params) -> None:
        self.model = model
        self.params = dict(params)
        self.acc = {}  # nothing to accumulate

    def accumulate(self, ids, window_indices, n_total) -> None:
        """No data is used."""

    def finish(self):
        return {name: as_float32_cpu(p.detach().abs()) for name, p in self.params.items()}
