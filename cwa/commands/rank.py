"""`cwa rank`: exact top-K selection from a scores artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import model_options, one_path, out_path, report


def rank_cmd(
    scores: Annotated[str, typer.Argument(help="Scores .safetensors (or - to read the path from stdin).")],
    topk: O.TopkOpt = 100,
    mode: O.ModeOpt = "global",
    rank_by: O.RankByOpt = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write top_weights.csv here.")] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Also write sensitivity_stats.json here.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model, to fill the CSV's value column.")] = None,
    revision: O.RevisionOpt = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Rank weights: the K highest scores globally or per tensor; print the selection's path.

    Examples:

      cwa rank scores.safetensors --topk 100 --csv top_weights.csv --stats sensitivity_stats.json

      cwa score --metric magnitude | cwa rank - --topk 500 --mode per_layer
    """
    from cwa.stages import rank_stage

    lm = model_options(model, revision, dtype, device).load(lazy=True) if model else None
    r = rank_stage(
        one_path(scores, "scores"), topk=topk, mode=mode, rank_by=rank_by, output=out_path(output),
        csv=csv, stats=stats, lm=lm, force=force,
    )
    report(r, verbose)
