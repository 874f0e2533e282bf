"""`cwa plot`: the figures of any set of artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import read_paths


def plot_cmd(
    artifacts: Annotated[
        list[str],
        typer.Argument(
            help="Artifacts (.h5 selections, perturbation, stability) or directories holding them; - reads paths from stdin."
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory for the PNG figures (created if missing)."),
    ] = Path("cwa-out/plots"),
    verbose: O.VerboseOpt = False,
) -> None:
    """Draw every figure the artifacts allow and print each PNG path on stdout.

    Top-K selections give the sensitivity distribution, layer comparison and heatmap;
    perturbation results the perturbation effects (and, over several K, the dose
    response); stability artifacts the stability analysis. A directory stands for every
    artifact below it.

    Examples:

      cwa plot outputs/x/artifacts -o outputs/x/plots

      cwa plot topk.h5 perturb.h5 stability.h5 -o figs

      cwa rank scores.safetensors --topk 100 | cwa plot - -o figs
    """
    from cwa.console import emit, set_verbose
    from cwa.errors import UsageError
    from cwa.plots import plot_artifacts

    set_verbose(verbose)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir}: is a file; give a directory for the figures")
    for p in plot_artifacts(read_paths(artifacts, "artifact"), out_dir):
        emit(p)
