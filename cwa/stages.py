"""The stages, one function each: check the options, compute the fingerprint, return the
cached artifact when it matches, otherwise compute the result and, when asked, write it
atomically.

Every stage returns a `StageResult` whose `value` is the result as a Python object
(`cwa.artifacts.Scores`, `cwa.ranking.Selection`, `cwa.artifacts.Results`,
`cwa.artifacts.Stability`, or the evaluation's dict). `output=None` keeps the result in
memory (no file, no cache: what the Python API, `cwa.api`, does); `output=AUTO` writes it
under ./cwa-out/ by fingerprint and `output=PATH` to PATH (what the CLI, `cwa/commands/*`,
and `cwa run`, `cwa.pipeline`, do). One code path computes both.

Inputs are objects or paths alike: scores (`Scores` or a scores file), selections
(`Selection` or a selection file). No stage branches on a method's name: what a metric,
perturbation or control needs is read from its registry entry (`cwa.metrics.METRICS`,
`cwa.perturbation.PERTURBATIONS`, `cwa.controls.CONTROLS`), and every option is checked by
`cwa.checks`. The math lives in `cwa.metrics`, `cwa.ranking`, `cwa.controls`,
`cwa.perturbation`, `cwa.evaluation` and `cwa.stability_analysis`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa import __version__
from cwa import artifacts as A
from cwa import checks as C
from cwa.console import log, progress
from cwa.errors import ArtifactError, UsageError
from cwa.rng import RNG_VERSION

if TYPE_CHECKING:
    from cwa.models import LoadedModel

AUTO = "<auto>"  # `output=AUTO`: the default path under ./cwa-out/, named by fingerprint
PathLike = str | os.PathLike


@dataclass
class StageResult:
    """What a stage did: where its artifact is (None: in memory), its fingerprint,
    whether it was a cache hit, how long it took, and the result itself (`value`, read
    from the artifact on first access after a cache hit)."""

    path: Path | None
    fingerprint: str
    cached: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    _value: Any = field(default=None, repr=False)
    _load: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def value(self) -> Any:
        if self._value is None and self._load is not None:
            self._value = self._load()
        return self._value


@dataclass
class ModelOptions:
    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def load(self, *, second_order: bool = False, lazy: bool = True):
        from cwa.models import load_model

        return load_model(
            self.model,
            revision=self.revision,
            dtype=self.dtype,
            device=self.device,
            second_order=second_order,
            trust_remote_code=self.trust_remote_code,
            device_map=self.device_map,
            allow_pickle=self.allow_pickle,
            lazy=lazy,
        )


@dataclass
class DataOptions:
    data: str | None = None
    eval_data: str | None = None
    data_seed: int | None = None
    calib_samples: int = 32
    eval_samples: int = 32
    seq_len: int | None = None
    batch_size: int = 8
    text_field: str | None = None  # the record field that holds the text (default "text")

    def validate(self) -> None:
        C.check_positive("--batch-size", self.batch_size)
        C.check_positive("--calib-samples", self.calib_samples, "a positive number of windows")
        C.check_positive("--eval-samples", self.eval_samples, "a positive number of windows")
        if self.data_seed is not None:
            C.check_seed(self.data_seed, "--data-seed")

    def split(self, lm, *, seed: int, calib: bool, evaluation: bool):
        from cwa.data import prepare_data

        self.validate()
        return prepare_data(
            lm.tokenizer,
            lm.config,
            data=None if self.data is None else str(self.data),
            eval_data=None if self.eval_data is None else str(self.eval_data),
            seq_len=self.seq_len,
            calib_samples=self.calib_samples,
            eval_samples=self.eval_samples,
            data_seed=seed if self.data_seed is None else self.data_seed,
            need_calib=calib,
            need_eval=evaluation,
            text_field=self.text_field,
        )


# --------------------------------------------------------------------------- shared checks


def _done(path: Path | None, fp: str, cached: bool, t0: float, value: Any = None,
          load: Callable[[], Any] | None = None, **extra: Any) -> StageResult:
    return StageResult(None if path is None else Path(path), fp, cached, time.perf_counter() - t0, extra, value, load)


def _output(output: PathLike | None, stage: str, fp: str, ext: str) -> Path | None:
    """None (in memory), the default path (`AUTO`), or the given path, checked."""
    if output is None:
        return None
    return A.resolve_output(None if output == AUTO else output, stage, fp, ext)


def _label(obj: Any, what: str) -> str:
    return str(obj.path) if getattr(obj, "path", None) is not None else f"the {what} (in memory)"


def _check_model(lm: LoadedModel, want: str, what: str) -> None:
    """`what` was computed on `lm`: refused when its model fingerprint differs, and when it
    has none (foreign or unreadable provenance), since then nothing ties it to a model."""
    if not want:
        raise ArtifactError(
            f"{what}: records no model fingerprint (its provenance is missing or unreadable), "
            "so it cannot be checked against --model; recompute it with this version of cwa"
        )
    if lm.fingerprint != want:
        raise ArtifactError(
            f"{what}: was computed on another model (fingerprint {want[:12]}…, this model "
            f"{lm.fingerprint[:12]}…); pass the same --model"
        )


def _named_params(model) -> dict[str, Any]:
    return dict(model.named_parameters())


def _check_fits(sel, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every selected entry exists in its tensor, every tensor has the shape the selection
    was made for, and no draw is empty: a selection that is corrupt (but sealed) or made
    for other parameters is refused here, not deep inside a perturbation."""
    import math

    import numpy as np

    label = _label(sel, "selection")
    missing = [n for n in sel.params if n not in shapes]
    if missing:
        raise ArtifactError(f"{label}: names parameter {missing[0]!r} that {what} does not have")
    recorded = sel.provenance.get("shapes")
    if not isinstance(recorded, dict):
        raise ArtifactError(
            f"{label}: records no tensor shapes, so it cannot be checked against {what}; "
            "recompute it with this version of cwa"
        )
    for n in sel.params:
        if [int(x) for x in recorded.get(n, [-1])] != [int(x) for x in shapes[n]]:
            raise ArtifactError(
                f"{label}: tensor {n!r} has shape {tuple(recorded.get(n, ()))} in the selection "
                f"but {tuple(shapes[n])} in {what}; it was made for another model"
            )
    numel = np.array([math.prod(shapes[n]) for n in sel.params], dtype=np.int64)
    for d, draw in enumerate(sel.draws):
        if not len(draw.flat_index):
            raise ArtifactError(f"{label}: draw {d} selects no weights (file damaged or hand-made)")
        if bool((draw.flat_index >= numel[draw.param_index]).any()):
            raise ArtifactError(
                f"{label}: draw {d} selects entries past the end of their tensors in {what} "
                "(file corrupted, or made for other parameters)"
            )


