"""Ranking against one read of the scores file: top-K and the whole rank stage (top-K +
`sensitivity_stats`, what `cwa rank` computes) as multiples of one read, before and after,
in the same run (benchmarks/RESULTS.md, "Ranking near the read limit").

    python benchmarks/rank_near_read.py --billions 1.0 --before /tmp/ranking_before.py

Synthetic N(0, 1) float32 scores with Llama-3.1-8B shapes and planted known top values
(`bench.write_synthetic_scores`). Each measurement is a fresh process (peak RSS from
wait4) that opens the file, so its first pass also checks the tensors' SHA-256, as
`cwa rank`'s does. Configurations alternate; medians of the repeats.

  read      the baseline: every tensor through `ScoresFile.chunks`, doing nothing
  read-nv   the same without the SHA-256 check (for reference)
  topk      `cwa.ranking.topk` as it is (top-K alone)
  new       `cwa.ranking.rank_with_stats` as it is: what `cwa rank` computes, one pass
  old       top-K, then `sensitivity_stats`, from `--before` (a saved copy of an earlier
            `cwa/ranking.py`)

Each ranking run also writes its selection and statistics, and the parent checks that
old and new agree (same positions, scores, ties_at_k, min/max/counts/zeros; the std and
abs_mean to 1e-6 relative, the mean to 1e-6 of the std), that the planted top-K is
found, and that the new histogram counts equal the old code's exact binning
(`_histogram_pass`, bucketize-checked) against the new edges (the inner edges moved to
the bit grid by design, so the old edges, counts and quantiles are not compared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

CHILD = r"""
import importlib.util, json, sys, time
import numpy as np
from cwa.artifacts import open_scores
cfg, path, k, before, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
sc = open_scores(path)
if cfg.startswith("read"):
    t0 = time.perf_counter()
    for name in sc.names:
        for _ in sc.chunks(name, verify=cfg == "read"):
            pass
    print(json.dumps({"read_s": time.perf_counter() - t0}))
    sys.exit(0)
if cfg == "old":
    spec = importlib.util.spec_from_file_location("cwa_ranking_before", before)
    R = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
else:
    import cwa.ranking as R
t0 = time.perf_counter()
if cfg == "topk":
    sel = R.topk(sc, k)
    print(json.dumps({"topk_s": time.perf_counter() - t0}))
    sys.exit(0)
if cfg == "new":
    sel, st, hist = R.rank_with_stats(sc, k)
    t1 = t2 = time.perf_counter()
else:
    sel = R.topk(sc, k)
    t1 = time.perf_counter()
    st, hist = R.sensitivity_stats(sc, sel)
    t2 = time.perf_counter()
d = sel.draws[0]
np.savez(out + ".npz", param_index=d.param_index, flat_index=d.flat_index, score=d.score,
         ties=sel.ties_at_k, counts=hist["counts"], zeros=hist["zeros"], edges=hist["edges"])
with open(out + ".json", "w") as f:
    json.dump(st, f, default=str)
print(json.dumps({"topk_s": t1 - t0, "stats_s": t2 - t1, "rank_s": t2 - t0}))
"""


def _agree(a: Path, b: Path) -> list[str]:
    """Differences between two runs' outputs (empty: they agree)."""
    import math

    import numpy as np

    za, zb = np.load(str(a) + ".npz"), np.load(str(b) + ".npz")
    bad = [k for k in za.files if k not in ("counts", "edges") and not np.array_equal(za[k], zb[k])]
    sa, sb = json.loads(Path(str(a) + ".json").read_text()), json.loads(Path(str(b) + ".json").read_text())
    for blk in ["overall", *sa["per_tensor"]]:
        x = sa["overall"] if blk == "overall" else sa["per_tensor"][blk]
        y = sb["overall"] if blk == "overall" else sb["per_tensor"][blk]
        for f in ("count", "min", "max", "n_zero", "n_nonfinite"):
            if x[f] != y[f]:
                bad.append(f"{blk}.{f}")
        for f in ("mean", "std", "abs_mean"):  # the mean to 1e-6 of the spread
            tol = 1e-6 * float(y["std"]) if f == "mean" else 0.0
            if not math.isclose(x[f], y[f], rel_tol=1e-6, abs_tol=tol):
                bad.append(f"{blk}.{f}: {x[f]} vs {y[f]}")
    return bad


