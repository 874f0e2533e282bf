"""`cwa score`: one sensitivity score per weight, written as a scores `.safetensors`."""

from __future__ import annotations

from typing import Annotated

import typer

from cwa.commands import _options as O
from cwa.commands.common import data_options, model_options, out_path, report


def score_cmd(
    model: O.ModelOpt = None,
    revision: O.RevisionOpt = None,
    metric: O.MetricOpt = "grad_x_weight",
    seed: O.SeedOpt = 0,
    data: O.DataOpt = None,
    text_field: O.TextFieldOpt = None,
    data_seed: O.DataSeedOpt = None,
    calib_samples: O.CalibOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    mc_samples: O.McOpt = 1,
    hutchinson_samples: O.HutchOpt = 8,
    obd: Annotated[bool, typer.Option("--obd", help="Optimal Brain Damage saliency 1/2*c*w^2 (curvature metrics).")] = False,
    include: O.IncludeOpt = None,
    exclude: O.ExcludeOpt = None,
    score_dtype: O.ScoreDtypeOpt = "float32",
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    device_map: O.DeviceMapOpt = None,
    trust_remote_code: O.TrustOpt = False,
    allow_pickle: O.AllowPickleOpt = False,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing/--no-grad-checkpointing",
            help="Recompute block activations in the backward pass: less memory, ~1 more forward; same scores.",
        ),
    ] = False,
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Score every weight with a sensitivity metric; print the scores artifact's path.

    Examples:

      cwa score --metric grad_x_weight

      cwa score --model gpt2 --metric hutchinson_diag --hutchinson-samples 16 -o hutch.safetensors

      cwa score --metric act_mag --include 'transformer.h.*' | cwa rank - --topk 100

      torchrun --nproc-per-node 4 -m cwa score --model gpt2 --metric hutchinson_diag -o h.safetensors
    """
    from cwa import distributed
    from cwa.console import set_verbose
    from cwa.metrics import METRICS
    from cwa.stages import score_stage

    set_verbose(verbose)  # before loading: --verbose also shows the libraries' own progress bars

    name = METRICS.resolve(metric)
    second = bool(getattr(METRICS.get(name), "second_order", False))
    # Under torchrun each rank scores a shard of the windows; without it this is a no-op.
    with distributed.session(device) as dist:
        if dist.backend == "nccl" and not device_map and device in ("auto", "cuda"):
            device = dist.device  # one GPU per rank: cuda:LOCAL_RANK
        lm = model_options(model, revision, dtype, device, device_map, trust_remote_code, allow_pickle).load(second_order=second)
        d = data_options(data, None, data_seed, calib_samples, 32, seq_len, batch_size)
        d.text_field = text_field
        r = score_stage(
            lm, d, metric=name, seed=seed, mc_samples=mc_samples, hutchinson_samples=hutchinson_samples,
            obd=obd, include=include, exclude=exclude, score_dtype=score_dtype, output=out_path(output), force=force,
            grad_checkpointing=grad_checkpointing, dist=dist,
        )
    if dist.is_main:  # one path on stdout, from rank 0 only
        report(r, verbose)