def _check_scores_fit(sc, lm) -> None:
    """Every scored tensor exists in the model with the same shape (a CSV's coordinates
    come from the scores' shapes and its values from the model's tensors)."""
    named = _named_params(lm.model)
    label = _label(sc, "scores")
    for n in sc.names:
        if n not in named:
            raise ArtifactError(f"{label}: scores parameter {n!r}, which --model does not have")
        if tuple(named[n].shape) != tuple(sc.shape(n)):
            raise ArtifactError(
                f"{label}: tensor {n!r} has shape {tuple(sc.shape(n))} in the scores but "
                f"{tuple(named[n].shape)} in --model; they belong to different models"
            )


def _input_files(*, paths=(), lm=None, data=None) -> list[Path]:
    """The files a stage reads: artifacts, the local model's files, local data files."""
    out = [Path(p) for p in paths if p is not None]
    mp = _model_path(lm) if lm is not None else None
    if mp is not None and mp.exists():
        out += sorted(f for f in mp.iterdir() if f.is_file()) if mp.is_dir() else [mp]
    if data is not None:
        for d in (data.data, data.eval_data):
            if d and not str(d).startswith("hf:") and Path(d).exists():
                dp = Path(d)
                out += sorted(f for f in dp.rglob("*") if f.is_file()) if dp.is_dir() else [dp]
    return out


def _model_path(lm) -> Path | None:
    if lm.source in ("local", "gguf", "peft"):  # peft: the adapter directory
        return Path(lm.name)
    if lm.source == "embedded":
        from cwa.models import embedded_dir

        return embedded_dir()
    return None


def _file_id(p: Path):
    try:
        st = p.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return str(p.resolve())


def guard_outputs(outputs: dict[str, Path | None], inputs: list[Path]) -> None:
    """Before any work: every output can be written as a regular file
    (`artifacts.check_output`), none is an input of the same command (the same path, a
    symlink or a hard link of it), and no two outputs are one file. An output never
    replaces an input."""
    outs = {flag: Path(o) for flag, o in outputs.items() if o is not None}
    ins = {_file_id(Path(i)): Path(i) for i in inputs if Path(i).exists()}
    seen: dict[Any, str] = {}
    for flag, o in outs.items():
        fid = _file_id(o)
        if fid in ins:
            raise UsageError(
                f"{flag} {o}: is an input of this command ({ins[fid]}); writing there would "
                "destroy it — choose another path"
            )
        if fid in seen:
            raise UsageError(f"{flag} {o}: is also the {seen[fid]} output; give each output its own path")
        seen[fid] = flag
        A.check_output(o, flag)


def as_scores(scores: Any) -> A.Scores:
    """A `Scores` object, or a scores file opened lazily."""
    return scores if isinstance(scores, A.Scores) else A.open_scores(scores)


def as_selection(sel: Any):
    """A `Selection` object, or a selection file read."""
    from cwa.ranking import Selection

    return sel if isinstance(sel, Selection) else A.read_selection(sel)


def _paths_of(*objs: Any) -> list[Path]:
    return [Path(o.path) for o in objs if getattr(o, "path", None) is not None]


def _provenance(sc) -> dict[str, Any]:
    return {
        "scores": None if sc.path is None else str(sc.path),
        "scores_fingerprint": sc.fingerprint,
        "model": sc.meta.get("cwa.model"),
        "model_fingerprint": sc.model_fingerprint,
        "data_fingerprint": sc.meta.get("cwa.data_fingerprint"),
        "metric": sc.metric,
        "scores_seed": sc.meta.get("cwa.seed"),
        "shapes": {n: list(sc.shape(n)) for n in sc.names},
        "cwa_version": __version__,
    }


