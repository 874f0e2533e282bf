"""`act_mag` (alias `wanda`): score = |W_ij| · RMS_j, RMS_j = sqrt(mean of x_j² over every
input position of every calibration window), x the input of the layer that uses W.

What it estimates: the typical magnitude of weight W_ij's contribution W_ij·x_j to the
layer's output on the calibration data. It is Wanda's criterion |W_ij|·‖X_j‖₂ up to one
global constant (‖X_j‖₂ = sqrt(N·T)·RMS_j): the RMS is used so that scores do not grow
with the number of windows.

Intuition: LLMs have a few input features with huge activations; a small weight on such a
feature can matter more than a large weight on a feature that is almost always zero.

Layout — the feature j a weight multiplies:
  - `nn.Linear`, weight [out, in]: RMS over the input features, applied to columns.
  - GPT-2 `transformers.pytorch_utils.Conv1D`, weight [in, out] (transposed): applied to rows.
  - `nn.Embedding` (token and position embeddings), weight [V, d]: the input is one-hot, so
    RMS_v = sqrt(frequency of index v among that embedding's inputs), applied to row v.
  - A weight tied between the input embedding and an `nn.Linear` output head (the same
    Parameter object) is scored in its head role: x = the head's input hidden states.
  - Any other scored parameter (a norm weight the user included, a weight of another kind
    of module) is excluded from the result, with one note listing it.

Caveat: Wanda compares weights within one output row (per-output pruning); cwa's global
ranking compares them across rows and tensors, where activation scales differ by layer.
It ignores the loss entirely (no gradient).

Cost: one forward pass per batch, no backward (forward hooks sum x² in float64 per input
feature and count positions; memory is one vector per layer).

Source: Wanda, Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models".
"""

from __future__ import annotations

from cwa.losses import logits_of
from cwa.metrics.base import Metric, as_float32_cpu

_PRIORITY = ("linear", "conv1d", "embedding")  # a tied head+embedding weight takes "linear"
_MAX_LISTED = 8


def _module_kind(module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


class ActMag(Metric):
    name = "act_mag"
    summary = "|W_ij| * RMS_j of the layer input (Wanda, RMS instead of the l2 norm)"
    needs_grad = False

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.kinds: dict[str, str] = {}
        self._handles: list = []

    def begin(self, model, params) -> None:
        import torch

        self.model = model
        self.params = dict(params)
        self.acc = {}
        self.kinds = {}
        self.notes = []

        owners: dict[int, list[tuple[object, str]]] = {}
        for module in model.modules():
            weight = module._parameters.get("weight")
            kind = _module_kind(module) if weight is not None else None
            if kind is not None:
                owners.setdefault(id(weight), []).append((module, kind))

        excluded = []
        for name, p in self.params.items():
            found = owners.get(id(p), [])
            kind = next((k for k in _PRIORITY if any(k == fk for _, fk in found)), None)
            if kind is None:
                excluded.append(name)
                continue
            self.kinds[name] = kind
            modules = [m for m, k in found if k == kind]
            # the feature axis: Linear [out, in] -> in; Conv1D [in, out] -> in; Embedding [V, d] -> V
            width = p.shape[1] if kind == "linear" else p.shape[0]
            self.acc[f"{name}:sumsq"] = torch.zeros(width, dtype=torch.float64, device=p.device)
            self.acc[f"{name}:count"] = torch.zeros((), dtype=torch.float64, device=p.device)
            for m in modules:
                self._handles.append(m.register_forward_hook(self._hook(name, kind)))
        if excluded:
            self._note_excluded(
                excluded, "not the weight of an nn.Linear, GPT-2 Conv1D or nn.Embedding"
            )

    def _hook(self, name: str, kind: str):
        import torch

        sumsq, count = self.acc[f"{name}:sumsq"], self.acc[f"{name}:count"]

        def hook(module, inputs, output):
            x = inputs[0].detach()
            if kind == "embedding":
                idx = x.reshape(-1).to(sumsq.device)
                sumsq.add_(torch.bincount(idx, minlength=sumsq.shape[0]).to(torch.float64))
                count.add_(idx.numel())
            else:
                x = x.reshape(-1, x.shape[-1]).to(sumsq.device)
                sumsq.add_(x.float().square().sum(0, dtype=torch.float64))
                count.add_(x.shape[0])

        return hook

    def _note_excluded(self, names: list[str], why: str) -> None:
        listed = ", ".join(names[:_MAX_LISTED])
        more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
        self.notes.append(
            f"act_mag: excluded {len(names)} scored parameter(s) ({why}): {listed}{more}."
        )

    def accumulate(self, ids, window_indices, n_total) -> None:
        import torch

        with torch.no_grad():
            logits_of(self.model, ids)

    def finish(self):
        self.close()
        scores, unused = {}, []
        for name, p in self.params.items():
            kind = self.kinds.get(name)
            if kind is None:
                continue
            count = float(self.acc[f"{name}:count"])
            if count == 0:
                unused.append(name)
                continue
            rms = (self.acc[f"{name}:sumsq"] / count).sqrt().float()
            w = p.detach().float().abs()
            scores[name] = as_float32_cpu(w * (rms[None, :] if kind == "linear" else rms[:, None]))
        if unused:
            self._note_excluded(unused, "their layer never ran on the calibration windows")
        return scores

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
