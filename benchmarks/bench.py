"""cwa benchmarks: every figure against its natural baseline, measured in the same run.

    python benchmarks/bench.py                  # everything (~10 min on 2 CPU cores)
    python benchmarks/bench.py --only rank --rank-sizes 1.0
    python benchmarks/bench.py --quick          # a smoke run with small sizes (~2 min)

Sections (each prints rows of the table and goes into the JSON, `--json PATH`):

- score: the marginal cost of one calibration window in `cwa score` (the metric's
  `accumulate`, which is what `compute_scores` runs per batch) against a bare loop that
  does only the autograd work the metric needs, on the same model and the same windows:
  forward+backward per batch (grad_x_weight), per window (grad_squared), forward + S
  backwards with sampled labels per window (hessian_diag), one graph per batch plus P
  Hessian-vector products (hutchinson_diag), a forward pass (act_mag). cwa and the bare
  loop alternate batch by batch, so load from other processes hits both alike; the
  ratio is the median of the per-batch ratios. Targets: ≤ 1.15x (gradient metrics),
  ≤ 1.3x (hutchinson_diag).
- rank: `cwa rank` (top-K, statistics, HDF5 + JSON written) on synthetic float32 scores
  with Llama-3.1-8B tensor shapes in a safetensors file, run as a subprocess whose peak
  RSS is read with wait4(); baseline: a subprocess reading the file once. Known values
  are planted at random positions, so the exact answer is known and checked. Target:
  exact, peak RSS ≤ 1.2 GB at every size.
- perturb: apply + restore of one condition (K selected weights) against one evaluation
  pass of the perturbation stage (with the KL against the kept baseline), and the peak
  RSS growth while applying and restoring against the model's size. Target: < 1% of an
  evaluation pass; no model copy.

Timings are medians of repeats. The machine is described in the JSON (`machine`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9

# ----------------------------------------------------------------------------- helpers


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else ""
    mem = ""
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem = f"{int(m.group(1)) / 1024**2:.1f} GiB" if m else ""
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def vm_rss_kb() -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1))


def vm_hwm_kb() -> int:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1))


def reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# A small launcher runs the measured command: a child forked from this (large) benchmark
# process would start with this process's pages resident and report them as its peak.
_LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
               "max_rss_bytes": ru.ru_maxrss * 1024}, f)
"""


