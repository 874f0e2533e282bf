"""The prepared GPU check (issue 13): every metric on a Llama-3.1-8B-shaped model.

    python benchmarks/gpu_check.py --json OUT.json   # one 80 GB-class GPU, <= 8 minutes
    python benchmarks/gpu_check.py --tiny            # the same code on the CPU (the suite runs it)
    python benchmarks/gpu_check.py --device cpu --layers 1 --windows 1 --seq-len 16
                                                     # a rehearsal at Llama-3.1-8B's tensor shapes

Builds the model from its config with random bf16 weights directly on the device (no
download), writes 8 windows x 256 random tokens as a `.npy`, and for every metric runs
`cwa.stages.score_stage` in memory; then one perturbation condition (sign_flip of the
top-100 of the magnitude scores). Prints, per metric: seconds per window, peak device
memory against `benchmarks/memory_plan.py`'s estimate, and the share of wall time the
device was idle (host work: the union of the profiler's kernel and copy intervals on
CUDA; "n/a" on the CPU). On the CPU the peak is the process's peak resident set.

Made to come back with numbers from one try: magnitude runs first (it gives the
perturbation's top-100, ranked at once so its 32 GB of host scores are freed), then the
headline `hutchinson_diag`, then the rest; each metric's scores are dropped as soon as it
is measured (six metrics' float32 scores of 8 B weights would be 192 GB of host memory);
a metric that fails (out of memory or any other error) is reported as such and the check
goes on; no metric starts once `--budget-s` seconds have passed since the start (it is
reported as skipped); and `--json` is rewritten after every metric, so a run stopped from
outside still leaves what it measured. Record the numbers in RESULTS.md.

On the lent H200 (its python3 has torch and transformers; cwa needs no install there):

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD timeout 560 python3 benchmarks/gpu_check.py \\
        --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
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

# magnitude first (the perturbation's top-100), then the headline metric, then the rest
METRICS = ("magnitude", "hutchinson_diag", "grad_x_weight", "grad_squared", "hessian_diag", "act_mag")
TINY = Arch("tiny Llama", vocab=512, hidden=64, intermediate=224, layers=2, heads=4, kv_heads=2)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build(arch: Arch, device: str, dtype: torch.dtype, seed: int = 0):
    """A LoadedModel around a randomly initialised Llama of `arch`, made on `device`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

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
    tok = AutoTokenizer.from_pretrained(embedded_dir())  # only its name is used: windows are ids
    name = f"random {arch.name} ({dtype}, seed {seed})"
    return LoadedModel(lambda: model, tok, cfg, name, f"gpu-check-{arch.name}-{seed}", str(dtype).split(".")[-1],
                       device, None, "memory")


def _windows(arch: Arch, n: int, seq_len: int, d: Path) -> Path:
    p = d / "windows.npy"
    np.save(p, np.random.default_rng(0).integers(0, arch.vocab, size=(n, seq_len), dtype=np.int64))
    return p


