"""The prepared GPU check (issue 13): every metric on a Llama-3.1-8B-shaped model.

    python benchmarks/gpu_check.py            # one 80 GB-class GPU, <= 8 minutes
    python benchmarks/gpu_check.py --tiny     # the same code on the CPU (the test suite runs it)

Builds the model from its config with random bf16 weights directly on the device (no
download), writes 8 windows x 256 random tokens as a `.npy`, and for every metric runs
`cwa.stages.score_stage` in memory; then one perturbation condition (sign_flip of the
top-100 of the magnitude scores). Prints, per metric: seconds per window, peak device
memory against `benchmarks/memory_plan.py`'s estimate, and the share of wall time the
device was idle (host work: from the profiler's kernel time on CUDA; "n/a" on the CPU).
A metric that runs out of memory is reported as such and the check goes on. Results go
to stdout as a table and, with `--json PATH`, as JSON. Record them in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_plan import LLAMA_31_8B, Arch, plan  # noqa: E402

METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag")
TINY = Arch("tiny Llama", vocab=512, hidden=64, intermediate=224, layers=2, heads=4, kv_heads=2)


def build(arch: Arch, device: str, dtype: torch.dtype, seed: int = 0):
    """A LoadedModel around a randomly initialised Llama of `arch`, made on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cwa.models import LoadedModel, embedded_dir

    cfg = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                      num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                      num_key_value_heads=arch.kv_heads, max_position_embeddings=8192,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in bf16 at once: no float32 copy of 8 B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir())  # only its name is used: windows are ids
    name = f"random {arch.name} ({dtype}, seed {seed})"
    return LoadedModel(lambda: model, tok, cfg, name, f"gpu-check-{arch.name}-{seed}", str(dtype).split(".")[-1],
                       device, None, "memory")


def _windows(arch: Arch, n: int, seq_len: int, d: Path) -> Path:
    p = d / "windows.npy"
    np.save(p, np.random.default_rng(0).integers(0, arch.vocab, size=(n, seq_len), dtype=np.int64))
    return p


def _idle_share(fn, device: str) -> tuple[float, float | None]:
    """(wall seconds, share of it with no kernel running) for fn()."""
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = sum(e.device_time_total for e in prof.key_averages()) / 1e6  # overlapping kernels: an upper bound
    return wall, max(0.0, 1.0 - busy / wall) if wall > 0 else None


def run_metric(lm, data, metric: str, device: str, n: int) -> dict:
    from cwa.stages import score_stage

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    box: dict = {}
    try:
        wall, idle = _idle_share(lambda: box.setdefault("r", score_stage(
            lm, data, metric=metric, hutchinson_samples=1, mc_samples=1)), device)
    except torch.cuda.OutOfMemoryError as e:
        return {"metric": metric, "error": f"out of memory ({str(e).splitlines()[0][:120]})"}
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"metric": metric, "seconds": wall, "seconds_per_window": wall / n, "peak_bytes": peak,
            "idle_share": idle, "scores": box["r"].value}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (the suite runs this)")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    arch = TINY if a.tiny else LLAMA_31_8B
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU variant", file=sys.stderr)
        return 2
    n, seq = a.windows or (2 if a.tiny else 8), a.seq_len or (16 if a.tiny else 256)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    from cwa.stages import DataOptions, perturb_stage, rank_stage

    t_build = time.perf_counter()
    lm = build(arch, device, dtype)
    built = time.perf_counter() - t_build
    est, counts = plan(arch, dtype_bytes=2 if dtype == torch.bfloat16 else 4, batch=n, seq_len=seq)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        npy = _windows(arch, n, seq, Path(d))
        data = DataOptions(data=str(npy), eval_data=str(npy), calib_samples=n, eval_samples=n, seq_len=seq, batch_size=n)
        for m in a.metrics.split(","):
            # Hutchinson's double backward keeps ~3x the activations: the memory plan runs it
            # one window per batch (batch size never changes results)
            one = m == "hutchinson_diag"
            r = run_metric(lm, dataclasses.replace(data, batch_size=1) if one else data, m, device, n)
            r["batch_size"] = 1 if one else n
            r["plan_likely_bytes"] = (plan(arch, dtype_bytes=2 if dtype == torch.bfloat16 else 4, batch=1,
                                           seq_len=seq)[0] if one else est)[m]["likely"]
            rows.append(r)
            print(_row(r), flush=True)
        mag = next((r["scores"] for r in rows if r["metric"] == "magnitude" and "scores" in r), None)
        if mag is not None:
            top = rank_stage(mag, topk=100).value
            t0 = time.perf_counter()
            res = perturb_stage(lm, data, [top], method="sign_flip").value
            pert = {"seconds": time.perf_counter() - t0, "delta_nll": res.summary["topk"]["delta_nll"]}
            print(f"perturb sign_flip top-100: {pert['seconds']:.1f} s, ΔNLL {pert['delta_nll']:.4f}")
        else:
            pert = None
    doc = {"arch": arch.name, "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": str(dtype), "windows": n, "seq_len": seq, "params": counts["params"], "build_seconds": built,
           "metrics": [{k: v for k, v in r.items() if k != "scores"} for r in rows], "perturb": pert}
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2))
    return 0


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['metric']:16s} {r['error']}"
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
    idle = "n/a" if r["idle_share"] is None else f"{r['idle_share']:.0%}"
    return (f"{r['metric']:16s} {r['seconds_per_window']:.3f} s/window  peak {peak} "
            f"(plan {r['plan_likely_bytes'] / 2**30:.1f} GiB)  idle {idle}")


if __name__ == "__main__":
    sys.exit(main())