def run_rss(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; its wall time, exit code, output and peak RSS.

    The command is started by a fresh launcher process that reaps it with os.wait4,
    which reports that child's own peak RSS (ru_maxrss, KiB on Linux).
    """
    with tempfile.TemporaryDirectory(prefix="cwa-bench-") as d:
        report = Path(d) / "r.json"
        r = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *cmd],
                           capture_output=True, text=True, env=env)
        if not report.exists():
            raise RuntimeError(f"launcher failed: {r.stderr[-2000:]}")
        out = json.loads(report.read_text())
    out["stdout"], out["stderr"] = r.stdout, r.stderr[-4000:]
    return out


def row(section, name, value, unit, baseline=None, ratio=None, target=None, met=None, **extra):
    return {
        "section": section,
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": met,
        **extra,
    }


# ----------------------------------------------------------------------------- score


def _lm_loss(model, ids):
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))


def bare_grad(model, params, ids, **_):
    import torch

    torch.autograd.grad(_lm_loss(model, ids), params, allow_unused=True)


def bare_per_window_grad(model, params, ids, **_):
    import torch

    for n in range(ids.shape[0]):
        torch.autograd.grad(_lm_loss(model, ids[n : n + 1]), params, allow_unused=True)


def bare_sampled_grad(model, params, ids, draws=1, **_):
    import torch
    import torch.nn.functional as F

    for n in range(ids.shape[0]):
        logits = model(input_ids=ids[n : n + 1], use_cache=False).logits[0, :-1].float()
        probs = torch.softmax(logits.detach(), dim=-1)
        for s in range(draws):
            labels = torch.multinomial(probs, 1).squeeze(1)
            loss = F.cross_entropy(logits, labels)
            torch.autograd.grad(loss, params, retain_graph=s < draws - 1, allow_unused=True)


def bare_hvp(model, params, ids, probes=8, gen=None, **_):
    import torch

    grads = torch.autograd.grad(_lm_loss(model, ids), params, create_graph=True)
    for p in range(probes):
        zs = [torch.randint(0, 2, g.shape, generator=gen, dtype=torch.float32).mul_(2).sub_(1) for g in grads]
        dot = sum((g * z).sum() for g, z in zip(grads, zs, strict=True))
        torch.autograd.grad(dot, params, retain_graph=p < probes - 1)


def bare_forward(model, params, ids, **_):
    import torch

    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


SCORE_CASES = {
    # metric: (bare loop, target, what the bare loop does)
    "grad_x_weight": (bare_grad, 1.15, "forward+backward per batch"),
    "grad_squared": (bare_per_window_grad, 1.15, "forward+backward per window"),
    "hessian_diag": (bare_sampled_grad, 1.15, "forward + sampled labels + S backwards per window"),
    "hutchinson_diag": (bare_hvp, 1.3, "one graph per batch + P Hessian-vector products"),
    "act_mag": (bare_forward, 1.15, "forward per batch (no grad)"),
}


def score_model(width: int, layers: int, vocab: int, seq_len: int):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab,
        n_positions=seq_len, attn_implementation="eager",
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def bench_score(a) -> list[dict]:
    import torch

    from cwa.metrics import METRICS, MetricOptions, scoring_mode, select_params

    model = score_model(a.width, a.layers, a.vocab, a.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    params = select_params(model)
    plist = list(params.values())
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, a.vocab, (a.batch_size, a.seq_len), generator=gen)
        for _ in range(a.score_batches + 1)
    ]
    n_total = a.batch_size * len(batches)
    rows = []
    desc = (f"GPT-2 {a.layers}x{a.width}, vocab {a.vocab}, {n_params / 1e6:.1f}M params; "
            f"batches of {a.batch_size} x {a.seq_len} tokens; P={a.probes}, S={a.draws}")
    print(f"[score] {desc}", file=sys.stderr)
    for metric in a.metrics:
        bare, target, what = SCORE_CASES[metric]
        cls = METRICS.get(metric)
        opts = MetricOptions(seed=0, mc_samples=a.draws, hutchinson_samples=a.probes)
        scorer = cls(opts)
        t_cwa, t_bare, ratios = [], [], []
        with scoring_mode(model, params, needs_grad=cls.needs_grad):
            t0 = time.perf_counter()
            scorer.begin(model, params)
            t_begin = time.perf_counter() - t0
            for b, ids in enumerate(batches):
                windows = torch.arange(b * a.batch_size, (b + 1) * a.batch_size)

                def run_cwa(ids=ids, windows=windows, scorer=scorer):
                    scorer.accumulate(ids, windows, n_total)

                def run_bare(ids=ids, bare=bare):
                    bare(model, plist, ids, probes=a.probes, draws=a.draws, gen=gen)

                pair = {}
                order = (("cwa", run_cwa), ("bare", run_bare))
                for name, fn in order if b % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    fn()
                    pair[name] = time.perf_counter() - t0
                if b == 0:
                    continue  # warm-up batch (allocator, kernels)
                t_cwa.append(pair["cwa"])
                t_bare.append(pair["bare"])
                ratios.append(pair["cwa"] / pair["bare"])
            t0 = time.perf_counter()
            scorer.finish()
            t_finish = time.perf_counter() - t0
            scorer.close()
        per_cwa = median(t_cwa) / a.batch_size
        per_bare = median(t_bare) / a.batch_size
        ratio = median(ratios)
        rows.append(row(
            "score", f"cwa score {metric}: s per window", per_cwa, "s/window", baseline=per_bare,
            ratio=ratio, target=f"<= {target}x", met=ratio <= target, baseline_is=what,
            batch_ratios=ratios, fixed_cost_s=t_begin + t_finish, model=desc,
        ))
        print(f"[score] {metric}: {per_cwa * 1e3:.1f} ms/window vs {per_bare * 1e3:.1f} "
              f"({ratio:.3f}x)", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- rank

# Llama-3.1-8B: vocab 128256, hidden 4096, intermediate 14336, 32 layers, 8 KV heads.
V, H, I_, KV = 128256, 4096, 14336, 1024


def llama_tensors():
    yield "model.embed_tokens.weight", (V, H)
    for i in range(32):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (H, H)
        yield p + "self_attn.k_proj.weight", (KV, H)
        yield p + "self_attn.v_proj.weight", (KV, H)
        yield p + "self_attn.o_proj.weight", (H, H)
        yield p + "mlp.gate_proj.weight", (I_, H)
        yield p + "mlp.up_proj.weight", (I_, H)
        yield p + "mlp.down_proj.weight", (H, I_)
    yield "lm_head.weight", (V, H)


def llama_subset(billions: float, with_embedding: bool):
    """Llama-3.1-8B's 2-D tensors in order until `billions`·1e9 entries are reached."""
    out, n = [], 0
    for name, shape in llama_tensors():
        if name.endswith("embed_tokens.weight") and not with_embedding:
            continue
        out.append((name, shape))
        n += shape[0] * shape[1]
        if n >= billions * GB:
            break
    return out, n


def planted_keys(m: int):
    """m distinct |score| values far above N(0, 1) draws, exact in float32."""
    import numpy as np

    return (np.float32(10.0) + np.arange(m, dtype=np.float32) / np.float32(1024.0)).astype(np.float32)


def write_synthetic_scores(path: Path, tensors, n_planted: int, seed: int = 0) -> dict:
    """A `scores/1` safetensors file of N(0,1) float32 scores with `n_planted` known
    values (random signs) at random positions; returns the expected top-K order."""
    import hashlib

    import numpy as np

    sizes = [r * c for _, (r, c) in tensors]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    pos = np.unique(rng.integers(0, total, size=int(n_planted * 1.05) + 16))
    pos = rng.permutation(pos)[:n_planted]
    keys = planted_keys(n_planted)  # key i at position pos[i]
    signs = np.where(rng.random(n_planted) < 0.5, -1.0, 1.0).astype(np.float32)
    order = np.argsort(pos)
    pos_sorted, val_sorted = pos[order], (keys * signs)[order]

    header, off = {}, 0
    for (name, shape), n in zip(tensors, sizes, strict=True):
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + 4 * n]}
        off += 4 * n
    names = [t[0] for t in tensors]
    hashes = {}
    # hashes go into the header, which precedes the data: write the data first, then
    # the header into a reserved, space-padded slot (safetensors allows padding).
    meta_base = {
        "cwa.schema": "scores/1", "cwa.metric": "synthetic", "cwa.fingerprint": f"synthetic-{total}",
        "cwa.model": "Llama-3.1-8B shapes (synthetic)", "cwa.model_fingerprint": "synthetic",
        "cwa.param_order": json.dumps(names), "cwa.seed": "0",
    }
    placeholder = {n: "0" * 64 for n in names}
    hdr_len = len(json.dumps({**header, "__metadata__": {**meta_base, "cwa.sha256": json.dumps(placeholder)}}))
    slot = (hdr_len + 7) // 8 * 8
    chunk = 1 << 24
    g0 = 0
    with open(path, "wb") as f:
        f.write(b"\0" * (8 + slot))
        for (name, _), n in zip(tensors, sizes, strict=True):
            h = hashlib.sha256()
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                x = rng.standard_normal(m, dtype=np.float32)
                lo, hi = np.searchsorted(pos_sorted, [g0 + start, g0 + start + m])
                x[pos_sorted[lo:hi] - g0 - start] = val_sorted[lo:hi]
                b = x.tobytes()
                h.update(b)
                f.write(b)
            hashes[name] = h.hexdigest()
            g0 += n
        meta = {**meta_base, "cwa.sha256": json.dumps(hashes)}
        text = json.dumps({**header, "__metadata__": meta}).encode()
        assert len(text) <= slot
        f.seek(0)
        f.write(slot.to_bytes(8, "little"))
        f.write(text.ljust(slot, b" "))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return {"pos": pos, "keys": keys, "signs": signs, "offsets": offsets, "total": total}


