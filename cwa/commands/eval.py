"""`cwa eval`: baseline metrics of a model on evaluation windows."""

from __future__ import annotations

from cwa.commands import _options as O
from cwa.commands.common import data_options, model_options, out_path, report


def eval_cmd(
    model: O.ModelOpt = None,
    revision: O.RevisionOpt = None,
    dtype: O.DtypeOpt = "auto",
    device: O.DeviceOpt = "auto",
    trust_remote_code: O.TrustOpt = False,
    allow_pickle: O.AllowPickleOpt = False,
    data: O.DataOpt = None,
    eval_data: O.EvalDataOpt = None,
    text_field: O.TextFieldOpt = None,
    eval_samples: O.EvalSamplesOpt = 32,
    seq_len: O.SeqLenOpt = None,
    batch_size: O.BatchOpt = 8,
    output: O.OutputOpt = None,
    force: O.ForceOpt = False,
    verbose: O.VerboseOpt = False,
) -> None:
    """Evaluate a model: NLL, perplexity, token accuracy and bits per byte on held-out windows.

    Writes a JSON report and prints its path.

    Examples:

      cwa eval                                   # the embedded model on the embedded corpus

      cwa eval --model gpt2 --eval-data notes.txt --seq-len 512 -o gpt2_eval.json
    """
    from cwa.console import set_verbose
    from cwa.stages import eval_stage

    set_verbose(verbose)  # before loading: --verbose also shows the libraries' own progress bars
    lm = model_options(model, revision, dtype, device, None, trust_remote_code, allow_pickle).load()
    d = data_options(data, eval_data, None, 32, eval_samples, seq_len, batch_size)
    d.text_field = text_field
    report(eval_stage(lm, d, output=out_path(output), force=force), verbose)
