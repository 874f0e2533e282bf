"""`cwa superweights`: find super-weight candidates in one forward pass, prove them by
zeroing each alone against random single weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import data_options, model_options, out_path, report


def superweights_cmd(
    model: O.ModelOpt = None,
    revision: O.RevisionOpt = None,
    prompt: Annotated[str, typer.Option(
        "--prompt", help="The detector's data-free input ('' = the BOS token alone).")] = "Apple Inc. is a worldwide tech company.",
    spike_ratio: Annotated[float, typer.Option(
        "--spike-ratio", help="A layer is a candidate when its largest |down-projection output| is at least this "
        "multiple of that output's median |value|.")] = 100.0,
    spike_threshold: Annotated[float | None, typer.Option(
        "--spike-threshold", help="Also require this absolute |output| (the paper used 50 on 7B models).")] = None,
    all_layers: Annotated[bool, typer.Option(
        "--all-layers", help="Test every layer's candidate coordinate, spike or not.")] = False,
    module: Annotated[str | None, typer.Option(
        "--module", help="The down-projection's module type (default: mlp.down_proj, mlp.c_proj, "
        "mlp.dense_4h_to_h, fc2, ...).")] = None,
    control_draws: O.DrawsOpt = 20,
    seed: O.SeedOpt = 0,
    data: O.DataOpt = None,
    eval_data: O.EvalDataOpt = None,
    eval_samples: O.EvalSamplesOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    selection: Annotated[Path | None, typer.Option(
        "--selection", help="Where the candidates' selection goes (default: beside -o, *_candidates.h5).")] = None,
    controls_out: Annotated[Path | None, typer.Option(
        "--controls-out", help="Where the random controls' selection goes (default: beside -o, *_controls.h5).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results document here.")] = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    device_map: O.DeviceMapOpt = None,
    trust_remote_code: O.TrustOpt = False,
    allow_pickle: O.AllowPickleOpt = False,
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Find super weights (Yu et al. 2024) and prove them; print the results' path.

    One forward pass on --prompt: in each layer the largest |input| channel j and
    |output| channel i of the MLP down-projection give the candidate W[i, j]. Each
    candidate is zeroed alone against --control-draws random single weights.

    Examples:

      cwa superweights --model meta-llama/Llama-3.1-8B --json superweights.json

      cwa superweights --all-layers --control-draws 50 -o sw.h5
    """
    from cwa.console import set_verbose
    from cwa.super_weights import superweights_stage

    set_verbose(verbose)  # before the stage: --verbose shows every layer's spike, not only the candidates'
    lm = model_options(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle).load()
    d = data_options(data, eval_data, None, 32, eval_samples, seq_len, batch_size)
    r = superweights_stage(
        lm, d, prompt=prompt, spike_ratio=spike_ratio, spike_threshold=spike_threshold, all_layers=all_layers,
        module=module, draws=control_draws, seed=seed, output=out_path(output), selection_output=selection,
        controls_output=controls_out, json_path=json_out, force=force,
    )
    report(r, verbose)