def expected_topk(truth: dict, k: int):
    """(param_index, flat_index) of the top-K by |score|: the K largest planted keys."""
    import numpy as np

    idx = np.arange(len(truth["keys"]) - 1, len(truth["keys"]) - 1 - k, -1)
    g = truth["pos"][idx]
    pi = np.searchsorted(truth["offsets"], g, side="right") - 1
    return pi, g - truth["offsets"][pi], truth["keys"][idx] * truth["signs"][idx]


READ_ONCE = """
import sys, time
t0 = time.perf_counter()
buf = bytearray(64 << 20)
mv = memoryview(buf)
n = 0
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        r = f.readinto(mv)
        if not r:
            break
        n += r
print(time.perf_counter() - t0, n)
"""

TOPK_ONLY = """
import sys, time
t0 = time.perf_counter()
from cwa.artifacts import open_scores
from cwa.ranking import topk
t1 = time.perf_counter()
sel = topk(open_scores(sys.argv[1]), int(sys.argv[2]))
print(time.perf_counter() - t1, time.perf_counter() - t0)
"""


def bench_rank(a) -> list[dict]:
    import numpy as np

    from cwa.artifacts import read_selection

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    for billions in a.rank_sizes:
        tensors, total = llama_subset(billions, with_embedding=billions >= 1.0)
        tmp = Path(tempfile.mkdtemp(prefix="cwa-bench-rank-", dir=a.tmp))
        path = tmp / "scores.safetensors"
        try:
            t0 = time.perf_counter()
            truth = write_synthetic_scores(path, tensors, n_planted=max(a.rank_k))
            gen_s = time.perf_counter() - t0
            size = path.stat().st_size
            largest = max(r * c for _, (r, c) in tensors)
            label = f"{total / GB:.2f} B scores ({size / GB:.2f} GB, {len(tensors)} tensors, largest {largest / 1e6:.0f}M)"
            print(f"[rank] {label}, written in {gen_s:.0f}s", file=sys.stderr)
            reads, ranks, rss, topk_s, topk_rss = [], [], [], [], []
            for k in a.rank_k:
                for rep in range(a.repeats):
                    r = run_rss([sys.executable, "-c", READ_ONCE, str(path)], env)
                    assert r["rc"] == 0, r["stderr"]
                    reads.append(float(r["stdout"].split()[0]))
                    out = tmp / f"top{k}.h5"
                    cmd = [sys.executable, "-m", "cwa", "rank", str(path), "--topk", str(k), "-o", str(out),
                           "--stats", str(tmp / "stats.json"), "--force"]
                    r = run_rss(cmd, env)
                    assert r["rc"] == 0, r["stderr"]
                    ranks.append(r["wall_s"])
                    rss.append(r["max_rss_bytes"])
                    if rep == 0:
                        sel = read_selection(out)
                        pi, fi, sc = expected_topk(truth, k)
                        d = sel.draws[0]
                        exact = (np.array_equal(d.param_index, pi) and np.array_equal(d.flat_index, fi)
                                 and np.array_equal(d.score, sc) and sel.ties_at_k == 1)
                    r = run_rss([sys.executable, "-c", TOPK_ONLY, str(path), str(k)], env)
                    assert r["rc"] == 0, r["stderr"]
                    topk_s.append(float(r["stdout"].split()[0]))
                    topk_rss.append(r["max_rss_bytes"])
                read_s = median(reads)
                rows.append(row(
                    "rank", f"cwa rank {total / GB:.2f}B K={k}: wall s", median(ranks), "s",
                    baseline=read_s, ratio=median(ranks) / read_s, target="exact", met=bool(exact),
                    baseline_is="read the file once (64 MB reads, page cache warm)", data=label,
                    exact=bool(exact), topk_only_s=median(topk_s), topk_only_ratio=median(topk_s) / read_s,
                ))
                peak = max(rss)
                rows.append(row(
                    "rank", f"cwa rank {total / GB:.2f}B K={k}: peak RSS", peak / GB, "GB",
                    baseline=size / GB, ratio=peak / size, target="<= 1.2 GB", met=peak <= 1.2 * GB,
                    baseline_is="file size", data=label, topk_only_peak_rss_gb=max(topk_rss) / GB,
                ))
                print(f"[rank] K={k}: cwa rank {median(ranks):.1f}s (topk only {median(topk_s):.1f}s), "
                      f"read once {read_s:.1f}s, peak RSS {peak / GB:.2f} GB, exact={exact}", file=sys.stderr)
                reads, ranks, rss, topk_s, topk_rss = [], [], [], [], []
        finally:
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    return rows


