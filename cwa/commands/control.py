"""`cwa control`: control selections of the same size as the top-K."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import model_options, one_path, out_path, report


def control_cmd(
    scores: Annotated[str, typer.Argument(help="Scores .safetensors (or - for stdin).")],
    kind: Annotated[str, typer.Option("--kind", help="random_k, bottom_k, layer_matched, magnitude_matched.")] = "random_k",
    topk: Annotated[int | None, typer.Option("--topk", "-k", help="K (taken from --ref when given).")] = None,
    mode: O.ModeOpt = "global",
    rank_by: O.RankByOpt = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="The top-K selection .h5 to match.")] = None,
    control_draws: O.DrawsOpt = 20,
    seed: O.SeedOpt = 0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (needed by magnitude_matched).")] = None,
    revision: O.RevisionOpt = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Draw a control selection (random_k, bottom_k, layer_matched, magnitude_matched).

    Examples:

      cwa control scores.safetensors --kind random_k --topk 100 --control-draws 20

      cwa control scores.safetensors --kind magnitude_matched --ref topk.h5 --model gpt2
    """
    from cwa.stages import control_stage

    lm = model_options(model, revision, dtype, device).load(lazy=True) if model else None
    r = control_stage(
        one_path(scores, "scores"), kind=kind, topk=topk, mode=mode, rank_by=rank_by, ref=ref,
        draws=control_draws, seed=seed, lm=lm, output=out_path(output), force=force,
    )
    report(r, verbose)
