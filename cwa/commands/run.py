"""`cwa run`: the whole experiment in one go (score, rank, controls, perturb, stability, plots)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import data_options, model_options
from cwa.console import emit, set_verbose


def run_cmd(
    model: O.ModelOpt = None,
    revision: O.RevisionOpt = None,
    metric: O.MetricOpt = "grad_x_weight",
    topk: Annotated[str, typer.Option("--topk", "-k", help="K, or a comma list for a K sweep (50,100,200,500).")] = "100",
    mode: O.ModeOpt = "global",
    rank_by: O.RankByOpt = None,
    perturb: O.PerturbOpt = "sign_flip",
    perturb_scale: O.ScaleOpt = None,
    perturb_prob: O.ProbOpt = None,
    bit: O.BitOpt = None,
    controls: Annotated[str, typer.Option("--controls", help="Comma list of random_k, bottom_k, layer_matched, magnitude_matched, or none.")] = "random_k,bottom_k",
    control_draws: O.DrawsOpt = 20,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma list of seeds; per-seed stages run once per seed.")] = "0,1,2",
    stability_check: Annotated[bool | None, typer.Option("--stability-check/--no-stability-check", help="Jaccard stability across seeds (default: on with 2+ seeds).")] = None,
    save_plots: Annotated[bool, typer.Option("--save-plots/--no-save-plots", help="Write the figures under OUT/plots.")] = True,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Output directory (default outputs/{model}_{metric}_k{K}).")] = None,
    data: O.DataOpt = None,
    eval_data: O.EvalDataOpt = None,
    text_field: O.TextFieldOpt = None,
    data_seed: O.DataSeedOpt = None,
    calib_samples: O.CalibOpt = 32,
    eval_samples: O.EvalSamplesOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    hutchinson_samples: O.HutchOpt = 8,
    mc_samples: O.McOpt = 1,
    obd: Annotated[bool, typer.Option("--obd", help="OBD saliency 1/2*c*w^2 for curvature metrics.")] = False,
    score_dtype: O.ScoreDtypeOpt = "float32",
    include: O.IncludeOpt = None,
    exclude: O.ExcludeOpt = None,
    eval_tasks: O.EvalTasksOpt = None,
    eval_tasks_path: O.EvalTasksPathOpt = None,
    eval_tasks_limit: O.EvalTasksLimitOpt = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    device_map: O.DeviceMapOpt = None,
    trust_remote_code: O.TrustOpt = False,
    allow_pickle: O.AllowPickleOpt = False,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Run the complete analysis and print the output directory.

    With no flags: the Quick Start analysis (grad_x_weight, top-100 global, sign flip,
    random_k + bottom_k controls, seeds 0,1,2, stability, plots) on the embedded model and
    corpus, about a minute on a laptop CPU. Running it again reuses every finished stage.

    Examples:

      cwa run

      cwa run --model gpt2 --metric grad_x_weight --topk 100 --mode global --perturb sign_flip
      --perturb-scale 1.0 --controls random_k,bottom_k --seeds 0,1,2 --stability-check
      --save-plots --out-dir outputs/x --verbose

      cwa run --metric magnitude --topk 500 --mode per_layer

      cwa run --topk 50,100,200,500 --perturb zero      # K sweep with a dose-response plot
    """
    from cwa.checks import check_controls, check_perturb_flags
    from cwa.pipeline import RunConfig, parse_int_list, run

    perturb_prob, bit = check_perturb_flags(perturb, scale=perturb_scale, prob=perturb_prob, bit=bit)

    set_verbose(verbose)
    data_opts = data_options(data, eval_data, data_seed, calib_samples, eval_samples, seq_len, batch_size)
    data_opts.text_field = text_field
    cfg = RunConfig(
        model=model_options(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle),
        data=data_opts,
        metric=metric,
        topk=parse_int_list(topk, "--topk"),
        mode=mode,
        rank_by=rank_by,
        perturb=perturb,
        perturb_scale=perturb_scale,
        perturb_prob=perturb_prob,
        bit=bit,
        controls=check_controls(controls),
        control_draws=control_draws,
        seeds=parse_int_list(seeds, "--seeds"),
        stability_check=stability_check,
        save_plots=save_plots,
        out_dir=out_dir,
        hutchinson_samples=hutchinson_samples,
        mc_samples=mc_samples,
        obd=obd,
        score_dtype=score_dtype,
        include=include,
        exclude=exclude,
        eval_tasks=eval_tasks,
        eval_tasks_path=eval_tasks_path,
        eval_tasks_limit=eval_tasks_limit,
        force=force,
        verbose=verbose,
    )
    emit(run(cfg, argv=["cwa", *sys.argv[1:]]))