# --------------------------------------------------------------------------- score


@dataclass
class _ScorePlan:
    name: str
    cls: Any
    calib: Any
    opts: dict[str, Any]
    fingerprint: str
    mopts: Any


def _plan_score(lm, data: DataOptions, metric: str, seed: int, mc_samples: int, hutchinson_samples: int,
                obd: bool, include, exclude, score_dtype: str) -> _ScorePlan:
    """Check every option (before any work) and compute the fingerprint."""
    from cwa.metrics import METRICS, MetricOptions

    name = METRICS.resolve(metric)
    cls = METRICS.get(name)
    mopts = MetricOptions(seed=C.check_seed(seed), mc_samples=mc_samples,
                          hutchinson_samples=hutchinson_samples, obd=obd)
    mopts.validate()
    C.check_obd(obd, cls, METRICS)
    C.check_score_dtype(score_dtype, cls)
    calib = data.split(lm, seed=seed, calib=True, evaluation=False).calibration if cls.needs_data else None
    opts: dict[str, Any] = {"include": include or None, "exclude": exclude or None, "obd": obd,
                            "score_dtype": score_dtype}
    opts.update({o: getattr(mopts, o) for o in cls.options})
    if calib is not None:
        opts["data"] = calib.source
    data_fp = calib.fingerprint if calib is not None else "none"
    # The seed is always part of it: scores carry their seed (`cwa.seed`), and every
    # selection made from them compares its controls by that seed, so the artifact of
    # seed 0 must never stand in for seed 5, even where the numbers coincide (magnitude).
    # dtype: the model's load dtype changes the numbers (artifacts stay compatible: the model
    # fingerprint ignores it), so a float32 result never stands in for a bfloat16 run
    fp = A.stage_fingerprint("score", model=lm.fingerprint, dtype=lm.dtype, data=data_fp, metric=name, seed=seed, options=opts,
                             **({"rng": RNG_VERSION} if cls.stochastic else {}))
    return _ScorePlan(name, cls, calib, opts, fp, mopts)


def _compute_scores(lm, plan: _ScorePlan, data: DataOptions, include, exclude, dist, grad_checkpointing: bool):
    import contextlib

    from cwa.metrics import compute_scores, select_params

    if plan.cls.second_order:
        _eager_attention(lm)
    params = select_params(lm.model, include, exclude)
    run = {"batch_size": data.batch_size, "dist": dist if dist.enabled else None,
           "grad_checkpointing": grad_checkpointing}
    calib = plan.calib
    if calib is None:
        return compute_scores(lm.model, params, None, [], plan.name, plan.mopts, **run)
    mine = len(dist.shard(len(calib))) if dist.enabled else len(calib)
    quiet = contextlib.nullcontext(lambda n: None)  # only rank 0 draws a progress bar
    if dist.is_main:
        lm.note_slow_dtype()
    with progress(f"score {plan.name}", mine) if dist.is_main else quiet as adv:
        done = [0]

        def advance(n_done: int) -> None:  # compute_scores reports a running total
            adv(n_done - done[0])
            done[0] = n_done

        return compute_scores(lm.model, params, calib.ids, calib.indices, plan.name, plan.mopts,
                              progress=advance, **run)


SPACE_FIXES = "use --score-dtype bfloat16 (half the size), fewer --seeds, fewer weights (--include/--exclude) or another output directory"


def scores_bytes(lm: LoadedModel, include=None, exclude=None, score_dtype: str = "float32") -> int:
    """The size of the scores artifact of `lm`'s scored weights (data plus a header
    margin), known before any computation."""
    from cwa.metrics import select_params

    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[score_dtype]
    params = select_params(lm.model, include, exclude)
    n = sum(p.numel() for p in params.values())
    return n * itemsize + 64 * len(params) * 8 + (1 << 16)


def _eager_attention(lm) -> None:
    """Double backward does not run through fused attention kernels: a model loaded
    without `second_order` (the Python API's default) is switched to eager attention."""
    m = lm.model
    if getattr(m.config, "_attn_implementation", "eager") in (None, "eager"):
        return
    try:
        m.set_attn_implementation("eager")
    except (AttributeError, ValueError) as e:
        raise UsageError(f"a second-order metric needs eager attention, and this model cannot switch ({e}); "
                         "load it with second_order=True") from None
    log("note: attention switched to eager (a second-order metric needs double backward)", verbose_only=True)


def _score_meta(lm, plan: _ScorePlan, seed: int, dist, notes: list[str]) -> dict[str, str]:
    calib = plan.calib
    return {
        "cwa.metric": plan.name,
        "cwa.model": lm.name,
        "cwa.model_fingerprint": lm.fingerprint,
        "cwa.model_dtype": lm.dtype,
        "cwa.data_fingerprint": calib.fingerprint if calib is not None else "none",
        "cwa.fingerprint": plan.fingerprint,
        "cwa.seed": str(seed),
        "cwa.n_windows": str(len(calib) if calib is not None else 0),
        "cwa.seq_len": str(calib.seq_len if calib is not None else 0),
        "cwa.windows": json.dumps(calib.indices if calib is not None else []),
        "cwa.world_size": str(dist.world_size if dist.enabled else 1),
        "cwa.options": json.dumps({**plan.opts, "signed": bool(plan.cls.signed), "notes": notes}),
        "cwa.score_dtype": plan.opts["score_dtype"],
        **({"cwa.rng_version": str(RNG_VERSION)} if plan.cls.stochastic else {}),
    }


