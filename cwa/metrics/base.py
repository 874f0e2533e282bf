"""The one interface every sensitivity metric implements.

A metric is a small strategy object with explicit state (the Torch-Pruning
`Importance` + `accumulate_grad` shape, without mutable defaults):

    metric = SomeMetric(MetricOptions(seed=0))
    metric.begin(model, params)                  # allocate accumulators, register hooks
    for ids, window_indices in batches:
        metric.accumulate(ids, window_indices, n_total)   # add this batch's share
    metric.reduce(all_reduce)                    # optional: sum accumulators across ranks
    scores = metric.finish()                     # {name: float32 CPU tensor}

Every accumulator lives in the dict `metric.acc` and is a *sum* over windows already
divided by the total number of windows N (`n_total`), so each batch adds its share of the
mean, a sharded run only needs to all-reduce (sum) `acc`, and the result never depends on
the batch size. Accumulators are float32 (float64 where a count or a sum of many squares
needs it) whatever the model's dtype; gradients of bf16/fp16 models are cast to float32
before they are squared or multiplied.

Memory: the model, one set of gradients (returned by `torch.autograd.grad`, never stored
in `.grad`) and one float32 accumulator per scored parameter. No copy of the model is
made.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MetricOptions:
    """Options that change a metric's result (all of them go into the fingerprint).

    seed: seeds the label draws of `hessian_diag` and the probes of `hutchinson_diag`.
    mc_samples: S, label draws per window for `hessian_diag`.
    hutchinson_samples: P, Rademacher probes for `hutchinson_diag`.
    obd: turn a curvature score c into the Optimal Brain Damage saliency ½·c·w².
    """

    seed: int = 0
    mc_samples: int = 1
    hutchinson_samples: int = 8
    obd: bool = False

    def validate(self) -> None:
        from cwa.checks import check_positive, check_seed

        check_seed(self.seed)
        check_positive("--mc-samples", self.mc_samples)
        check_positive("--hutchinson-samples", self.hutchinson_samples)


class Metric(ABC):
    """Base class of a sensitivity metric; see the module docstring for the protocol.

    Class attributes describe what the caller must provide:
      needs_data    the metric reads calibration windows (False: `accumulate` is never called)
      needs_grad    scored parameters must require grad during `accumulate`
      second_order  double backward: the model must use eager attention
      signed        scores may be negative (ranked by absolute value by default)
      curvature     the score is a curvature c, so `--obd` (½·c·w²) is allowed
      options       the `MetricOptions` fields it reads besides `seed` and `obd` (they are
                    recorded in the artifact and its fingerprint; the seed always is)
      stochastic    it draws random numbers from the seed (labels, probes)
      float16_scores  its scores fit float16 (`--score-dtype float16` is allowed)
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    second_order: ClassVar[bool] = False
    signed: ClassVar[bool] = False
    curvature: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    stochastic: ClassVar[bool] = False
    float16_scores: ClassVar[bool] = False

    def __init__(self, options: MetricOptions | None = None) -> None:
        self.options = options if options is not None else MetricOptions()
        self.model = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.acc: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []

    # -- protocol ---------------------------------------------------------------------

    def begin(self, model, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Bind the model and the scored parameters; allocate one float32 accumulator each."""
        import torch

        self.model = model
        self.params = dict(params)
        self.acc = {
            name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for name, p in self.params.items()
        }

    @abstractmethod
    def accumulate(self, ids: torch.Tensor, window_indices: torch.Tensor, n_total: int) -> None:
        """Add the share of windows `ids` `[B, T]` (global indices `window_indices` `[B]`)
        to the accumulators; `n_total` is N, the number of calibration windows."""

    @abstractmethod
    def finish(self) -> dict[str, torch.Tensor]:
        """Scores: float32 CPU tensors with the names and shapes of the scored parameters."""

    def reduce(self, all_reduce: Callable[[torch.Tensor], object]) -> None:
        """Apply an in-place sum all-reduce to every accumulator, in a fixed order."""
        for name in self.acc:
            all_reduce(self.acc[name])

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Release hooks or other resources; safe to call more than once."""

    # -- helpers shared by the gradient metrics --------------------------------------

    def _grads(self, output, *, retain_graph: bool | None = None, create_graph: bool = False):
        """Gradients of a scalar w.r.t. the scored parameters (None where unused)."""
        import torch

        return torch.autograd.grad(
            output,
            list(self.params.values()),
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
        )

    def _weights_f32(self, name: str):
        return self.params[name].detach().float()


def as_float32_cpu(t) -> torch.Tensor:
    import torch

    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def input_device(model):
    """Device the token ids must live on (the input embedding's, else the first parameter's)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def window_index_tensor(window_indices: Sequence[int] | None, n: int):
    import torch

    if window_indices is None:
        return torch.arange(n, dtype=torch.long)
    wi = torch.as_tensor(
        list(window_indices) if not hasattr(window_indices, "shape") else window_indices
    )
    return wi.to(dtype=torch.long, device="cpu").reshape(-1)