# ----------------------------------------------------------------------------- perturb


def bench_perturb(a) -> list[dict]:
    import gc

    import numpy as np
    import torch

    from cwa.data import Windows
    from cwa.evaluation import evaluate
    from cwa.perturbation import apply, restore
    from cwa.ranking import Draw

    model = score_model(a.pwidth, a.players, a.vocab, a.seq_len)
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    sizes = np.array([p.numel() for p in params])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    desc = f"GPT-2 {a.players}x{a.pwidth}, vocab {a.vocab}, {model_bytes / 1e6:.0f} MB float32"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.eval_windows, a.seq_len), generator=gen)
    ev = Windows(ids=ids, indices=list(range(a.eval_windows)), source="bench", has_bos=False,
                 n_available=a.eval_windows)
    base = evaluate(model, ev, batch_size=a.batch_size, keep_baseline=True)
    evals = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        evaluate(model, ev, batch_size=a.batch_size, baseline=base.baseline)
        evals.append(time.perf_counter() - t0)
    eval_s = median(evals)
    print(f"[perturb] {desc}; eval pass {eval_s:.2f}s on {a.eval_windows} x {a.seq_len}", file=sys.stderr)
    rows = []
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for k in a.perturb_k:
        g = np.sort(rng.choice(int(sizes.sum()), size=k, replace=False))
        pi = np.searchsorted(offsets, g, side="right") - 1
        draw = Draw(pi, g - offsets[pi], np.zeros(k, np.float32))
        for method in ("zero", "sign_flip", "gauss_noise", "bit_flip"):
            times = []
            for rep in range(max(3, a.repeats)):
                t0 = time.perf_counter()
                rec = apply(params, draw, method, seed=0, draw_index=rep)
                ok = restore(params, rec)
                times.append(time.perf_counter() - t0)
                assert ok
            t = median(times)
            rows.append(row(
                "perturb", f"apply+restore {method} K={k}", t, "s", baseline=eval_s, ratio=t / eval_s,
                target="< 1% of an eval pass", met=t / eval_s < 0.01, baseline_is="one evaluation pass",
                model=desc,
            ))
        print(f"[perturb] K={k}: " + ", ".join(f"{r['name'].split()[1]} {r['value'] * 1e3:.1f} ms"
                                               for r in rows[-4:]), file=sys.stderr)
    # memory: the peak RSS growth while applying/restoring the largest K, vs the model
    k = max(a.perturb_k)
    g = np.sort(rng.choice(int(sizes.sum()), size=k, replace=False))
    pi = np.searchsorted(offsets, g, side="right") - 1
    draw = Draw(pi, g - offsets[pi], np.zeros(k, np.float32))
    del base
    gc.collect()
    if reset_hwm():
        before = vm_rss_kb() * 1024
        for method in ("zero", "sign_flip", "gauss_noise", "bit_flip"):
            restore(params, apply(params, draw, method, seed=0))
        growth = vm_hwm_kb() * 1024 - before
        rows.append(row(
            "perturb", f"peak RSS growth apply+restore K={k}", growth / 1e6, "MB",
            baseline=model_bytes / 1e6, ratio=growth / model_bytes, target="no model copy (<< 1x model)",
            met=growth < 0.5 * model_bytes, baseline_is="model size", model=desc,
            saved_entry_bytes=k * (params[0].element_size() + 8),
        ))
        print(f"[perturb] peak RSS growth {growth / 1e6:.1f} MB vs model {model_bytes / 1e6:.0f} MB",
              file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- main


def fmt(v, unit):
    if v is None:
        return ""
    if isinstance(v, float):
        if unit == "s/window":
            return f"{v * 1e3:.2f} ms"
        if unit == "s" and v < 1:
            return f"{v * 1e3:.2f} ms"
        if unit == "s":
            return f"{v:.2f} s"
        return f"{v:.3g} {unit}"
    return str(v)


def table(rows) -> str:
    lines = ["| benchmark | cwa | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        base_unit = "GB" if r["unit"] == "GB" else ("MB" if r["unit"] == "MB" else r["unit"])
        ratio = "" if r["ratio"] is None else (f"{r['ratio']:.2%}" if r["section"] == "perturb" else f"{r['ratio']:.3f}x")
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['name']} | {fmt(r['value'], r['unit'])} | {fmt(r['baseline'], base_unit)} "
                     f"({r.get('baseline_is', '')}) | {ratio} | {r['target'] or ''} | {met} |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="score,rank,perturb", help="comma list of sections")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--json", type=Path, default=None,
                    help="default: benchmarks/results/bench.json (bench-quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the synthetic scores file goes (default: $TMPDIR)")
    # score
    ap.add_argument("--metrics", default=",".join(SCORE_CASES))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-batches", type=int, default=6)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--draws", type=int, default=1)
    # rank
    ap.add_argument("--rank-sizes", default="0.4,1.0", help="billions of scores")
    ap.add_argument("--rank-k", default="100,1000000")
    # perturb
    ap.add_argument("--pwidth", type=int, default=512)
    ap.add_argument("--players", type=int, default=6)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--perturb-k", default="100,10000,100000,1000000")
    a = ap.parse_args(argv)
    if a.quick:
        a.rank_sizes, a.rank_k, a.score_batches, a.repeats = "0.02", "100,10000", 3, 1
        a.layers, a.players, a.pwidth, a.eval_windows = 2, 2, 256, 8
        a.perturb_k = "100,10000"
    if a.json is None:
        a.json = HERE / "results" / ("bench-quick.json" if a.quick else "bench.json")
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    a.rank_sizes = [float(x) for x in a.rank_sizes.split(",")]
    a.rank_k = [int(x) for x in a.rank_k.split(",")]
    a.perturb_k = [int(x) for x in a.perturb_k.split(",")]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    torch.set_num_threads(a.threads)
    info = {"machine": machine(), "args": {k: v for k, v in vars(a).items() if k != "json"}}
    info["args"]["tmp"] = str(a.tmp)
    rows = []
    t0 = time.perf_counter()
    for section, fn in (("score", bench_score), ("rank", bench_rank), ("perturb", bench_perturb)):
        if section in a.only:
            rows += fn(a)
    info["seconds"] = time.perf_counter() - t0
    info["rows"] = rows
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=2, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else str(o)) + "\n")
    print(table(rows))
    print(f"\n{sum(1 for r in rows if r['met'])}/{sum(1 for r in rows if r['met'] is not None)} targets met; "
          f"JSON: {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