def score_stage(
    lm: LoadedModel,
    data: DataOptions,
    *,
    metric: str,
    seed: int = 0,
    mc_samples: int = 1,
    hutchinson_samples: int = 8,
    obd: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    score_dtype: str = "float32",
    output: PathLike | None = None,
    force: bool = False,
    grad_checkpointing: bool = False,
    dist=None,
) -> StageResult:
    """Score every selected weight (see `cwa.metrics`); value: `Scores`.

    `dist` (a `cwa.distributed.Dist`, e.g. from `cwa.distributed.session()` under
    torchrun): each rank scores its shard of the calibration windows and the
    accumulators are all-reduced; rank 0 decides the cache hit for everyone, writes the
    artifact and logs; the other ranks wait for it and return the same path without
    writing. `grad_checkpointing` trades one more forward pass for activation memory;
    like the batch size it does not change the result and is not in the fingerprint.
    """
    import torch

    from cwa.distributed import Dist

    t0 = time.perf_counter()
    dist = dist if dist is not None else Dist()
    plan = _plan_score(lm, data, metric, seed, mc_samples, hutchinson_samples, obd, include, exclude, score_dtype)
    fp = plan.fingerprint
    out = _output(output, "scores", fp, ".safetensors")
    if out is not None:
        guard_outputs({"-o": out}, _input_files(lm=lm, data=data))
        hit = not force and dist.is_main and A.cached(out, fp, A.scores_fingerprint_of)
        if dist.broadcast_flag(hit):  # every rank takes rank 0's branch
            return _done(out, fp, True, t0, load=lambda: A.open_scores(out))
    if out is not None and dist.is_main:
        A.check_free_space(out, scores_bytes(lm, include, exclude, score_dtype), f"-o {out}", SPACE_FIXES)
    tensors, notes = _compute_scores(lm, plan, data, include, exclude, dist, grad_checkpointing)
    if dist.is_main:
        for n in notes:
            log(f"note: {n}")
    stored = getattr(torch, score_dtype)  # in memory as they will be stored (a save round-trips)
    tensors = {n: t.to(stored).to(torch.float32) for n, t in tensors.items()} if score_dtype != "float32" else tensors
    scores = A.Scores(tensors, _score_meta(lm, plan, seed, dist, notes))
    scores.model = lm
    if out is None:
        return _done(None, fp, False, t0, scores)
    if not dist.is_main:
        dist.barrier()  # returns once rank 0 has written the artifact
        return _done(out, fp, False, t0, load=lambda: A.open_scores(out), rank=dist.rank)
    try:
        scores.path = scores.save(out)
    finally:
        dist.barrier()
    return _done(out, fp, False, t0, scores)


# --------------------------------------------------------------------------- rank


def rank_stage(
    scores: Any,
    *,
    topk: int,
    mode: str = "global",
    rank_by: str | None = None,
    output: PathLike | None = None,
    csv: PathLike | None = None,
    stats: PathLike | None = None,
    lm: LoadedModel | None = None,
    force: bool = False,
) -> StageResult:
    """The exact top-K of the scores (see `cwa.ranking`) with their statistics; value:
    a `Selection` (kind topk) whose `doc["stats"]` holds the statistics and `arrays` the
    histograms. `csv` writes top_weights.csv (values from `lm`), `stats` the statistics."""
    from cwa.ranking import rank_with_stats

    t0 = time.perf_counter()
    C.check_topk(topk)
    C.check_mode(mode)
    rank_by = C.check_rank_by(rank_by)
    sc = as_scores(scores)
    seed = sc.seed
    if lm is not None:
        _check_model(lm, sc.model_fingerprint, _label(sc, "scores"))
    fp = A.stage_fingerprint("rank", scores=sc.fingerprint, seed=seed, k=topk, mode=mode, rank_by=rank_by)
    out = _output(output, "topk", fp, ".h5")
    csv, stats = (None if p is None else Path(p) for p in (csv, stats))
    guard_outputs({"-o": out, "--csv": csv, "--stats": stats}, _paths_of(sc))
    if lm is not None and csv is not None:
        _check_scores_fit(sc, lm)
    if out is not None and not force and A.cached(out, fp, A.h5_fingerprint_of) and (
        csv is None or csv.exists()) and (stats is None or stats.exists()):
        return _done(out, fp, True, t0, load=lambda: A.read_selection(out))
    sel, st, hist = rank_with_stats(sc, topk, mode=mode, rank_by=rank_by, seed=seed)
    sel.fingerprint, sel.provenance, sel.doc = fp, _provenance(sc), {"stats": st}
    sel.arrays = {f"stats/{k}": v for k, v in hist.items() if v is not None}
    sel.model = lm if lm is not None else sc.model
    if out is not None:
        sel.save(out)
    if csv is not None:
        A.write_topk_csv(csv, sel, lm)
    if stats is not None:
        A.write_json(stats, {"metric": sc.metric, "scores": str(sc.path), **st})
    if sel.ties_at_k > 1:
        log(f"note: {sel.ties_at_k} entries tie with the K-th score", verbose_only=True)
    return _done(out, fp, False, t0, sel)


