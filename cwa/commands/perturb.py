"""`cwa perturb`: perturb selected weights, measure the effect, restore exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import data_options, model_options, out_path, read_paths, report


def perturb_cmd(
    selections: Annotated[list[str], typer.Argument(help="Selection .h5 files (top-K and controls), or - for stdin.")],
    model: O.ModelOpt = None,
    revision: O.RevisionOpt = None,
    perturb: O.PerturbOpt = "sign_flip",
    perturb_scale: O.ScaleOpt = None,
    perturb_prob: O.ProbOpt = None,
    bit: O.BitOpt = None,
    seed: O.SeedOpt = 0,
    data: O.DataOpt = None,
    eval_data: O.EvalDataOpt = None,
    text_field: O.TextFieldOpt = None,
    eval_samples: O.EvalSamplesOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write perturbation_results.json here.")] = None,
    eval_tasks: O.EvalTasksOpt = None,
    eval_tasks_path: O.EvalTasksPathOpt = None,
    eval_tasks_limit: O.EvalTasksLimitOpt = None,
    save_model: Annotated[Path | None, typer.Option(
        "--save-model", help="Also write one condition's perturbed weights (--condition) as a Hugging Face "
        "checkpoint into this new or empty directory.")] = None,
    condition: Annotated[str | None, typer.Option(
        "--condition", help="The condition --save-model writes: topk, bottom_k, random_k:D (draw D), "
        "KIND@S for the S-th of several selections of one kind.")] = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    device_map: O.DeviceMapOpt = None,
    trust_remote_code: O.TrustOpt = False,
    allow_pickle: O.AllowPickleOpt = False,
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Perturb each selection (every draw), evaluate, restore; print the results' path.

    Examples:

      cwa perturb topk.h5 random_k.h5 bottom_k.h5 --perturb zero --json perturbation_results.json

      cwa score | cwa rank - --topk 100 | cwa perturb - --perturb sign_flip

      cwa perturb topk.h5 --perturb bit_flip --bit exponent_msb --perturb-prob 0.5

      cwa perturb topk.h5 random_k.h5 --eval-tasks mytask --eval-tasks-path my_tasks/ --eval-tasks-limit 100

      cwa perturb topk.h5 random_k.h5 --perturb zero --save-model zeroed_topk --condition topk
    """
    from cwa.stages import perturb_stage

    if perturb == "none":
        from cwa.errors import UsageError

        raise UsageError("--perturb none: nothing to do in cwa perturb (it is for cwa run)")
    from cwa.checks import check_perturb_flags

    perturb_prob, bit = check_perturb_flags(perturb, scale=perturb_scale, prob=perturb_prob, bit=bit)
    from cwa.tasks import task_eval

    tasks = task_eval(eval_tasks, eval_tasks_path, eval_tasks_limit)
    paths = read_paths(selections, "selection")
    from cwa.console import set_verbose

    set_verbose(verbose)  # before loading: --verbose also shows the libraries' own progress bars
    lm = model_options(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle).load()
    d = data_options(data, eval_data, None, 32, eval_samples, seq_len, batch_size)
    d.text_field = text_field
    r = perturb_stage(
        lm, d, paths, method=perturb, scale=perturb_scale, prob=perturb_prob, bit=bit, seed=seed,
        output=out_path(output), json_path=json_out, force=force, save_model=save_model, condition=condition,
        tasks=tasks,
    )
    report(r, verbose)