def busy_seconds(intervals) -> float:
    """Length of the union of `(start, end)` intervals (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def device_intervals_s(prof, device_type) -> list[tuple[float, float]]:
    """(start, end) in seconds of every event the profiler saw on `device_type` (on the
    GPU: its kernels, copies and fills)."""
    return [(e.time_range.start / 1e6, e.time_range.end / 1e6) for e in prof.events() if e.device_type == device_type]


def _timed(fn, device: str) -> tuple[float, float | None, str | None]:
    """(wall seconds, share of it with nothing running on the GPU, why that share is
    missing) for fn(); the share is None on the CPU or when the profiler fails."""
    if not device.startswith("cuda"):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    return profiled(fn, ProfilerActivity.CUDA, DeviceType.CUDA, torch.cuda.synchronize)


def profiled(fn, activity, device_type, sync=lambda: None) -> tuple[float, float | None, str | None]:
    """`_timed` under the profiler: a profiler that cannot start, stop or be read costs
    the idle share (None, and why), never fn's run or its wall time; an error of fn
    propagates with the profiler stopped."""
    from torch.profiler import profile

    sync()
    prof, why = None, None
    try:
        prof = profile(activities=[activity])
        prof.__enter__()
    except Exception as e:  # noqa: BLE001 - reported in the row
        prof, why = None, f"profiler did not start: {type(e).__name__}: {e}"
    try:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    finally:
        if prof is not None:
            try:
                prof.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001 - reported in the row
                prof, why = None, f"profiler did not stop: {type(e).__name__}: {e}"
    if prof is None:
        return wall, None, why
    try:
        busy = busy_seconds(device_intervals_s(prof, device_type))
        return wall, max(0.0, 1.0 - busy / wall), None
    except Exception as e:  # noqa: BLE001 - reported in the row
        return wall, None, f"{type(e).__name__}: {e}"


def _error(e: BaseException) -> str:
    kind = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
    return f"{kind}: {(str(e).splitlines() or [''])[0][:200]}"


def _reset_peak(device: str) -> None:
    """Start a new peak: the CUDA allocator's, or on the CPU the process's peak resident
    set (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak(device: str) -> int | None:
    """Peak bytes since `_reset_peak`: allocated on the GPU, or resident on the CPU (the
    whole process: weights, scores and the interpreter; None where /proc is missing)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) * 1024


def run_metric(lm, data, metric: str, device: str, n: int, keep=None) -> dict:
    """Score `metric` once and measure it; `keep(scores)`, if given, sees the scores before
    they are dropped (the check holds no metric's scores past its own row)."""
    from cwa.stages import score_stage

    gc.collect()
    _reset_peak(device)
    box: dict = {}
    row: dict = {"metric": metric}
    try:
        wall, idle, why = _timed(lambda: box.setdefault("r", score_stage(
            lm, data, metric=metric, hutchinson_samples=1, mc_samples=1)), device)
        peak = _peak(device)
        row.update(seconds=wall, seconds_per_window=wall / n, peak_bytes=peak, idle_share=idle)
        if why:
            row["idle_error"] = why
        if keep is not None:
            keep(box["r"].value)
    except Exception as e:  # noqa: BLE001 - one metric's failure must not cost the others' numbers
        row["error"] = _error(e)
    finally:
        box.clear()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (the suite runs this)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cpu with --tiny, else cuda (cpu with the 8B shape: a rehearsal, with --layers)")
    ap.add_argument("--layers", type=int, default=None,
                    help="transformer blocks (default: the architecture's; 1 keeps Llama-3.1-8B's tensor shapes "
                         "at 1.3 B weights)")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="model dtype (default: bfloat16 on the GPU, float32 with --tiny)")
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no metric after this many seconds from the start (default 420)")
    ap.add_argument("--json", type=Path, default=None, help="rewritten after every metric")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    arch = TINY if a.tiny else LLAMA_31_8B
    if a.layers is not None:
        arch = dataclasses.replace(arch, name=f"{arch.name}, {a.layers} layer(s)", layers=a.layers)
    device = a.device or ("cpu" if a.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU variant", file=sys.stderr)
        return 2
    n, seq = a.windows or (2 if a.tiny else 8), a.seq_len or (16 if a.tiny else 256)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.float32 if a.tiny else torch.bfloat16)
    dbytes = 2 if dtype == torch.bfloat16 else 4
    import transformers

    from cwa.stages import DataOptions, perturb_stage, rank_stage

    lm = build(arch, device, dtype)
    built = time.perf_counter() - t_start
    est, counts = plan(arch, dtype_bytes=dbytes, batch=n, seq_len=seq)
    est1 = plan(arch, dtype_bytes=dbytes, batch=1, seq_len=seq)[0]
    doc = {"arch": arch.name, "device": device,
           "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "dtype": str(dtype), "windows": n, "seq_len": seq, "params": counts["params"],
           "build_seconds": built, "budget_s": a.budget_s, "metrics": [], "perturb": None, "complete": False}

    def save() -> None:
        if a.json:
            tmp = a.json.with_name(a.json.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            tmp.replace(a.json)

    print(f"{doc['device_name']}: {arch.name}, {counts['params'] / 1e9:.2f} B weights, {dtype}, "
          f"built in {built:.1f} s; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    save()
    top: list = []
    with tempfile.TemporaryDirectory() as d:
        npy = _windows(arch, n, seq, Path(d))
        data = DataOptions(data=str(npy), eval_data=str(npy), calib_samples=n, eval_samples=n, seq_len=seq, batch_size=n)
        for m in a.metrics.split(","):
            # Hutchinson's double backward keeps ~3x the activations: the memory plan runs it
            # one window per batch (batch size never changes results)
            one = m == "hutchinson_diag"
            if time.perf_counter() - t_start > a.budget_s:
                r = {"metric": m, "skipped": f"time budget ({a.budget_s:.0f} s) spent before it started"}
            else:  # magnitude's top-100 is ranked at once, so its scores need not outlive the row
                keep = (lambda scores: top.append(rank_stage(scores, topk=100).value)) if m == "magnitude" else None
                r = run_metric(lm, dataclasses.replace(data, batch_size=1) if one else data, m, device, n, keep)
            r["batch_size"], r["device"] = 1 if one else n, device
            r["plan_likely_bytes"] = (est1 if one else est)[m]["likely"]
            doc["metrics"].append(r)
            print(_row(r), flush=True)
            save()
        if top and time.perf_counter() - t_start <= a.budget_s:
            t0 = time.perf_counter()
            try:
                res = perturb_stage(lm, data, top, method="sign_flip").value
                doc["perturb"] = {"seconds": time.perf_counter() - t0, "delta_nll": res.summary["topk"]["delta_nll"]}
                print(f"perturb sign_flip top-100: {doc['perturb']['seconds']:.1f} s, "
                      f"ΔNLL {doc['perturb']['delta_nll']:.4f}", flush=True)
            except Exception as e:  # noqa: BLE001 - reported
                doc["perturb"] = {"error": _error(e)}
                print(f"perturb sign_flip top-100: {doc['perturb']['error']}", flush=True)
    doc["complete"] = True
    doc["seconds"] = time.perf_counter() - t_start
    print(f"done in {doc['seconds']:.0f} s", flush=True)
    save()
    return 0


def _row(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"{r['metric']:16s} {r.get('error') or r['skipped']}"
    peak = "n/a" if r["peak_bytes"] is None else _size(r["peak_bytes"])
    idle = "n/a" if r["idle_share"] is None else f"{r['idle_share']:.0%}"
    what = "peak RSS" if r.get("device") == "cpu" else "peak"
    return (f"{r['metric']:16s} batch {r['batch_size']}  {r['seconds_per_window']:.3f} s/window  {what} {peak} "
            f"(plan {_size(r['plan_likely_bytes'])})  idle {idle}")


def _size(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