# --------------------------------------------------------------------------- control


def _control_ref(sc, ref: Any, topk: int | None, mode: str, rank_by: str | None):
    """(reference selection or None, its fingerprint, K, mode, rank_by)."""
    if ref is None:
        if topk is None:
            raise UsageError("cwa control needs --topk K or --ref TOPK.h5")
        return None, None, C.check_topk(topk), C.check_mode(mode), C.check_rank_by(rank_by)
    ref_sel = as_selection(ref)
    label = f"--ref {_label(ref_sel, 'reference selection')}"
    if ref_sel.kind != "topk":
        raise UsageError(f"{label}: is a {ref_sel.kind} selection, expected a top-K selection")
    if ref_sel.provenance.get("scores_fingerprint") not in (None, sc.fingerprint):
        raise ArtifactError(f"{label}: was ranked from other scores than {_label(sc, 'scores')}")
    _check_fits(ref_sel, {n: sc.shape(n) for n in sc.names}, _label(sc, "scores"))
    return ref_sel, ref_sel.fingerprint, ref_sel.k, ref_sel.mode, ref_sel.rank_by


def control_stage(
    scores: Any,
    *,
    kind: str,
    topk: int | None = None,
    mode: str = "global",
    rank_by: str | None = None,
    ref: Any = None,
    draws: int = 20,
    seed: int = 0,
    lm: LoadedModel | None = None,
    output: PathLike | None = None,
    force: bool = False,
) -> StageResult:
    """A control selection for the top-K (see `cwa.controls`); value: a `Selection`.
    `ref` is the top-K (object or file); without it the top-K is ranked here from
    `topk`, `mode`, `rank_by`."""
    from cwa.controls import CONTROLS, make_control
    from cwa.ranking import topk as rank_topk

    t0 = time.perf_counter()
    kind = CONTROLS.resolve(kind)
    ctl = CONTROLS.get(kind)
    C.check_draws(draws)
    C.check_seed(seed)
    sc = as_scores(scores)
    ref_sel, ref_fp, topk, mode, rank_by = _control_ref(sc, ref, topk, mode, rank_by)
    if ctl.needs_weights and lm is None:
        raise UsageError(f"--kind {kind} needs --model (it reads the model's weights)")
    if lm is not None:
        _check_model(lm, sc.model_fingerprint, _label(sc, "scores"))
    fp = A.stage_fingerprint(
        "control", scores=sc.fingerprint, kind=kind, scores_seed=sc.seed, k=topk, mode=mode, rank_by=rank_by,
        ref=ref_fp, draws=draws if ctl.stochastic else None, seed=seed if ctl.stochastic else None,
        **({"rng": RNG_VERSION} if ctl.stochastic else {}),
        model=lm.fingerprint if ctl.needs_weights else None,
        **({"dtype": lm.dtype} if ctl.needs_weights else {}),
    )
    out = _output(output, kind, fp, ".h5")
    guard_outputs({"-o": out}, _paths_of(sc, *([ref_sel] if ref_sel is not None else [])))
    if out is not None and not force and A.cached(out, fp, A.h5_fingerprint_of):
        return _done(out, fp, True, t0, load=lambda: A.read_selection(out))
    if ref_sel is None:
        ref_sel = rank_topk(sc, topk, mode=mode, rank_by=rank_by, seed=sc.seed)
    weights = None
    if ctl.needs_weights:
        _check_scores_fit(sc, lm)
        named = _named_params(lm.model)
        weights = {n: named[n].detach() for n in sc.names}
    sel = make_control(kind, sc, ref_sel, draws=draws, seed=seed, weights=weights)
    # The selection's seed is the experiment's (its scores'); the draws' own seed is info.
    sel.seed = sc.seed
    sel.info["draw_seed"] = int(seed) if ctl.stochastic else None
    _warn_fallback(sel, out)
    sel.fingerprint, sel.provenance = fp, _provenance(sc)
    sel.provenance["ref"] = None if ref is None else str(getattr(ref_sel, "path", None) or ref_fp)
    sel.model = lm if lm is not None else sc.model
    if out is not None:
        sel.save(out)
    return _done(out, fp, False, t0, sel)


def _warn_fallback(sel, out: Path | None) -> None:
    """Say so when a control's achieved match is poor (its info reports `n_fallback`:
    partners drawn outside the top-K weight's own |w| bin)."""
    fb, size = sel.info.get("n_fallback"), len(sel.draws[0].flat_index) if sel.draws else 0
    if fb and size and fb / size > 0.10:
        q = (sel.info.get("achieved_match") or {}).get("ratio_quantiles", {})
        log(
            f"warning: {sel.kind} ({out or 'in memory'}): {fb} of {size} partners ({fb / size:.0%}) come "
            f"from other |w| bins (median |w| ratio partner/top-K {q.get('0.5', float('nan')):.3g}); "
            "the control is not well matched"
        )


# --------------------------------------------------------------------------- perturb


