"""Memory plan for `cwa score` on one GPU, computed from parameter counts.

    python benchmarks/memory_plan.py                      # Llama-3.1-8B, bf16, 80 GiB
    python benchmarks/memory_plan.py --batch-size 4 --seq-len 512
    python benchmarks/memory_plan.py --validate           # formula vs measured, small model on CPU

The terms (bytes; P = scored parameters, all 2-D weights by default; d = model dtype size):
  W   weights                              all parameters x d
  A   float32 accumulators                 P x 4 (act_mag: one float64 per input feature)
  G   gradients from autograd.grad          P x d, all alive at the end of a backward pass
  T   float32 cast of one gradient          the largest scored tensor x 4 (in accumulate)
  Z   Hutchinson probes, float32            P x 4 (all probes of one draw are alive at once)
  HV  Hessian-vector products               P x d
  act saved activations of one pass         tokens x layers x per-token-per-layer bytes
  lg  logits and the float32 loss           tokens x vocab x (2 + 4 + 4 + 4 + 2)
per-token-per-layer bytes of a Llama block (bf16, eager attention), saved for backward:
  2·(9.75·h + 4·i) + 6·heads·T
  (norm inputs, q/k/v, RoPE outputs, GQA-expanded k/v, attention output, MLP gate/up/act/
  product; attention probabilities kept in float32 and in the model dtype).
Gradient checkpointing keeps only each block's input (2·h bytes per token per layer) plus
one block's activations while it is recomputed. For hutchinson_diag the first backward
runs with create_graph=True, so the backward's own intermediates are kept as well, and
each Hessian-vector product is a backward through that graph: the plan counts 3·act and
3·lg (2x by counting saved tensors, 3x measured; see --validate), and checkpointing cannot
drop them (a recomputed block becomes part of the second-order graph).

The sums are upper bounds: during a backward pass activations are freed while gradients
appear, so act and G are not both at their maximum; the "likely" column uses
W + A + max(act + lg, G) + T (+ Z + HV for Hutchinson).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class Arch:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, int]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("embed", self.vocab * h)]
        for layer in range(self.layers):
            p = f"layers.{layer}."
            out += [(p + "q", h * h), (p + "k", kv * h), (p + "v", kv * h), (p + "o", h * h),
                    (p + "gate", i * h), (p + "up", i * h), (p + "down", h * i)]
        if not self.tied:
            out.append(("lm_head", self.vocab * h))
        return out

    @property
    def n_norm(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def act_bytes_per_token_layer(self, seq_len: int, d: int) -> int:
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * self.head_dim
        elems = (h  # input norm in
                 + h  # normed x (q/k/v input)
                 + h + 2 * kv  # q, k, v
                 + h + kv  # q, k after RoPE
                 + 2 * h  # k, v expanded to every head (repeat_kv)
                 + h  # attention output (o_proj input)
                 + h + h  # post-attention norm in, normed x (MLP input)
                 + 4 * i)  # gate, up, act(gate), act*up
        return d * elems + (4 + d) * self.heads * seq_len  # + softmax probs (float32 and d)


LLAMA_31_8B = Arch("Llama-3.1-8B", vocab=128256, hidden=4096, intermediate=14336, layers=32,
                   heads=32, kv_heads=8)


def plan(arch: Arch, *, dtype_bytes=2, batch=8, seq_len=256, checkpoint=False, fraction=1.0):
    """Component sizes (bytes) per metric; `fraction` of the weights scored (--include)."""
    sizes = [n for _, n in arch.tensors()]
    n_all = sum(sizes) + arch.n_norm
    p = int(sum(sizes) * fraction)
    d = dtype_bytes
    W = n_all * d
    A = p * 4
    G = p * d
    T32 = max(sizes) * 4
    per = arch.act_bytes_per_token_layer(seq_len, d)

    def act(tokens, ckpt):
        if ckpt:
            return tokens * arch.layers * 2 * arch.hidden + tokens * per
        return tokens * arch.layers * per

    def logits(tokens):
        return tokens * arch.vocab * (d + 4 + 4 + 4 + d)

    tok_b, tok_w = batch * seq_len, seq_len  # per batch / per window (batch size 1)
    rows = {}
    rows["magnitude"] = {"W": W, "T": max(sizes) * d}
    # act_mag: one float64 sum of squares per input feature of each scored weight
    # (q, k, v, o, gate, up read h features, down reads i; the embedding counts V tokens)
    feats = arch.layers * (6 * arch.hidden + arch.intermediate) + arch.vocab + arch.hidden
    rows["act_mag"] = {"W": W, "A": 8 * feats, "lg": tok_b * arch.vocab * d}
    rows["grad_x_weight"] = {"W": W, "A": A, "G": G, "T": T32, "act": act(tok_b, checkpoint), "lg": logits(tok_b)}
    for m in ("grad_squared", "hessian_diag"):
        rows[m] = {"W": W, "A": A, "G": G, "T": T32, "act": act(tok_w, checkpoint), "lg": logits(tok_w)}
    # create_graph=True keeps the backward's intermediates too, and the Hessian-vector
    # products run a backward of that backward: about 3x one pass's activations and logits
    # (2x by counting saved tensors; 3x matches the measured CPU validation below)
    # No probe is stored and the first backward's gradients (p·d) are freed before the
    # HVPs, where autograd feeds the probe back through the graph (p·d, "Z"); one HVP
    # tensor at a time ("HV"), float32 transients of one probe piece (2^22 entries)
    rows["hutchinson_diag"] = {"W": W, "A": A, "T": (1 << 22) * 4, "Z": p * d, "HV": max(sizes) * d,
                               "act": 3 * act(tok_b, False) + (act(tok_b, True) if checkpoint else 0),
                               "lg": 3 * logits(tok_b)}
    out = {}
    for m, c in rows.items():
        upper = sum(c.values())
        likely = c.get("W", 0) + c.get("A", 0) + max(c.get("act", 0) + c.get("lg", 0), c.get("G", 0)) \
            + c.get("T", 0) + c.get("Z", 0) + c.get("HV", 0)
        out[m] = {**c, "upper": upper, "likely": likely}
    return out, {"params": n_all, "scored": p}


def table(arch: Arch, budget_gib: float, **kw) -> str:
    res, n = plan(arch, **kw)
    g = lambda v: f"{v / GIB:.1f}" if v else "–"  # noqa: E731
    lines = [
        f"{arch.name}: {n['params'] / 1e9:.2f} B parameters, {n['scored'] / 1e9:.2f} B scored; "
        f"dtype {kw.get('dtype_bytes', 2) * 8}-bit, batch {kw.get('batch', 8)} x {kw.get('seq_len', 256)} tokens"
        f"{', grad checkpointing' if kw.get('checkpoint') else ''}"
        f"{', ' + format(kw.get('fraction', 1.0), '.0%') + ' of the weights scored' if kw.get('fraction', 1.0) < 1 else ''}; GiB",
        "",
        "| metric | weights | accum. f32 | grads | f32 cast | probes | HVPs | activations | logits/loss | upper bound | likely peak | fits " + f"{budget_gib:.0f} GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, c in res.items():
        fits = "yes" if c["upper"] <= budget_gib * GIB * 0.9 else ("likely" if c["likely"] <= budget_gib * GIB * 0.9 else "**no**")
        lines.append(
            f"| {m} | {g(c.get('W'))} | {g(c.get('A'))} | {g(c.get('G'))} | {g(c.get('T'))} | {g(c.get('Z'))} "
            f"| {g(c.get('HV'))} | {g(c.get('act'))} | {g(c.get('lg'))} | {g(c['upper'])} | {g(c['likely'])} | {fits} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation


SMALL = {"width": 512, "layers": 4, "vocab": 8192, "batch": 4, "seq_len": 256}
CASES = (("grad_x_weight", False), ("grad_x_weight", True), ("grad_squared", False),
         ("hessian_diag", False), ("hutchinson_diag", False))


def _small_arch(width, layers, vocab, **_) -> Arch:
    return Arch("small Llama", vocab=vocab, hidden=width, intermediate=int(width * 3.5), layers=layers,
                heads=width // 64, kv_heads=max(1, width // 256))


def measure_case(metric: str, ckpt: bool, width, layers, vocab, batch, seq_len) -> int:
    """Peak RSS growth (bytes) of scoring a small bf16 Llama on the CPU, model loaded."""
    import gc
    import re
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cwa.metrics import MetricOptions, compute_scores, select_params

    torch.set_num_threads(1)
    arch = _small_arch(width, layers, vocab)
    cfg = LlamaConfig(hidden_size=arch.hidden, intermediate_size=arch.intermediate, num_hidden_layers=layers,
                      num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, vocab_size=vocab,
                      max_position_embeddings=seq_len, attn_implementation="eager")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    params = select_params(model)
    status = Path("/proc/self/status")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1)) * 1024
    compute_scores(model, params, ids, None, metric, MetricOptions(hutchinson_samples=1),
                   batch_size=batch, grad_checkpointing=ckpt)
    return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) * 1024 - base


def validate() -> str:
    """The plan against peak RSS growth measured in a fresh process per case (CPU)."""
    import subprocess

    arch = _small_arch(**SMALL)
    lines = [f"validation: {arch.name} h={arch.hidden}, i={arch.intermediate}, {arch.layers} layers, "
             f"vocab {arch.vocab}, bf16, batch {SMALL['batch']} x {SMALL['seq_len']}, on the CPU; peak RSS "
             "growth over the loaded model, MiB (the plan without its weights term)", "",
             "| metric | checkpointing | plan: upper bound | plan: likely | measured |", "|---|---|---|---|---|"]
    for metric, ckpt in CASES:
        res, _ = plan(arch, dtype_bytes=2, batch=SMALL["batch"], seq_len=SMALL["seq_len"], checkpoint=ckpt)
        c = res[metric]
        here = str(Path(__file__).resolve().parent)
        code = (f"import sys; sys.path.insert(0, {here!r}); import memory_plan as m; "
                f"print(m.measure_case({metric!r}, {ckpt!r}, **m.SMALL))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        grew = int(r.stdout.split()[-1])
        lines.append(f"| {metric} | {'yes' if ckpt else 'no'} | {(c['upper'] - c['W']) / 2**20:.0f} "
                     f"| {(c['likely'] - c['W']) / 2**20:.0f} | {grew / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=80.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--validate", action="store_true")
    a = ap.parse_args(argv)
    if a.validate:
        print(validate())
        return 0
    kw = {"dtype_bytes": a.dtype_bytes, "batch": a.batch_size, "seq_len": a.seq_len}
    print(table(LLAMA_31_8B, a.budget_gib, **kw))
    print()
    print(table(LLAMA_31_8B, a.budget_gib, **kw, checkpoint=True))
    print()
    print(table(LLAMA_31_8B, a.budget_gib, dtype_bytes=a.dtype_bytes, batch=1, seq_len=a.seq_len, fraction=0.5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
