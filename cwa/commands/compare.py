"""`cwa compare`: several `cwa run` output directories side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import read_paths


def compare_cmd(
    runs: Annotated[
        list[str], typer.Argument(help="`cwa run` output directories; - reads them from stdin, one per line.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory for comparison.json, comparison.csv, plots/ and report.html "
                     "(default: ./cwa-out/compare-{fingerprint16})."),
    ] = None,
    allow_mixed: Annotated[
        bool, typer.Option("--allow-mixed", help="Compare runs on different models or evaluation windows (marked).")
    ] = False,
    topk: Annotated[
        int | None,
        typer.Option("--topk", "-k", help="K of the top-K overlap and location (default: the largest K every run holds)."),
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Comma list, one label per run (default: what tells the runs apart).")
    ] = None,
    save_plots: Annotated[bool, typer.Option("--save-plots/--no-save-plots", help="Figures under plots/.")] = True,
    verbose: O.VerboseOpt = False,
) -> None:
    """Compare `cwa run` outputs (different metrics, K, seeds, perturbations or models)
    and print the output directory: comparison.json, comparison.csv (one row per run x
    seed x K x condition: delta NLL with its interval, control mean and interval, p, z,
    KL), figures (delta NLL against K per metric with control bands, the top-K Jaccard
    matrix at a common K, where each top-K lies, the headline table) and report.html.

    Runs on different models or evaluation windows are refused unless --allow-mixed.

    Examples:

      cwa compare outputs/gpt2_grad_x_weight_k100 outputs/gpt2_magnitude_k100 -o outputs/compare

      cwa compare outputs/x_k_sweep -o outputs/x_k_sweep_compare

      ls -d outputs/*_k100 | cwa compare - -o outputs/compare --topk 100
    """
    from cwa.comparison import compare
    from cwa.console import emit, log, set_verbose

    set_verbose(verbose)
    labs = None if labels is None else [x.strip() for x in labels.split(",")]
    cmp = compare(read_paths(runs, "run directory"), labels=labs, topk=topk, allow_mixed=allow_mixed)
    out = cmp.save(output, plots=save_plots)
    for note in cmp.notes:
        log(f"note: {note}")
    if verbose:
        from cwa.report import headline

        for run, lab in zip(cmp.runs, cmp.labels, strict=True):
            log(f"{lab}: {headline(run)}")
    emit(out)