def _counts_check(path: Path, before: Path, z) -> str:
    """The new histogram counts against the old module's exact binning with the new edges."""
    import importlib.util

    import numpy as np

    from cwa.artifacts import open_scores

    spec = importlib.util.spec_from_file_location("cwa_ranking_before", before)
    R = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
    sc = open_scores(path)
    edges = z["edges"]
    ref = R._histogram_pass(sc, list(sc.names), R.DEFAULT_CHUNK_ELEMS, edges, len(edges) - 1)
    return "equal" if np.array_equal(ref, z["counts"]) else "DIFFER"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--billions", type=float, default=1.0)
    ap.add_argument("--k", default="100,1000000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, default=None, help="an earlier cwa/ranking.py")
    ap.add_argument("--file", type=Path, default=None, help="reuse (or keep) the scores file here")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    tensors, total = bench.llama_subset(a.billions, with_embedding=a.billions >= 1.0)
    configs = ["read", "read-nv", "topk", "new"] + (["old"] if a.before else [])
    with tempfile.TemporaryDirectory(prefix="cwa-rank-read-") as d:
        path = a.file or Path(d) / "scores.safetensors"
        truth_file = Path(str(path) + ".truth.npz")
        import numpy as np

        if not (path.exists() and truth_file.exists()):
            t0 = time.perf_counter()
            truth = bench.write_synthetic_scores(path, tensors, n_planted=max(ks))
            np.savez(truth_file, **truth)
            print(f"[rank] wrote {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        truth = dict(np.load(truth_file))
        res: dict = {k: {c: [] for c in configs} for k in ks}
        exact: dict = {}
        for k in ks:
            for rep in range(a.repeats):
                for c in configs if rep % 2 == 0 else configs[::-1]:
                    out = str(Path(d) / f"{c}-{k}")
                    cmd = [sys.executable, "-c", CHILD, c, str(path), str(k), str(a.before), out]
                    r = bench.run_rss(cmd, env)
                    if r["rc"] != 0:
                        raise RuntimeError(r["stderr"])
                    t = json.loads(r["stdout"].strip().splitlines()[-1])
                    res[k][c].append({**t, "rss": r["max_rss_bytes"]})
                    print(f"[rank] K={k} {c}: {t} peak RSS {r['max_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
            z = np.load(str(Path(d) / f"new-{k}") + ".npz")
            pi, fi, sc = bench.expected_topk(truth, k)
            exact[k] = {"planted": bool(np.array_equal(z["param_index"], pi) and np.array_equal(z["flat_index"], fi)
                                        and np.array_equal(z["score"], sc) and int(z["ties"]) == 1)}
            if a.before:
                exact[k]["old_vs_new"] = _agree(Path(d) / f"old-{k}", Path(d) / f"new-{k}") or "agree"
                exact[k]["counts_vs_old_binning"] = _counts_check(path, a.before, z)
    size = 4 * total
    print(f"\n{total / 1e9:.2f}e9 float32 scores ({size / 1e9:.2f} GB), {a.repeats} repeats, medians; {time.ctime()}")
    print("| K | code | one read s (with SHA-256 / without) | top-K s (x read with / without) "
          "| whole rank s (x read with / without) | peak RSS GB | exact |")
    print("|---|---|---|---|---|---|---|")
    med = statistics.median
    for k in ks:
        read = med(x["read_s"] for x in res[k]["read"])
        nv = med(x["read_s"] for x in res[k]["read-nv"])
        for c in [c for c in ("old", "new") if c in configs]:
            tk = med(x["topk_s"] for x in res[k][c if c == "old" else "topk"])
            rk = med(x["rank_s"] for x in res[k][c])
            rss = max(x["rss"] for x in res[k][c]) / 1e9
            ex = exact[k] if c == "new" else exact[k].get("old_vs_new")
            print(f"| {k} | {c} | {read:.2f} / {nv:.2f} | {tk:.2f} ({tk / read:.1f}x / {tk / nv:.1f}x) "
                  f"| {rk:.2f} ({rk / read:.1f}x / {rk / nv:.1f}x) | {rss:.2f} | {ex} |")
    if a.json:
        a.json.write_text(json.dumps({"billions": total / 1e9, "results": {str(k): v for k, v in res.items()},
                                      "exact": {str(k): v for k, v in exact.items()}}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
