"""Shared option definitions: every command's `--seed` means and says the same.

Only this package and `cwa.cli` import typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id, local HF directory, PEFT adapter directory or .gguf file. Default: the embedded model."),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (the checkpoint's dtype, as in transformers; float16 becomes float32 on CPU), float32, bfloat16, float16.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="'auto' spreads a large model over devices (accelerate).")
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code/--no-trust-remote-code", help="Run model code from the hub (off by default).")
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Load a .bin/.pt pickle checkpoint (tensors only, weights_only=True)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Calibration data: .txt, dir of .txt, .jsonl[.gz] / .json.gz (JSON lines), a save_to_disk dir, hf:NAME[:CONFIG[:SPLIT]] (SPLIT may slice: test[:5%]), .npy windows."),
]
EvalDataOpt = Annotated[str | None, typer.Option("--eval-data", help="Evaluation data (same forms as --data).")]
TextFieldOpt = Annotated[
    str | None,
    typer.Option("--text-field", help="Field (column) holding the text in .jsonl[.gz], .json.gz, hf: and save_to_disk data (default: text)."),
]
DataSeedOpt = Annotated[int | None, typer.Option("--data-seed", help="Seed for drawing calibration windows (default: --seed).")]
CalibOpt = Annotated[int, typer.Option("--calib-samples", help="Number of calibration windows.")]
EvalSamplesOpt = Annotated[int, typer.Option("--eval-samples", help="Number of evaluation windows.")]
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", help="Tokens per window (default 256, or the model's context if smaller).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass (does not change results).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of every random draw of this stage.")]
def _metric_help() -> str:
    """The metric choices from the registry (cwa.metrics imports no torch)."""
    from cwa.metrics import METRICS

    return ", ".join(METRICS.names()) + "."


MetricOpt = Annotated[str, typer.Option("--metric", help=_metric_help())]
TopkOpt = Annotated[int, typer.Option("--topk", "-k", help="K: number of weights (per tensor in per_layer mode).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="global or per_layer.")]
RankByOpt = Annotated[str | None, typer.Option("--rank-by", help="abs (default) or value.")]
PerturbOpt = Annotated[str, typer.Option("--perturb", help="zero, sign_flip, gauss_noise, bit_flip (none in `cwa run` skips).")]
ScaleOpt = Annotated[float | None, typer.Option("--perturb-scale", help="sign_flip and gauss_noise only: s in w->-s*w (default 1) and w+s*|w|*eps (default 0.1).")]
# --perturb-scale/--perturb-prob/--bit default to None ("not given"): given with a method
# that does not use them they are refused (cwa.checks.check_perturb_flags), not ignored.
ProbOpt = Annotated[
    float | None,
    typer.Option("--perturb-prob", help="bit_flip only: probability each selected weight is flipped (default 1.0)."),
]
BitOpt = Annotated[
    str | None,
    typer.Option("--bit", help="bit_flip only: sign, exponent_msb (default), mantissa_msb, random, or an index (0 = LSB)."),
]
DrawsOpt = Annotated[int, typer.Option("--control-draws", help="Independent draws of each random control.")]
HutchOpt = Annotated[int, typer.Option("--hutchinson-samples", help="Rademacher probes P for hutchinson_diag.")]
McOpt = Annotated[int, typer.Option("--mc-samples", help="Sampled-label draws S for hessian_diag.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Artifact path (default: ./cwa-out/ by fingerprint).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when a cached artifact matches.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More log lines on stderr.")]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", metavar="<glob>", help="Glob on parameter names to score (repeatable; `cwa info MODEL` lists them)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", metavar="<glob>", help="Glob on parameter names not to score (repeatable)."),
]
ScoreDtypeOpt = Annotated[
    str, typer.Option("--score-dtype", help="Stored scores: float32 (default), bfloat16 (half the disk), float16 (magnitude).")
]
EvalTasksOpt = Annotated[
    str | None,
    typer.Option("--eval-tasks", metavar="NAMES",
                 help="Comma list of lm-eval tasks to evaluate on the baseline and every condition (needs cwa[tasks])."),
]
EvalTasksPathOpt = Annotated[
    Path | None,
    typer.Option("--eval-tasks-path", metavar="DIR", help="A directory of local lm-eval task YAML files (lm-eval's include_path)."),
]
EvalTasksLimitOpt = Annotated[
    int | None, typer.Option("--eval-tasks-limit", metavar="N", help="Evaluate the first N documents of each task.")
]
