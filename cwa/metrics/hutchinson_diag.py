"""`hutchinson_diag`: score = (1/P) Σ_p z_p ⊙ (H z_p), z_p Rademacher (±1) over the scored
parameters, H the exact Hessian of the calibration loss L w.r.t. the scored parameters.

What it estimates: the diagonal of the exact Hessian (restricted to the scored
parameters), unbiased: E[z_i (Hz)_i] = H_ii + Σ_{j≠i} H_ij E[z_i z_j] = H_ii. The variance
of one probe is Σ_{j≠i} H_ij², so the error shrinks as 1/sqrt(P), P = `--hutchinson-samples`.

Intuition: the second-order Taylor term ½·H_ii·w² is the loss change when w is zeroed at a
minimum (OBD); Hutchinson's trick reads the diagonal of a matrix that is never formed,
from Hessian-vector products only.

Caveat: signed — the exact Hessian of a non-convex loss has negative diagonal entries —
so rank by |score| (the default); with few probes many entries are dominated by
off-diagonal noise, so compare seeds (`cwa stability`). Needs double backward, so the
model must use eager attention (fused kernels have no second derivative).

How H z is exact for the whole loss while windows are processed in batches: H is linear in
the windows, H = Σ_b H_b with H_b the Hessian of (Σ_{n∈b} ℓ_n)/N. Probe z_p for parameter i
is regenerated for every batch, on the parameter's own device, from the counter-based
stream (seed, "probe", p, i) of `cwa.rng` — i the parameter's position in the scored order,
entry j's sign the top bit of word j, in float32 — so every batch uses the same z_p and
Σ_b z_p ⊙ H_b z_p = z_p ⊙ H z_p. The result does not depend on the batch size, the device
or the number of ranks (a sharded run only sums the accumulators), and no probe is drawn on
the host or copied to the device.

Cost: per batch one forward, one backward with create_graph=True and P Hessian-vector
products (double backward through the retained graph), i.e. about 1 forward + (1 + 2P)
backward-equivalents per batch. Memory beyond the model: the float32 accumulator (4 bytes
per scored weight), the probe as autograd feeds it back through the graph (the model
dtype: 2 bytes in bf16), and transients the size of one tensor. No probe is stored (a
custom autograd node regenerates z in its backward, `probe_dot`); the first backward's
gradients are freed once the graph that made them is recorded (only that graph is needed,
`_release_gradients`); each HVP is added to its accumulator as soon as autograd produces
it (a post-accumulate-grad hook) and freed. A stop request
(SIGTERM / Ctrl-C, `cwa.stop`) is acted on between probes, so it waits for at most one
backward or one HVP.

Source: Hutchinson 1989 ("A stochastic estimator of the trace of the influence matrix"),
diagonal variant (Bekas et al. 2007); PyHessian (Yao et al. 2020); OBD saliency with a
Hessian diagonal: LeCun et al. 1990.
"""

from __future__ import annotations

import contextlib

from cwa import rng
from cwa.errors import CwaError
from cwa.losses import window_losses
from cwa.metrics.base import Metric, as_float32_cpu
from cwa.stop import check_stop


def rademacher(seed: int, probe: int, param_index: int, like):
    """The probe entries for one parameter: ±1 float32 from (seed, probe, p, i), with the
    shape and on the device of ``like`` (a tensor; a plain shape gives them on the CPU)."""
    import torch

    shape, device = (like.shape, like.device) if isinstance(like, torch.Tensor) else (like, None)
    return rng.rademacher(seed, "probe", probe, param_index, shape=shape, device=device,
                          dtype=torch.float32)


_PIECE = 1 << 22  # entries of a probe regenerated at a time (16 MB in float32)


def _probe_pieces(seed: int, probe: int, index: int, n: int, device, dtype):
    """(start, end, ±1 of the probe's entries start..end-1) for a flat tensor of n entries:
    the same values as `rademacher`, regenerated piece by piece where they are consumed."""
    for a in range(0, n, _PIECE):
        b = min(a + _PIECE, n)
        yield a, b, rng.rademacher(seed, "probe", probe, index, shape=(b - a,), device=device, dtype=dtype, offset=a)