def check_perturb_options(method: str, scale: float | None, prob: float, bit: str, dtype: str | None = None):
    """Validate the perturbation flags before any work (`cwa run` calls this up front, so
    a bad value never costs a scoring pass); returns (method, scale, bit) resolved.
    With `dtype` (the name the model is loaded in), a `--bit` index is checked against
    that dtype's width too (bit 20 exists in float32, not in bfloat16)."""
    from cwa.perturbation import PERTURBATIONS

    method = PERTURBATIONS.resolve(method)
    pert = PERTURBATIONS.get(method)
    scale = C.check_scale(pert.default_scale if scale is None else scale)
    C.check_prob(prob)
    bit = C.check_bit(bit)
    if "bit" in pert.uses and dtype is not None:
        import torch

        from cwa.perturbation import resolve_bit

        try:
            resolve_bit(bit, getattr(torch, dtype))
        except UsageError as e:
            raise UsageError(f"{str(e).rstrip('.')} (the model is loaded in {dtype}; see --dtype)") from None
    return method, scale, bit


@dataclass
class _PerturbPlan:
    method: str
    pert: Any
    options: dict[str, Any]  # the options that change the result (registry: `uses`)
    scale: float | None
    prob: float
    bit: Any
    seed: int


def _plan_perturb(lm, method, scale, prob, bit, seed) -> _PerturbPlan:
    from cwa.perturbation import PERTURBATIONS

    method, scale, bit = check_perturb_options(method, scale, prob, bit, dtype=lm.dtype)
    pert = PERTURBATIONS.get(method)
    given = {"scale": scale, "prob": prob, "bit": bit, "seed": C.check_seed(seed)}
    return _PerturbPlan(method, pert, {k: given[k] for k in pert.uses}, scale, prob, bit, seed)


def _condition(plan: _PerturbPlan, sel, si: int, d: int, draw, rec, m: dict, base: dict) -> dict[str, Any]:
    """One condition's record in perturbation_results.json."""
    return {
        "name": sel.kind, "selection": si, "seed": sel.seed, "draw": d, "k": sel.k, "mode": sel.mode,
        "n_selected": int(len(draw.flat_index)), "method": plan.method, "scale": plan.scale,
        "prob": plan.options.get("prob"), "bit": plan.options.get("bit"),
        "n_changed": int(rec.n_changed), "delta_w_norm": float(rec.delta_w_norm),
        "nll": m["nll"], "perplexity": m["perplexity"], "token_accuracy": m["token_accuracy"],
        "bits_per_byte": m["bits_per_byte"], "delta_nll": m["nll"] - base["nll"],
        "kl_from_baseline": m["kl_from_baseline"], "top1_agreement": m["top1_agreement"],
        "restored": bool(rec.restored),
    }


def _run_conditions(lm, ev, sels: list, plan: _PerturbPlan, batch_size: int, tasks=None):
    """Evaluate the baseline, then every draw of every selection perturbed and restored.
    Returns (baseline metrics, conditions, arrays, per-window NLL [conditions, windows]).
    `tasks` (a `cwa.tasks.TaskRunner`) also evaluates lm-eval tasks on the baseline and on
    every condition, inside the same perturbed window (`tasks` in their records)."""
    import numpy as np

    from cwa.evaluation import evaluate
    from cwa.perturbation import perturbed

    named = _named_params(lm.model)
    arrays: dict[str, Any] = {}
    conditions: list[dict[str, Any]] = []
    per_window: list[Any] = []
    n_cond = sum(len(s.draws) for s in sels)
    lm.note_slow_dtype()
    with progress("perturb", (n_cond + 1) * len(ev)) as adv:
        base = evaluate(lm.model, ev, batch_size=batch_size, keep_baseline=True, progress=adv)
        try:
            if tasks is not None:  # inside the try: a failing task still frees the kept baseline
                base.metrics["tasks"] = tasks()
            arrays["baseline/per_window_nll"] = base.per_window_nll
            for si, sel in enumerate(sels):
                params = [named[n] for n in sel.params]
                for d, draw in enumerate(sel.draws):
                    # Each condition gets its own noise stream (index = its position in this
                    # stage), so the top-K and a control never share noise values.
                    with perturbed(params, draw, plan.method, scale=plan.scale, prob=plan.prob, bit=plan.bit,
                                   seed=plan.seed, draw_index=len(conditions)) as rec:
                        res = evaluate(lm.model, ev, batch_size=batch_size, baseline=base.baseline, progress=adv)
                        task_metrics = tasks() if tasks is not None else None
                    i = len(conditions)
                    conditions.append(_condition(plan, sel, si, d, draw, rec, res.metrics, base.metrics))
                    if task_metrics is not None:
                        conditions[-1]["tasks"] = task_metrics
                    arrays[f"conditions/{i}/per_window_nll"] = res.per_window_nll
                    per_window.append(res.per_window_nll)
                    if getattr(rec, "bits", None) is not None:
                        arrays[f"conditions/{i}/bits"] = np.asarray(rec.bits)
        finally:
            if base.baseline is not None:
                base.baseline.close()
    if not all(c["restored"] for c in conditions):
        raise ArtifactError("a perturbation was not restored bit for bit; results discarded")
    return base, conditions, arrays, np.asarray(per_window).reshape(len(conditions), len(ev))


