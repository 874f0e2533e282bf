"""Ablation of the ways `ScoresFile.chunks()` can feed the ranking (top-K + statistics, the
work of `cwa rank`), on synthetic scores with Llama-3.1-8B shapes. Each configuration runs
in a fresh process (peak RSS from wait4); configurations alternate, medians of repeats.

    python benchmarks/ablate_rank.py --billions 0.44 --repeats 3

Configurations, in the order the optimizations were made (benchmarks/RESULTS.md):
  mmap-rows   the original reader: safetensors `safe_open(...).get_slice` row chunks of
              2^24 values (a memory map), no heap release
  read-2^24   explicit reads into fresh buffers, 2^24-value pieces, no heap release
  read-2^22   explicit reads, 2^22-value pieces, no heap release
  read-2^22+trim  explicit reads, 2^22-value pieces, freed heap released past 128 MB
  read-2^P+trimM  any piece size 2^P and release budget M MB
  nohash      the current reader without the streamed SHA-256 check
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
import json, re, sys, time
from cwa import artifacts as A
from cwa.ranking import sensitivity_stats, topk
cfg, path, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
if cfg == "mmap-rows":
    def chunks(self, name, chunk_elems=1 << 24, verify=True):
        import torch
        from safetensors import safe_open
        shape, n = self.shapes[name], self.numel(name)
        if len(shape) <= 1 or n <= chunk_elems:
            yield 0, self.get(name).reshape(-1)
            return
        row = n // shape[0]
        rows = max(1, chunk_elems // row)
        with safe_open(str(self.path), framework="pt") as f:
            sl = f.get_slice(name)
            for r0 in range(0, shape[0], rows):
                yield r0 * row, sl[r0 : min(shape[0], r0 + rows)].to(torch.float32).reshape(-1)
    A.ScoresFile.chunks = chunks
    A.ScoresFile.get = lambda self, name, verify=True: self._get_safe_open(name, verify)
m = re.fullmatch(r"read-2\^(\d+)(\+trim(\d*))?", cfg)
if m:  # read-2^P: pieces of 2^P values; +trim[MB]: heap release past MB (default 128)
    A.PIECE_ELEMS = 1 << int(m.group(1))
    A.TRIM_BUDGET_BYTES = (int(m.group(3) or 128) << 20) if m.group(2) else 1 << 60
if cfg == "nohash":
    A.ScoresFile._hash_of = lambda self, name: None
sc = A.open_scores(path)
t0 = time.perf_counter()
sel = topk(sc, k)
t1 = time.perf_counter()
sensitivity_stats(sc, sel)
t2 = time.perf_counter()
print(json.dumps({"topk_s": t1 - t0, "stats_s": t2 - t1}))
"""

CONFIGS = ("mmap-rows", "read-2^24", "read-2^22", "read-2^22+trim", "nohash")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--billions", type=float, default=0.44)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    configs = a.configs.split(",")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    tensors, total = bench.llama_subset(a.billions, with_embedding=a.billions >= 1.0)
    res = {c: {"topk_s": [], "stats_s": [], "rss": []} for c in configs}
    with tempfile.TemporaryDirectory(prefix="cwa-ablate-") as d:
        path = Path(d) / "scores.safetensors"
        bench.write_synthetic_scores(path, tensors, n_planted=a.k)
        for rep in range(a.repeats):
            for c in configs if rep % 2 == 0 else configs[::-1]:
                r = bench.run_rss([sys.executable, "-c", CHILD, c, str(path), str(a.k)], env)
                if r["rc"] != 0:
                    raise RuntimeError(r["stderr"])
                t = json.loads(r["stdout"].strip().splitlines()[-1])
                res[c]["topk_s"].append(t["topk_s"])
                res[c]["stats_s"].append(t["stats_s"])
                res[c]["rss"].append(r["max_rss_bytes"])
                print(f"[ablate] {c}: topk {t['topk_s']:.1f}s stats {t['stats_s']:.1f}s "
                      f"peak RSS {r['max_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
    print(f"{total / 1e9:.2f}e9 float32 scores, K={a.k}, {a.repeats} repeats, medians; {time.ctime()}")
    print("| reader | top-K s | statistics s | peak RSS GB (max) |\n|---|---|---|---|")
    for c in configs:
        m = res[c]
        print(f"| {c} | {statistics.median(m['topk_s']):.1f} | {statistics.median(m['stats_s']):.1f} "
              f"| {max(m['rss']) / 1e9:.2f} |")
    if a.json:
        a.json.write_text(json.dumps({"billions": total / 1e9, "k": a.k, "results": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