def probe_dot(g, seed: int, probe: int, index: int):
    """A scalar node on g whose gradient w.r.t. g is the probe z of (seed, probe, index), in
    g's dtype: backpropagating it through g's graph gives H z. Its value is 0 (the value
    of g · z is never needed), so g's entries are never read, and z is never stored: it is
    regenerated in the backward."""
    import torch

    class ProbeDot(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g):
            # The value of g · z is never used, only its gradient z: g's entries are not
            # read (its storage may already be freed, `_release_gradients`).
            return torch.zeros((), dtype=torch.float32, device=g.device)

        @staticmethod
        def backward(ctx, grad_out):
            out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
            flat = out.view(-1)
            for a, b, z in _probe_pieces(seed, probe, index, flat.numel(), g.device, g.dtype):
                flat[a:b] = z
            return out.mul_(grad_out.to(g.dtype))

    return ProbeDot.apply(g)


def _storage_ptr(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        return None


def _recording(saved: set[int]):
    """A pack hook for the first backward (create_graph=True): note the storage of every
    tensor a node of the gradient's graph saves, and save it detached (the HVP backward
    runs without create_graph, so a saved tensor's own graph is never used; detaching
    avoids the reference cycle of a node saving its own output through a hook)."""

    def pack(t):
        ptr = _storage_ptr(t)
        if ptr is not None:
            saved.add(ptr)
        return t.detach()

    return pack


def _unpack(t):
    return t


def _release_gradients(grads, saved: set[int]) -> None:
    """Free the storage of every gradient no node of the double-backward graph saved.

    The HVPs need only the graph that produced g, not g's values (`probe_dot` never reads
    them), so holding every gradient through all P probes (2 bytes per weight in bf16, 4
    in float32) is memory for nothing. A gradient whose storage some node saved (e.g. an
    op that saves its output) is kept: freeing it would change what that node reads."""
    for g in grads:
        ptr = _storage_ptr(g)
        if ptr is None or ptr in saved or ptr == 0:
            continue
        with contextlib.suppress(RuntimeError):  # a storage torch cannot resize: kept
            g.untyped_storage().resize_(0)


class HutchinsonDiag(Metric):
    name = "hutchinson_diag"
    summary = "(1/P) sum_p z_p * (H z_p), Rademacher z: unbiased exact-Hessian diagonal, signed"
    second_order = True
    signed = True
    curvature = True
    options = ("hutchinson_samples",)
    stochastic = True

    def accumulate(self, ids, window_indices, n_total) -> None:
        import torch

        probes = int(self.options.hutchinson_samples)
        params = list(self.params.values())
        objective = window_losses(self.model, ids).sum() / n_total
        saved: set[int] = set()
        with torch.autograd.graph.saved_tensors_hooks(_recording(saved), _unpack):
            grads = self._grads(objective, create_graph=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the loss is linear in every scored parameter: H = 0
            return
        _release_gradients([grads[i] for i in live], saved)
        accs = list(self.acc.values())
        for p in range(probes):
            check_stop()  # each HVP is one uninterruptible C++ call: stop between them
            # Per-parameter products may live on different devices (--device-map auto):
            # bring each scalar to the loss's device before summing.
            dev = objective.device
            dot = sum(probe_dot(grads[i], self.options.seed, p, i).to(dev) for i in live)
            hooks = [params[i].register_post_accumulate_grad_hook(self._consumer(accs[i], p, i, probes))
                     for i in live]
            try:
                torch.autograd.backward(dot, inputs=[params[i] for i in live], retain_graph=p < probes - 1)
            except RuntimeError as e:  # fused attention kernels have no double backward
                if not any(k in str(e).lower() for k in ("derivative", "double backward")):
                    raise
                raise CwaError(
                    f"hutchinson_diag needs double backward, which this model's layers do "
                    f"not support ({e}). Load the model with eager attention "
                    f"(attn_implementation='eager')."
                ) from e
            finally:
                for h in hooks:
                    h.remove()
                for i in live:
                    params[i].grad = None
            del dot

    def _consumer(self, acc, probe: int, index: int, probes: int):
        """A post-accumulate-grad hook: add z ⊙ (Hz) of one parameter to its accumulator
        as soon as its HVP exists, the probe regenerated piece by piece, then free the HVP
        (so at most the HVPs the engine holds at once are alive, not one per parameter)."""
        seed = self.options.seed

        def consume(param) -> None:
            import torch

            hv, a_flat = param.grad.reshape(-1), acc.view(-1)
            for a, b, z in _probe_pieces(seed, probe, index, hv.numel(), hv.device, torch.float32):
                a_flat[a:b].addcmul_(z, hv[a:b].float(), value=1.0 / probes)
            param.grad = None

        return consume

    def finish(self):
        return {name: as_float32_cpu(acc) for name, acc in self.acc.items()}