def _results(lm, ev, sels, plan, fp, base, conditions, arrays, per_window) -> A.Results:
    import numpy as np

    from cwa.perturbation import summarize

    names = [_label(s, "selection") for s in sels]
    summary = summarize(conditions, {"baseline": base.per_window_nll, "conditions": per_window})
    doc = {
        "baseline": {k: base.metrics[k] for k in ("nll", "perplexity", "token_accuracy", "bits_per_byte", "n_tokens",
                                                   "tasks") if k in base.metrics},
        "conditions": conditions, "summary": summary, "metric": sels[0].metric, "model": lm.name,
        "model_fingerprint": lm.fingerprint, "eval_data": ev.source, "eval_windows": ev.indices,
        "selections": names,
    }
    arrays["eval_windows"] = np.asarray(ev.indices, dtype=np.int64)
    attrs = {
        "fingerprint": fp, "method": plan.method, "model_fingerprint": lm.fingerprint,
        "data_fingerprint": ev.fingerprint, "seed": plan.seed,
        "provenance": {"selections": names, "model": lm.name},
    }
    return A.Results(doc=doc, arrays=arrays, attrs=attrs)


def perturb_stage(
    lm: LoadedModel,
    data: DataOptions,
    selections: list[Any],
    *,
    method: str,
    scale: float | None = None,
    prob: float = 1.0,
    bit: str = "exponent_msb",
    seed: int = 0,
    output: PathLike | None = None,
    json_path: PathLike | None = None,
    force: bool = False,
    save_model: PathLike | None = None,
    condition: str | None = None,
    tasks: Any = None,
) -> StageResult:
    """Perturb every draw of every selection (objects or files), evaluate, restore bit
    for bit (see `cwa.perturbation`, `cwa.evaluation`); value: `Results`. `save_model`
    (a new directory) also writes condition `condition` as a Hugging Face checkpoint
    (`cwa.export`), recorded in the results under `saved_models`. `tasks` (a
    `cwa.tasks.TaskEval`) also evaluates lm-eval tasks on the baseline and every condition
    (`tasks` in their records, `task_eval` in the results)."""
    from cwa.evaluation import EVAL_VERSION

    t0 = time.perf_counter()
    plan = _plan_perturb(lm, method, scale, prob, bit, seed)
    if not selections:
        raise UsageError("cwa perturb needs at least one selection artifact")
    sels = [as_selection(s) for s in selections]
    for sel in sels:
        _check_model(lm, sel.provenance.get("model_fingerprint", ""), _label(sel, "selection"))
    ev = data.split(lm, seed=seed, calib=False, evaluation=True).evaluation
    fp = A.stage_fingerprint("perturb", selections=[s.fingerprint for s in sels], model=lm.fingerprint,
                             dtype=lm.dtype, data=ev.fingerprint, method=plan.method, **_perturb_fp_options(plan),
                             version=EVAL_VERSION, **({} if tasks is None else {"tasks": tasks.fingerprint(plan.seed)}))
    out = _output(output, "perturb", fp, ".h5")
    json_path = None if json_path is None else Path(json_path)
    guard_outputs({"-o": out, "--json": json_path}, _input_files(paths=_paths_of(*sels), lm=lm, data=data))
    export = _plan_export(lm, sels, save_model, condition, (out, json_path))
    if out is not None and not force and A.cached(out, fp, A.h5_fingerprint_of):
        res = A.read_results(out)
        if export is not None:  # the cached condition is saved now, and recorded in the results
            _save_condition(lm, sels, plan, res, export, out)
            res.save(out)
        if json_path is not None:  # cheap, and never leaves a stale JSON beside a cache hit
            A.write_json(json_path, res.doc)
        _log_tasks(res)
        return _done(out, fp, True, t0, res)
    shapes = {n: tuple(p.shape) for n, p in _named_params(lm.model).items()}
    for sel in sels:  # before any evaluation (not on a cache hit: no model load)
        _check_fits(sel, shapes, "the model")
    runner = None if tasks is None else tasks.runner(lm, batch_size=data.batch_size, seed=plan.seed)
    res = _results(lm, ev, sels, plan, fp, *_run_conditions(lm, ev, sels, plan, data.batch_size, runner))
    if runner is not None:
        from cwa.tasks import attach

        attach(res.doc, tasks, runner, plan.seed)
    if export is not None:
        _save_condition(lm, sels, plan, res, export, out)
    if out is not None:
        res.save(out, json_path)
    elif json_path is not None:
        A.write_json(json_path, res.doc)
    _log_tasks(res)
    return _done(out, fp, False, t0, res)


def _log_tasks(res) -> None:
    """The lm-eval task table on stderr, when the results have one (`cwa.tasks.table`)."""
    if (res.doc.get("baseline") or {}).get("tasks"):
        from cwa.tasks import table

        for line in table(res.doc):
            log(line)


def _plan_export(lm, sels, save_model, condition, outputs):
    """`--save-model DIR --condition NAME`, checked before any work (`cwa.export`)."""
    from cwa.export import plan_export

    return plan_export(lm, sels, save_model, condition, outputs)


