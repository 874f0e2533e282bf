"""The Python API: every stage as a function on objects, in memory by default.

    import cwa
    lm = cwa.load_model()                                   # embedded default model
    scores = cwa.score(lm, metric="grad_x_weight", calib_samples=8, seed=0)
    top = cwa.rank(scores, topk=100)
    rnd = cwa.control(scores, kind="random_k", ref=top, draws=5, seed=0)
    res = cwa.perturb(lm, [top, rnd], method="sign_flip", eval_samples=8)
    res.summary, res.to_pandas(), top.to_pandas()

These are the stages of the CLI (`cwa.stages`) called without an output path: the same
checks, fingerprints and computation, returning the result instead of a file name. Any
result saves to the artifact format (`.save(path)`) and reads back equal
(`open_scores`, `read_selection`, `read_results`, `read_stability`). Inputs may be
objects or artifact paths (`str` or `os.PathLike`). Errors are `cwa.errors` types:
`UsageError` for a bad request, `CwaError` for a run-time failure. See docs/api.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cwa import stages as _S
from cwa.artifacts import Results, Scores, Stability, read_results, read_selection, read_stability
from cwa.artifacts import open_scores as _open_scores
from cwa.comparison import Comparison, compare
from cwa.pipeline import RunConfig
from cwa.ranking import Selection
from cwa.stages import DataOptions, ModelOptions

PathLike = str | os.PathLike

__all__ = [
    "Comparison", "DataOptions", "ModelOptions", "Results", "RunConfig", "Scores", "Selection", "Stability",
    "compare", "control", "evaluate", "load_model", "open_scores", "perturb", "rank", "read_results",
    "read_selection", "read_stability", "run", "score", "stability", "superweights",
]


def load_model(
    model: PathLike | None = None,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """A model handle (`cwa.models.LoadedModel`): the embedded default model, a hub id,
    a local Hugging Face directory or a `.gguf` file. Weights load on first use; a
    second-order metric switches the model to eager attention when it needs to."""
    opts = ModelOptions(None if model is None else str(model), revision, dtype, device, device_map,
                        trust_remote_code, allow_pickle)
    return opts.load(lazy=True)


def _data(data: PathLike | None, eval_data: PathLike | None, calib_samples: int, eval_samples: int,
          seq_len: int | None, batch_size: int, data_seed: int | None, text_field: str | None = None) -> DataOptions:
    return DataOptions(None if data is None else str(data), None if eval_data is None else str(eval_data),
                       data_seed, calib_samples, eval_samples, seq_len, batch_size, text_field)


def score(
    lm,
    metric: str = "grad_x_weight",
    *,
    calib_samples: int = 32,
    seed: int = 0,
    data: PathLike | None = None,
    data_seed: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    mc_samples: int = 1,
    hutchinson_samples: int = 8,
    obd: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    score_dtype: str = "float32",
    grad_checkpointing: bool = False,
    text_field: str | None = None,
) -> Scores:
    """Score every weight of `lm` with `metric` on `calib_samples` windows of `data`
    (default: the embedded corpus; `text_field` the record field holding the text).
    Returns `Scores`."""
    d = _data(data, None, calib_samples, 32, seq_len, batch_size, data_seed, text_field)
    return _S.score_stage(
        lm, d, metric=metric, seed=seed, mc_samples=mc_samples, hutchinson_samples=hutchinson_samples,
        obd=obd, include=include, exclude=exclude, score_dtype=score_dtype,
        grad_checkpointing=grad_checkpointing,
    ).value


def rank(scores: Scores | PathLike, topk: int = 100, *, mode: str = "global", rank_by: str | None = None,
         lm=None) -> Selection:
    """The exact top-K of `scores` (`mode` global or per_layer; `rank_by` abs or value).
    Returns a `Selection` whose `doc["stats"]` holds the score statistics. `lm` gives
    `to_pandas()` its weight values (scores from `cwa.score` remember their model)."""
    return _S.rank_stage(scores, topk=topk, mode=mode, rank_by=rank_by, lm=lm).value


def control(
    scores: Scores | PathLike,
    kind: str = "random_k",
    *,
    ref: Selection | PathLike | None = None,
    topk: int | None = None,
    mode: str = "global",
    rank_by: str | None = None,
    draws: int = 20,
    seed: int = 0,
    lm=None,
) -> Selection:
    """A control for the top-K `ref` (or for the top-`topk` ranked here): random_k,
    bottom_k, layer_matched, magnitude_matched (needs `lm`, or scores that remember their
    model). Returns a `Selection` with `draws` draws (one for bottom_k)."""
    from cwa.controls import CONTROLS

    if lm is None and CONTROLS.get(CONTROLS.resolve(kind)).needs_weights:
        lm = getattr(_S.as_scores(scores), "model", None)
    return _S.control_stage(scores, kind=kind, topk=topk, mode=mode, rank_by=rank_by, ref=ref, draws=draws,
                            seed=seed, lm=lm).value


def perturb(
    lm,
    selections: list[Selection | PathLike],
    *,
    method: str = "sign_flip",
    scale: float | None = None,
    prob: float | None = None,
    bit: str | int | None = None,
    seed: int = 0,
    eval_samples: int = 32,
    eval_data: PathLike | None = None,
    data: PathLike | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    eval_tasks: str | list[str] | None = None,
    eval_tasks_path: PathLike | None = None,
    eval_tasks_limit: int | None = None,
    text_field: str | None = None,
    save_model: PathLike | None = None,
    condition: str | None = None,
) -> Results:
    """Perturb every draw of every selection, evaluate on `eval_samples` held-out windows,
    restore bit for bit. Returns `Results` (`.summary`, `.to_pandas()`). `eval_tasks`
    (lm-eval task names; needs `cwa[tasks]`) also evaluates them on the baseline and every
    condition, with local YAML tasks from `eval_tasks_path` (`Results.tasks`).
    `save_model` (a new directory) also writes condition `condition` (e.g. "topk",
    "random_k:3") as a Hugging Face checkpoint (`cwa perturb --save-model`)."""
    from cwa.checks import check_perturb_flags
    from cwa.tasks import task_eval

    # an option the method does not use is an error, as on the command line (prob and
    # bit: bit_flip only, default 1.0 / exponent_msb; scale: sign_flip and gauss_noise)
    prob, bit = check_perturb_flags(method, scale=scale, prob=prob, bit=bit)
    tasks = task_eval(eval_tasks, eval_tasks_path, eval_tasks_limit)
    d = _data(data, eval_data, 32, eval_samples, seq_len, batch_size, None, text_field)
    return _S.perturb_stage(lm, d, list(selections), method=method, scale=scale, prob=prob, bit=str(bit),
                            seed=seed, tasks=tasks, save_model=save_model, condition=condition).value


def evaluate(lm, *, eval_samples: int = 32, eval_data: PathLike | None = None, data: PathLike | None = None,
             seq_len: int | None = None, batch_size: int = 8, text_field: str | None = None) -> dict[str, Any]:
    """NLL, perplexity, token accuracy and bits per byte of the model as it is."""
    d = _data(data, eval_data, 32, eval_samples, seq_len, batch_size, None, text_field)
    return _S.eval_stage(lm, d).value


def stability(inputs: list[Scores | Selection | PathLike], topk: int | None = None, *,
              mode: str | None = None, rank_by: str | None = None) -> Stability:
    """Jaccard overlap (and Spearman, for scores) of the top-K sets of several seeds or
    metrics of one model. Returns `Stability`."""
    return _S.stability_stage(list(inputs), topk=topk, mode=mode, rank_by=rank_by).value


def run(config: RunConfig | None = None, **kwargs: Any) -> Path:
    """`cwa run`: every stage into an output directory; returns its path.
    `run(RunConfig(metric="magnitude", topk=[50, 100], seeds=[0]))` or
    `run(metric="magnitude", topk=100)`."""
    from cwa.pipeline import run as _run

    if config is None:
        config = RunConfig(**kwargs)
    elif kwargs:
        raise TypeError("give a RunConfig or keyword arguments, not both")
    return _run(config, argv=["cwa.run"])


def open_scores(path: PathLike) -> Scores:
    """A scores artifact, read lazily (one tensor at a time)."""
    return _open_scores(path)


def superweights(
    lm,
    *,
    prompt: str | None = None,
    spike_ratio: float | None = None,
    spike_threshold: float | None = None,
    all_layers: bool = False,
    module: str | None = None,
    control_draws: int = 20,
    seed: int = 0,
    eval_samples: int = 32,
    eval_data: PathLike | None = None,
    data: PathLike | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
):
    """Super weights (Yu et al. 2024): one forward pass on `prompt` finds a candidate
    W[i, j] per layer's MLP down-projection (largest |output| channel i, |input| channel
    j); those whose spike reaches `spike_ratio` × the layer's median |output| (or every
    layer, `all_layers`) are zeroed alone against `control_draws` random single weights.
    Returns `cwa.super_weights.SuperWeights` (`.candidates`, `.controls`, `.results`,
    `.table`, `.to_pandas()`)."""
    from cwa import super_weights as SW

    d = _data(data, eval_data, 32, eval_samples, seq_len, batch_size, None)
    return SW.superweights_stage(
        lm, d, prompt=SW.DEFAULT_PROMPT if prompt is None else prompt,
        spike_ratio=SW.DEFAULT_SPIKE_RATIO if spike_ratio is None else spike_ratio, spike_threshold=spike_threshold,
        all_layers=all_layers, module=module, draws=control_draws, seed=seed,
    ).value
