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
    perturb_prob: O.ProbOpt = 1.0,
    bit: O.BitOpt = "exponent_msb",
    seed: O.SeedOpt = 0,
    data: O.DataOpt = None,
    eval_data: O.EvalDataOpt = None,
    eval_samples: O.EvalSamplesOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write perturbation_results.json here.")] = None,
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
    """
    from cwa.stages import perturb_stage

    if perturb == "none":
        from cwa.errors import UsageError

        raise UsageError("--perturb none: nothing to do in cwa perturb (it is for cwa run)")
    paths = read_paths(selections, "selection")
    lm = model_options(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle).load()
    d = data_options(data, eval_data, None, 32, eval_samples, seq_len, batch_size)
    r = perturb_stage(
        lm, d, paths, method=perturb, scale=perturb_scale, prob=perturb_prob, bit=bit, seed=seed,
        output=out_path(output), json_path=json_out, force=force,
    )
    report(r, verbose)
