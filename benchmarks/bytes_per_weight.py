"""Memory beyond the model, per scored weight, for every metric (issue 13, item 2).

    python benchmarks/bytes_per_weight.py [--json PATH] [--old-hutchinson FILE]

A bf16 Llama-shaped model of ~143 M weights (hidden 1024, MLP 3584, 8 layers, vocabulary
16384, untied), 1 window of 64 tokens (activations negligible). Each metric runs in a
fresh process: the model is built, the peak-RSS counter is reset (`/proc/self/clear_refs`),
the scores are computed with `compute_scores`, and (VmHWM − RSS before) / scored weights
is reported. `--old-hutchinson FILE` also measures an older hutchinson_diag module (e.g.
`git show REV:cwa/metrics/hutchinson_diag.py > FILE`) as the baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag")

CHILD = r"""
import json, re, sys, torch
torch.manual_seed(0)
from transformers import LlamaConfig, LlamaForCausalLM
from cwa.metrics import METRICS, MetricOptions, compute_scores, select_params
metric, old = sys.argv[1], sys.argv[2]
if old:
    import importlib.util
    spec = importlib.util.spec_from_file_location("hutch_old", old)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    METRICS.add("hutch_old", mod.HutchinsonDiag); metric = "hutch_old"
cfg = LlamaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                  attn_implementation="eager")
torch.set_default_dtype(torch.bfloat16)
model = LlamaForCausalLM(cfg).eval()
torch.set_default_dtype(torch.float32)
params = select_params(model)
ids = torch.randint(0, cfg.vocab_size, (1, 64))
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
base = status("VmRSS")
scores, _ = compute_scores(model, params, ids, None, metric, MetricOptions(seed=0, hutchinson_samples=1), batch_size=1)
peak = status("VmHWM")
n = sum(p.numel() for p in params.values())
print(json.dumps({"metric": sys.argv[1] + (" (before)" if old else ""), "scored": n,
                  "growth_bytes": peak - base, "bytes_per_weight": (peak - base) / n}))
"""


def measure(metric: str, old: str = "") -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, metric, old], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "65536"}, cwd=Path(__file__).resolve().parents[1])
    if r.returncode != 0:
        return {"metric": metric, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--old-hutchinson", default="")
    ap.add_argument("--metrics", default=",".join(METRICS))
    a = ap.parse_args(argv)
    rows = [measure(m) for m in a.metrics.split(",")]
    if a.old_hutchinson:
        rows.append(measure("hutchinson_diag", a.old_hutchinson))
    print("| metric | scored weights | RSS growth | bytes per scored weight |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['metric']} | | | error: {r['error']} |")
        else:
            print(f"| {r['metric']} | {r['scored'] / 1e6:.1f} M | {r['growth_bytes'] / 2**20:.0f} MiB | "
                  f"{r['bytes_per_weight']:.2f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
