"""Ranking against one read of the scores file: top-K and the whole rank stage (top-K +
`sensitivity_stats`, what `cwa rank` computes) as multiples of one read, in the same run
(benchmarks/RESULTS.md, "Ranking near the read limit").

    python benchmarks/rank_near_read.py --billions 1.0 [--before /tmp/ranking_before.py]

Synthetic N(0, 1) float32 scores with Llama-3.1-8B shapes and planted known top values
(`bench.write_synthetic_scores`). Each measurement is a fresh process (peak RSS from
wait4) that opens the file. A file `cwa` has verified before and that is unchanged since
is not hashed again (`cwa.memo`, in the measurement's own `CWA_CACHE_DIR`); the first
read of a file hashes every tensor (SHA-256) on the way. Both are measured: "verified"
with a memo primed once (by `verify()`, after the file is 2 s old), "first" with an empty
one. Configurations alternate; medians of the repeats.

  read      one read of the file: every tensor through `ScoresFile.chunks`, doing nothing,
            with plain reads into buffers (`MAP_BYTES = 0`: a map that nothing touches
            would cost nothing; no hash: the baseline of the targets)
  read-sha  the same, the first time (every tensor's SHA-256 checked on the way)
  topk      `cwa.ranking.topk` (top-K alone), file verified before
  new       `cwa.ranking.rank_with_stats`, what `cwa rank` computes in one pass, file
            verified before
  topk-first, new-first   the same, on the first read of the file
  topk+V, new+V   topk and new with a variant V of the settings (`--variants`): "reads"
            (the pieces read into two buffers in turn, `cwa.artifacts.MAP_BYTES = 0`,
            instead of viewed in memory-mapped windows), "tN" (N lanes,
            `cwa.ranking.RANK_THREADS`), "bN" (blocks of 2^N, `cwa.ranking.BLOCK_ELEMS`),
            joined by "+" (t2+b20), or "before" (the module of `--before`, same settings)
  old       top-K, then `sensitivity_stats`, from `--before` (a saved copy of an earlier
            `cwa/ranking.py`), first read

Each ranking run also writes its selection and statistics; the parent checks that the
planted top-K is found (all configurations), and with `--before` that old and new agree
(same positions, scores, ties_at_k, min/max/counts/zeros; the std and abs_mean to 1e-6
relative, the mean to 1e-6 of the std) and that the new histogram counts equal the old
code's exact binning (`_histogram_pass`, bucketize-checked) against the new edges.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
cfg, *variants = cfg.split("+")  # e.g. topk+t2+reads: see --variants
import cwa.artifacts, cwa.ranking
for v in variants:
    if v == "before":
        cfg = cfg + "-before"
    elif v == "reads":
        cwa.artifacts.MAP_BYTES = 0
    elif v[0] == "t":
        cwa.ranking.RANK_THREADS = int(v[1:])
    elif v[0] == "b":
        cwa.ranking.BLOCK_ELEMS = 1 << int(v[1:])
    else:
        raise SystemExit(f"unknown variant {v}")
sc = open_scores(path)
if cfg == "prime":
    sc.verify()
    sys.exit(0)
if cfg.startswith("read"):  # a plain read into buffers, whatever ranking uses
    cwa.artifacts.MAP_BYTES = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for name in sc.names:
        for _ in sc.chunks(name, verify=cfg == "read-sha", reuse=True):
            pass
    print(json.dumps({"read_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
    sys.exit(0)
cfg = cfg.removesuffix("-first")
if cfg == "old" or cfg.endswith("-before"):
    spec = importlib.util.spec_from_file_location("cwa_ranking_before", before)
    R = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(R)
    cfg = cfg.removesuffix("-before")
else:
    import cwa.ranking as R
t0, c0 = time.perf_counter(), time.process_time()
if cfg == "topk":
    sel = R.topk(sc, k)
    print(json.dumps({"topk_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
    sys.exit(0)
if cfg == "new":
    sel, st, hist = R.rank_with_stats(sc, k)
    t1 = t2 = time.perf_counter()
else:
    sel = R.topk(sc, k)
    t1 = time.perf_counter()
    st, hist = R.sensitivity_stats(sc, sel)
    t2 = time.perf_counter()
cpu = time.process_time() - c0
d = sel.draws[0]
np.savez(out + ".npz", param_index=d.param_index, flat_index=d.flat_index, score=d.score,
         ties=sel.ties_at_k, counts=hist["counts"], zeros=hist["zeros"], edges=hist["edges"])
with open(out + ".json", "w") as f:
    json.dump(st, f, default=str)
print(json.dumps({"topk_s": t1 - t0, "stats_s": t2 - t1, "rank_s": t2 - t0, "cpu_s": cpu}))
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


def _warm(path: Path) -> None:
    """Read the file once, untimed: this VM's host drops the page cache now and then, and a
    measurement that happens to read from disk says nothing about ranking."""
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(1 << 24))
        while f.readinto(buf):
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--billions", type=float, default=1.0)
    ap.add_argument("--k", default="100,1000000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, default=None, help="an earlier cwa/ranking.py")
    ap.add_argument("--file", type=Path, default=None, help="reuse (or keep) the scores file here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", default="reads,t2", help="comma list of settings to compare (see above)")
    a = ap.parse_args(argv)
    ks = [int(x) for x in a.k.split(",")]
    tensors, total = bench.llama_subset(a.billions, with_embedding=a.billions >= 1.0)
    variants = [v for v in a.variants.split(",") if v]
    if "before" in variants and not a.before:
        ap.error("the variant 'before' needs --before")
    configs = ["read", "read-sha", "topk", "new", "topk-first", "new-first"]
    configs += [f"{c}+{v}" for v in variants for c in ("topk", "new")]
    configs += ["old"] if a.before else []
    with tempfile.TemporaryDirectory(prefix="cwa-rank-read-") as d:
        warm, cold = Path(d) / "memo-verified", Path(d) / "memo-first"
        env_of = {c: {**os.environ, "CWA_CACHE_DIR": str(warm if c in ("topk", "new") or "+" in c else cold)}
                  for c in configs}
        path = a.file or Path(d) / "scores.safetensors"
        truth_file = Path(str(path) + ".truth.npz")
        import numpy as np

        if not (path.exists() and truth_file.exists()):
            t0 = time.perf_counter()
            truth = bench.write_synthetic_scores(path, tensors, n_planted=max(ks))
            np.savez(truth_file, **truth)
            print(f"[rank] wrote {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        truth = dict(np.load(truth_file))
        time.sleep(max(0.0, 2.5 - (time.time() - path.stat().st_ctime)))  # see cwa.memo
        r = bench.run_rss([sys.executable, "-c", CHILD, "prime", str(path), "0", "", ""],
                          {**os.environ, "CWA_CACHE_DIR": str(warm)})
        if r["rc"] != 0 or not (warm / "verified_scores.json").is_file():
            raise RuntimeError(f"priming the memo failed: {r['stderr']}")
        res: dict = {k: {c: [] for c in configs} for k in ks}
        exact: dict = {}
        for k in ks:
            for rep in range(a.repeats):
                for c in configs if rep % 2 == 0 else configs[::-1]:
                    out = str(Path(d) / f"{c}-{k}")
                    shutil.rmtree(cold, ignore_errors=True)
                    cmd = [sys.executable, "-c", CHILD, c, str(path), str(k), str(a.before), out]
                    _warm(path)
                    r = bench.run_rss(cmd, env_of[c])
                    if r["rc"] != 0:
                        raise RuntimeError(r["stderr"])
                    t = json.loads(r["stdout"].strip().splitlines()[-1])
                    res[k][c].append({**t, "rss": r["max_rss_bytes"]})
                    print(f"[rank] K={k} {c}: {t} peak RSS {r['max_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
            pi, fi, sc = bench.expected_topk(truth, k)
            exact[k] = {}
            for c in [c for c in configs if c.startswith(("new", "old"))]:
                z = np.load(str(Path(d) / f"{c}-{k}") + ".npz")
                exact[k][c] = bool(np.array_equal(z["param_index"], pi) and np.array_equal(z["flat_index"], fi)
                                   and np.array_equal(z["score"], sc) and int(z["ties"]) == 1)
            z = np.load(str(Path(d) / f"new-{k}") + ".npz")
            if a.before:
                exact[k]["old_vs_new"] = _agree(Path(d) / f"old-{k}", Path(d) / f"new-{k}") or "agree"
            if "before" in variants:
                exact[k]["before_vs_new"] = _agree(Path(d) / f"new+before-{k}", Path(d) / f"new-{k}") or "agree"
                exact[k]["counts_vs_old_binning"] = _counts_check(path, a.before, z)
    size = 4 * total
    print(f"\n{total / 1e9:.2f}e9 float32 scores ({size / 1e9:.2f} GB), {a.repeats} repeats, medians; {time.ctime()}")
    print("| K | one read s: bare / first (SHA-256) | top-K s, verified before (x bare read) "
          "| whole rank s, verified before (x bare read) | top-K / whole s, first read (x first read) "
          "| CPU s: top-K / whole, verified before | peak RSS GB | exact |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for k in ks:
        t = {c: med(x.get("rank_s", x.get("topk_s", x.get("read_s"))) for x in res[k][c]) for c in configs}
        bare, sha = t["read"], t["read-sha"]
        rss = max(x["rss"] for c in configs for x in res[k][c]) / 1e9
        cpu = {c: med(x.get("cpu_s", float("nan")) for x in res[k][c]) for c in ("topk", "new")}
        print(f"| {k} | {bare:.2f} / {sha:.2f} | {t['topk']:.2f} ({t['topk'] / bare:.1f}x) "
              f"| {t['new']:.2f} ({t['new'] / bare:.1f}x) "
              f"| {t['topk-first']:.2f} / {t['new-first']:.2f} ({t['topk-first'] / sha:.1f}x / "
              f"{t['new-first'] / sha:.1f}x) | {cpu['topk']:.2f} / {cpu['new']:.2f} | {rss:.2f} | {exact[k]} |")
        for v in variants:
            tk, nw = t[f"topk+{v}"], t[f"new+{v}"]
            print(f"|   | variant {v}, verified before: top-K {tk:.2f} s ({tk / bare:.1f}x), whole "
                  f"{nw:.2f} s ({nw / bare:.1f}x); default / variant: top-K {t['topk'] / tk:.2f}, "
                  f"whole {t['new'] / nw:.2f} | | | | | | |")
        if "old" in configs:
            print(f"|   | old (first read): whole rank {t['old']:.2f} s ({t['old'] / sha:.1f}x first read) | | | | | | |")
        # each repeat's times against the same repeat's read (this VM's speed drifts
        # between repeats: the ratios within one repeat are the steadier figure)
        per = {c: sorted(x.get("rank_s", x.get("topk_s")) / r["read_s"]
                         for x, r in zip(res[k][c], res[k]["read"], strict=True)) for c in ("topk", "new")}
        print(f"|   | per repeat, x that repeat's read: top-K {med(per['topk']):.1f}x "
              f"({per['topk'][0]:.1f}-{per['topk'][-1]:.1f}), whole {med(per['new']):.1f}x "
              f"({per['new'][0]:.1f}-{per['new'][-1]:.1f}) | | | | | | |")
    if a.json:
        a.json.write_text(json.dumps({"billions": total / 1e9, "results": {str(k): v for k, v in res.items()},
                                      "exact": {str(k): v for k, v in exact.items()}}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