def _save_condition(lm, sels, plan: _PerturbPlan, res, export, out) -> None:
    """Write the chosen condition's weights as a Hugging Face checkpoint (`cwa.export`)."""
    from cwa.export import save_condition

    shapes = {n: tuple(p.shape) for n, p in _named_params(lm.model).items()}
    for sel in sels:
        _check_fits(sel, shapes, "the model")
    save_condition(lm, sels, plan, res, export, results_path=out)


def _perturb_fp_options(plan: _PerturbPlan) -> dict[str, Any]:
    """Fingerprint parts: every option the method uses, None for the others (so the
    fingerprint of a method does not depend on options it ignores)."""
    fp = {k: plan.options.get(k) for k in ("scale", "prob", "bit", "seed")}
    if "seed" in plan.pert.uses:
        fp["rng"] = RNG_VERSION
    return fp


# --------------------------------------------------------------------------- eval


def eval_stage(
    lm: LoadedModel,
    data: DataOptions,
    *,
    output: PathLike | None = None,
    force: bool = False,
) -> StageResult:
    """NLL, perplexity, token accuracy and bits per byte of the unperturbed model on
    the evaluation windows; value: the eval.json document (a dict)."""
    from cwa.evaluation import EVAL_VERSION, evaluate

    t0 = time.perf_counter()
    ev = data.split(lm, seed=0, calib=False, evaluation=True).evaluation
    fp = A.stage_fingerprint("eval", model=lm.fingerprint, dtype=lm.dtype, data=ev.fingerprint, version=EVAL_VERSION)
    out = None if output is None else Path(output) if output != AUTO else A.default_output("eval", fp, ".json")
    guard_outputs({"-o": out}, _input_files(lm=lm, data=data))
    if out is not None and not force and out.exists():
        try:
            doc = json.loads(out.read_text())
            if doc.get("fingerprint") == fp:
                return _done(out, fp, True, t0, doc, metrics={k: doc.get(k) for k in ("nll", "perplexity")})
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    lm.note_slow_dtype()
    with progress("eval", len(ev)) as adv:
        res = evaluate(lm.model, ev, batch_size=data.batch_size, progress=adv)
    doc = {
        **res.metrics, "model": lm.name, "model_fingerprint": lm.fingerprint, "dtype": lm.dtype,
        "eval_data": ev.source, "seq_len": ev.seq_len, "eval_windows": ev.indices,
        "data_fingerprint": ev.fingerprint, "fingerprint": fp, "cwa_version": __version__,
        "created": A.now_iso(),
    }
    if out is not None:
        A.write_json(out, doc)
    return _done(out, fp, False, t0, doc, metrics=res.metrics)


# --------------------------------------------------------------------------- stability


def stability_stage(
    inputs: list[Any],
    *,
    topk: int | None,
    rank_by: str | None = None,
    mode: str | None = None,
    output: PathLike | None = None,
    json_path: PathLike | None = None,
    force: bool = False,
) -> StageResult:
    """Compare the top-K sets of several scores (or selections) of one model, objects or
    files; value: `Stability`.

    `topk` is required for scores and must be None or equal to the selections' K for
    selections; `mode` defaults to global for scores and to the selections' mode for
    selections. The result's `extra` holds `mean_jaccard`, `random_jaccard` and
    `mean_spearman`.
    """
    from cwa import stability_analysis as S

    t0 = time.perf_counter()
    plan = S.plan(list(inputs), topk=topk, mode=mode, rank_by=rank_by)
    fp = A.stage_fingerprint("stability", inputs=plan.fingerprints, labels=[str(x) for x in plan.labels],
                             k=plan.k, mode=plan.mode, rank_by=plan.rank_by, version=S.ANALYSIS_VERSION)
    out = _output(output, "stability", fp, ".h5")
    json_path = None if json_path is None else Path(json_path)
    guard_outputs({"-o": out, "--json": json_path}, [i.path for i in plan.inputs if i.on_disk])
    if out is not None and not force and A.cached(out, fp, A.h5_fingerprint_of):
        st = A.read_stability(out)
        if json_path is not None:  # cheap, and never leaves a stale JSON beside a cache hit
            A.write_json(json_path, st.doc)
        return _stability_result(out, fp, True, t0, st)
    res = S.analyze(plan)
    attrs = {
        "fingerprint": fp, "k": plan.k, "mode": plan.mode, "rank_by": plan.rank_by, "kind": plan.kind,
        "input": plan.input_kind, "metric": res.doc.get("metric") or "", "model_fingerprint": plan.model_fingerprint,
        "provenance": {"inputs": [str(i.path) for i in plan.inputs], "fingerprints": plan.fingerprints},
    }
    st = A.Stability(doc=res.doc, arrays=res.arrays, attrs=attrs)
    if out is not None:
        st.save(out, json_path)
    elif json_path is not None:
        A.write_json(json_path, st.doc)
    return _stability_result(out, fp, False, t0, st)


def _stability_result(out: Path | None, fp: str, cached: bool, t0: float, st: A.Stability) -> StageResult:
    extra = {k: st.doc.get(k) for k in ("mean_jaccard", "random_jaccard", "mean_spearman")}
    return _done(out, fp, cached, t0, st, **extra)
