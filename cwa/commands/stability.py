"""`cwa stability`: how much do the top-K sets of several seeds or metrics agree?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import out_path, read_paths, report


def stability_cmd(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Two or more scores .safetensors (full analysis) or selection .h5 (overlap only); - reads paths from stdin."
        ),
    ],
    topk: Annotated[
        int | None,
        typer.Option(
            "--topk", "-k", help="K compared (required for scores; selections carry their own)."
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option("--mode", help="global (default) or per_layer; selections carry their own."),
    ] = None,
    rank_by: O.RankByOpt = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write stability_results.json here.")
    ] = None,
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Compare top-K sets across seeds or metrics: Jaccard (with its random baseline
    K/(2n-K)), Spearman rank correlation over the union of the top-K sets, Jaccard as a
    function of K, and per-tensor overlap. Print the stability artifact's path.

    Labels are the seeds when all inputs share a metric, else the metric names.

    Examples:

      cwa stability scores_seed0.safetensors scores_seed1.safetensors scores_seed2.safetensors --topk 100 --json stability_results.json

      cwa stability magnitude.safetensors grad_x_weight.safetensors act_mag.safetensors -k 500

      ls topk_seed*.h5 | cwa stability -
    """
    from cwa.stages import stability_stage

    r = stability_stage(
        read_paths(inputs, "scores or selection"),
        topk=topk,
        rank_by=rank_by,
        mode=mode,
        output=out_path(output),
        json_path=json_path,
        force=force,
    )
    report(r, verbose)
