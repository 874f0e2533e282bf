"""Where does `cwa score` spend its time beyond the bare autograd work? torch.profiler on
one metric's `accumulate` and on its bare loop (benchmarks/bench.py), same model and
batches; prints the operators with the largest self-CPU time in each and the operators
whose time cwa adds.

    python benchmarks/profile_score.py --metric hutchinson_diag
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def profile(fn, batches):
    from torch.profiler import ProfilerActivity, profile

    fn(batches[0])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for ids in batches[1:]:
            fn(ids)
    totals = defaultdict(float)
    for e in prof.key_averages():
        totals[e.key] += e.self_cpu_time_total / 1e6
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metric", default="grad_x_weight", choices=sorted(bench.SCORE_CASES))
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)

    import torch

    from cwa.metrics import METRICS, MetricOptions, scoring_mode, select_params

    torch.set_num_threads(1)
    model = bench.score_model(a.width, a.layers, a.vocab, a.seq_len)
    params = select_params(model)
    plist = list(params.values())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, a.vocab, (a.batch_size, a.seq_len), generator=gen) for _ in range(a.batches + 1)]
    n_total = a.batch_size * len(batches)
    cls = METRICS.get(a.metric)
    bare, _, what = bench.SCORE_CASES[a.metric]
    scorer = cls(MetricOptions(hutchinson_samples=a.probes))
    windows = torch.arange(a.batch_size)
    with scoring_mode(model, params, needs_grad=cls.needs_grad):
        scorer.begin(model, params)
        cwa = profile(lambda ids: scorer.accumulate(ids, windows, n_total), batches)
        base = profile(lambda ids: bare(model, plist, ids, probes=a.probes, gen=gen), batches)
        scorer.close()
    tc, tb = sum(cwa.values()), sum(base.values())
    print(f"{a.metric}: cwa {tc:.2f}s vs bare ({what}) {tb:.2f}s self-CPU over {a.batches} batches "
          f"({tc / tb:.3f}x)")
    for label, tot in (("cwa", cwa), ("bare", base)):
        print(f"\ntop operators, {label}:")
        for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"  {v:8.3f}s  {k}")
    print("\nlargest additions by cwa (cwa - bare):")
    diff = {k: cwa.get(k, 0.0) - base.get(k, 0.0) for k in set(cwa) | set(base)}
    for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"  {v:+8.3f}s  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
