"""The stages, one function each: read inputs, compute the fingerprint, return the cached
artifact when it matches, otherwise compute and write it atomically.

`cwa/commands/*` parse flags and call these; `cwa.pipeline` (`cwa run`) calls them in
order with one loaded model. The math lives in `cwa.metrics`, `cwa.ranking`,
`cwa.controls`, `cwa.perturb`, `cwa.evaluate` and `cwa.stability`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa import artifacts as A
from cwa.console import log, progress
from cwa.errors import ArtifactError, UsageError
from cwa.registry import check_choice


@dataclass
class StageResult:
    path: Path
    fingerprint: str
    cached: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


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

    def validate(self) -> None:
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size {self.batch_size}: must be a positive integer")
        if self.calib_samples <= 0:
            raise UsageError(f"--calib-samples {self.calib_samples}: must be a positive number of windows")
        if self.eval_samples <= 0:
            raise UsageError(f"--eval-samples {self.eval_samples}: must be a positive number of windows")

    def split(self, lm, *, seed: int, calib: bool, evaluation: bool):
        from cwa.data import prepare_data

        self.validate()
        return prepare_data(
            lm.tokenizer,
            lm.config,
            data=self.data,
            eval_data=self.eval_data,
            seq_len=self.seq_len,
            calib_samples=self.calib_samples,
            eval_samples=self.eval_samples,
            data_seed=seed if self.data_seed is None else self.data_seed,
            need_calib=calib,
            need_eval=evaluation,
        )


def _done(path: Path, fp: str, cached: bool, t0: float, **extra: Any) -> StageResult:
    return StageResult(Path(path), fp, cached, time.perf_counter() - t0, extra)


def _check_model(lm, want: str, what: Path) -> None:
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


def _check_fits(sel, art, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every selected entry exists in its tensor, every tensor has the shape the selection
    was made for, and no draw is empty: a selection that is corrupt (but sealed) or made
    for other parameters is refused here, not deep inside a perturbation."""
    import math

    import numpy as np

    missing = [n for n in sel.params if n not in shapes]
    if missing:
        raise ArtifactError(f"{art.path}: names parameter {missing[0]!r} that {what} does not have")
    recorded = A.provenance(art).get("shapes")
    if not isinstance(recorded, dict):
        raise ArtifactError(
            f"{art.path}: records no tensor shapes, so it cannot be checked against {what}; "
            "recompute it with this version of cwa"
        )
    for n in sel.params:
        if [int(x) for x in recorded.get(n, [-1])] != [int(x) for x in shapes[n]]:
            raise ArtifactError(
                f"{art.path}: tensor {n!r} has shape {tuple(recorded.get(n, ()))} in the selection "
                f"but {tuple(shapes[n])} in {what}; it was made for another model"
            )
    numel = np.array([math.prod(shapes[n]) for n in sel.params], dtype=np.int64)
    for d, draw in enumerate(sel.draws):
        if not len(draw.flat_index):
            raise ArtifactError(f"{art.path}: draw {d} selects no weights (file damaged or hand-made)")
        if len(draw.flat_index) and bool((draw.flat_index >= numel[draw.param_index]).any()):
            raise ArtifactError(
                f"{art.path}: draw {d} selects entries past the end of their tensors in {what} "
                "(file corrupted, or made for other parameters)"
            )


def _input_files(*, paths=(), lm=None, data=None) -> list[Path]:
    """The files a stage reads: artifacts, the local model's files, local data files."""
    out = [Path(p) for p in paths]
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
    if lm.source in ("local", "gguf"):
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


# --------------------------------------------------------------------------- score


def score_stage(
    lm,
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
    output: Path | None = None,
    force: bool = False,
    grad_checkpointing: bool = False,
    dist=None,
) -> StageResult:
    """Score every selected weight; write the scores artifact (see `cwa.metrics`).

    `dist` (a `cwa.distributed.Dist`, e.g. from `cwa.distributed.session()` under
    torchrun): each rank scores its shard of the calibration windows and the
    accumulators are all-reduced; rank 0 decides the cache hit for everyone, writes the
    artifact and logs; the other ranks wait for it and return the same path without
    writing. `grad_checkpointing` trades one more forward pass for activation memory;
    like the batch size it does not change the result and is not in the fingerprint.
    """
    import contextlib

    from cwa.distributed import Dist
    from cwa.metrics import METRICS, MetricOptions, compute_scores, select_params

    t0 = time.perf_counter()
    dist = dist if dist is not None else Dist()
    check_seed(seed)
    name = METRICS.resolve(metric)
    cls = METRICS.get(name)
    if obd and not getattr(cls, "curvature", False):
        raise UsageError(
            f"--obd needs a curvature metric (grad_squared, hessian_diag, hutchinson_diag), not {name}"
        )
    if mc_samples <= 0:
        raise UsageError(f"--mc-samples {mc_samples}: must be a positive integer")
    if hutchinson_samples <= 0:
        raise UsageError(f"--hutchinson-samples {hutchinson_samples}: must be a positive integer")
    if score_dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--score-dtype {score_dtype!r}: choose float32, bfloat16 or float16")
    if score_dtype == "float16" and name != "magnitude":
        raise UsageError(
            f"--score-dtype float16: scores of {name} underflow float16; use bfloat16 or float32"
        )
    needs_data = getattr(cls, "needs_data", True)
    calib = data.split(lm, seed=seed, calib=True, evaluation=False).calibration if needs_data else None
    opts: dict[str, Any] = {
        "include": include or None,
        "exclude": exclude or None,
        "obd": obd,
        "score_dtype": score_dtype,
    }
    if name == "hessian_diag":
        opts["mc_samples"] = mc_samples
    if name == "hutchinson_diag":
        opts["hutchinson_samples"] = hutchinson_samples
    if calib is not None:
        opts["data"] = calib.source
    data_fp = calib.fingerprint if calib is not None else "none"
    # The seed is always part of it: scores carry their seed (`cwa.seed`), and every
    # selection made from them compares its controls by that seed, so the artifact of
    # seed 0 must never stand in for seed 5, even where the numbers coincide (magnitude).
    fp = A.stage_fingerprint("score", model=lm.fingerprint, data=data_fp, metric=name, seed=seed, options=opts)
    out = A.resolve_output(output, "scores", fp, ".safetensors")
    guard_outputs({"-o": out}, _input_files(lm=lm, data=data))
    hit = not force and dist.is_main and A.cached(out, fp, A.scores_fingerprint_of)
    if dist.broadcast_flag(hit):  # every rank takes rank 0's branch
        return _done(out, fp, True, t0)
    model = lm.model
    params = select_params(model, include, exclude)
    mopts = MetricOptions(seed=seed, mc_samples=mc_samples, hutchinson_samples=hutchinson_samples, obd=obd)
    run = {"batch_size": data.batch_size, "dist": dist if dist.enabled else None,
           "grad_checkpointing": grad_checkpointing}
    if calib is not None:
        mine = len(dist.shard(len(calib))) if dist.enabled else len(calib)
        quiet = contextlib.nullcontext(lambda n: None)  # only rank 0 draws a progress bar
        bar = progress(f"score {name}", mine) if dist.is_main else quiet
        with bar as adv:
            done = [0]

            def advance(n_done: int) -> None:  # compute_scores reports a running total
                adv(n_done - done[0])
                done[0] = n_done

            scores, notes = compute_scores(
                model, params, calib.ids, calib.indices, name, mopts, progress=advance, **run
            )
    else:
        scores, notes = compute_scores(model, params, None, [], name, mopts, **run)
    if not dist.is_main:
        dist.barrier()  # returns once rank 0 has written the artifact
        return _done(out, fp, False, t0, rank=dist.rank)
    for n in notes:
        log(f"note: {n}")
    meta = {
        "cwa.metric": name,
        "cwa.model": lm.name,
        "cwa.model_fingerprint": lm.fingerprint,
        "cwa.model_dtype": lm.dtype,
        "cwa.data_fingerprint": data_fp,
        "cwa.fingerprint": fp,
        "cwa.seed": str(seed),
        "cwa.n_windows": str(len(calib) if calib is not None else 0),
        "cwa.seq_len": str(calib.seq_len if calib is not None else 0),
        "cwa.windows": json.dumps(calib.indices if calib is not None else []),
        "cwa.world_size": str(dist.world_size if dist.enabled else 1),
        "cwa.options": json.dumps({**opts, "signed": bool(getattr(cls, "signed", False)), "notes": notes}),
    }
    try:
        A.write_scores(out, scores, meta, dtype=score_dtype)
    finally:
        dist.barrier()
    return _done(out, fp, False, t0)


# --------------------------------------------------------------------------- rank


def rank_stage(
    scores_path: Path,
    *,
    topk: int,
    mode: str = "global",
    rank_by: str | None = None,
    output: Path | None = None,
    csv: Path | None = None,
    stats: Path | None = None,
    lm=None,
    force: bool = False,
) -> StageResult:
    from cwa.ranking import sensitivity_stats
    from cwa.ranking import topk as rank_topk

    t0 = time.perf_counter()
    _check_topk(topk)
    _check_mode(mode)
    rank_by = _check_rank_by(rank_by)
    sc = A.open_scores(scores_path)
    seed = scores_seed(sc)
    if lm is not None:
        _check_model(lm, sc.model_fingerprint, sc.path)
    fp = A.stage_fingerprint("rank", scores=sc.fingerprint, seed=seed, k=topk, mode=mode, rank_by=rank_by)
    out = A.resolve_output(output, "topk", fp, ".h5")
    guard_outputs({"-o": out, "--csv": csv, "--stats": stats}, [sc.path])
    if lm is not None and csv is not None:
        _check_scores_fit(sc, lm)
    if not force and A.cached(out, fp, A.h5_fingerprint_of) and (csv is None or csv.exists()) and (
        stats is None or stats.exists()
    ):
        return _done(out, fp, True, t0)
    sel = rank_topk(sc, topk, mode=mode, rank_by=rank_by, seed=seed)
    st, hist = sensitivity_stats(sc, sel)
    prov = _provenance(sc)
    extra = _hist_arrays(hist)
    A.write_selection(out, sel, fingerprint=fp, provenance=prov, extra_arrays=extra, doc={"stats": st})
    if csv is not None:
        write_topk_csv(csv, sel, sc, lm)
    if stats is not None:
        A.write_json(stats, {"metric": sc.metric, "scores": str(sc.path), **st})
    if sel.ties_at_k > 1:
        log(f"note: {sel.ties_at_k} entries tie with the K-th score", verbose_only=True)
    return _done(out, fp, False, t0)


def _check_mode(mode: str) -> None:
    check_choice("--mode", mode, ("global", "per_layer"))


def _check_rank_by(rank_by: str | None) -> str:
    return check_choice("--rank-by", rank_by or "abs", ("abs", "value"))


def _check_topk(topk: int) -> None:
    if topk <= 0:
        raise UsageError(f"--topk {topk}: K must be a positive integer")


def scores_seed(sc) -> int:
    """The seed a scores artifact was computed with: every selection made from it carries
    it, so a top-K and its controls are compared seed by seed."""
    try:
        return int(sc.meta.get("cwa.seed", "0"))
    except ValueError:
        raise ArtifactError(f"{sc.path}: cwa.seed {sc.meta.get('cwa.seed')!r} is not an integer") from None


def _check_scores_fit(sc, lm) -> None:
    """Every scored tensor exists in the model with the same shape (a CSV's coordinates
    come from the scores' shapes and its values from the model's tensors)."""
    named = _named_params(lm.model)
    for n in sc.names:
        if n not in named:
            raise ArtifactError(f"{sc.path}: scores parameter {n!r}, which --model does not have")
        if tuple(named[n].shape) != tuple(sc.shape(n)):
            raise ArtifactError(
                f"{sc.path}: tensor {n!r} has shape {tuple(sc.shape(n))} in the scores but "
                f"{tuple(named[n].shape)} in --model; they belong to different models"
            )


SEED_LIMIT = 2**63  # seeds are stored as int64 in HDF5 attributes


def check_seed(seed: int, flag: str = "--seed") -> int:
    if isinstance(seed, bool) or not -SEED_LIMIT <= int(seed) < SEED_LIMIT:
        raise UsageError(f"{flag} {seed}: a seed must fit in 64 bits (|seed| < 2**63)")
    return int(seed)


MAX_CONTROL_DRAWS = 10_000  # each draw is one evaluation pass in cwa perturb


def check_draws(draws: int) -> int:
    if draws <= 0 or draws > MAX_CONTROL_DRAWS:
        raise UsageError(
            f"--control-draws {draws}: must be between 1 and {MAX_CONTROL_DRAWS} "
            "(each draw costs one evaluation pass)"
        )
    return int(draws)


def _provenance(sc) -> dict[str, Any]:
    return {
        "scores": str(sc.path),
        "scores_fingerprint": sc.fingerprint,
        "model": sc.meta.get("cwa.model"),
        "model_fingerprint": sc.model_fingerprint,
        "data_fingerprint": sc.meta.get("cwa.data_fingerprint"),
        "metric": sc.metric,
        "scores_seed": sc.meta.get("cwa.seed"),
        "shapes": {n: list(sc.shape(n)) for n in sc.names},
        "cwa_version": __version__,
    }


def _hist_arrays(hist: dict[str, Any]) -> dict[str, Any]:
    return {f"stats/{k}": v for k, v in hist.items() if v is not None}


def layer_of(name: str) -> str:
    """The block number in a parameter name (`transformer.h.3.attn...` -> "3"), or ""."""
    import re

    m = re.search(r"\.(?:h|layers|layer|blocks|block)\.(\d+)\.", name)
    return m.group(1) if m else ""


def write_topk_csv(path: Path, sel, sc, lm=None) -> Path:
    """top_weights.csv: rank, param, layer, coords, flat_index, score, value."""
    import csv as _csv
    import io

    import numpy as np

    d = sel.draws[0]
    values = None
    if lm is not None:
        named = _named_params(lm.model)
        values = np.empty(len(d.flat_index), dtype=np.float64)
        for pi in np.unique(d.param_index):
            p = named[sel.params[pi]].detach().reshape(-1)
            mask = d.param_index == pi
            values[mask] = p[np.asarray(d.flat_index[mask])].double().cpu().numpy()
    buf = io.StringIO()
    w = _csv.writer(buf)
    w.writerow(["rank", "param", "layer", "coords", "flat_index", "score", "value"])
    for r, (pi, fi, s) in enumerate(zip(d.param_index, d.flat_index, d.score, strict=True), 1):
        name = sel.params[pi]
        coords = ",".join(str(int(c)) for c in np.unravel_index(int(fi), sc.shape(name)))
        val = "" if values is None else repr(float(values[r - 1]))
        w.writerow([r, name, layer_of(name), coords, int(fi), repr(float(s)), val])
    return A.write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- control


def control_stage(
    scores_path: Path,
    *,
    kind: str,
    topk: int | None = None,
    mode: str = "global",
    rank_by: str | None = None,
    ref: Path | None = None,
    draws: int = 20,
    seed: int = 0,
    lm=None,
    output: Path | None = None,
    force: bool = False,
) -> StageResult:
    from cwa.controls import CONTROLS, make_control
    from cwa.ranking import topk as rank_topk

    t0 = time.perf_counter()
    kind = CONTROLS.resolve(kind)
    check_draws(draws)
    check_seed(seed)
    sc = A.open_scores(scores_path)
    sc_seed = scores_seed(sc)
    if ref is not None:
        ref_sel, ref_art = A.read_selection(ref)
        if ref_sel.kind != "topk":
            raise UsageError(f"--ref {ref}: is a {ref_sel.kind} selection, expected a top-K selection")
        if A.provenance(ref_art).get("scores_fingerprint") not in (None, sc.fingerprint):
            raise ArtifactError(f"--ref {ref}: was ranked from other scores than {sc.path}")
        _check_fits(ref_sel, ref_art, {n: sc.shape(n) for n in sc.names}, str(sc.path))
        ref_fp = ref_art.fingerprint
        topk, mode, rank_by = ref_sel.k, ref_sel.mode, ref_sel.rank_by
    else:
        if topk is None:
            raise UsageError("cwa control needs --topk K or --ref TOPK.h5")
        _check_topk(topk)
        _check_mode(mode)
        rank_by = _check_rank_by(rank_by)
        ref_sel, ref_fp = None, None
    if kind == "magnitude_matched" and lm is None:
        raise UsageError("--kind magnitude_matched needs --model (it matches the top-K's |w|)")
    if lm is not None:
        _check_model(lm, sc.model_fingerprint, sc.path)
    deterministic = kind == "bottom_k"
    fp = A.stage_fingerprint(
        "control",
        scores=sc.fingerprint,
        kind=kind,
        scores_seed=sc_seed,
        k=topk,
        mode=mode,
        rank_by=rank_by,
        ref=ref_fp,
        draws=None if deterministic else draws,
        seed=None if deterministic else seed,
        model=lm.fingerprint if kind == "magnitude_matched" else None,
    )
    out = A.resolve_output(output, kind, fp, ".h5")
    guard_outputs({"-o": out}, [sc.path] + ([Path(ref)] if ref is not None else []))
    if not force and A.cached(out, fp, A.h5_fingerprint_of):
        return _done(out, fp, True, t0)
    if ref_sel is None:
        ref_sel = rank_topk(sc, topk, mode=mode, rank_by=rank_by, seed=sc_seed)
    weights = None
    if kind == "magnitude_matched":
        _check_scores_fit(sc, lm)
        named = _named_params(lm.model)
        weights = {n: named[n].detach() for n in sc.names}
    sel = make_control(kind, sc, ref_sel, draws=draws, seed=seed, weights=weights)
    # The selection's seed is the experiment's (its scores'); the draws' own seed is info.
    sel.seed = sc_seed
    sel.info["draw_seed"] = None if deterministic else int(seed)
    _warn_fallback(sel, out)
    prov = _provenance(sc)
    prov["ref"] = str(ref) if ref is not None else None
    A.write_selection(out, sel, fingerprint=fp, provenance=prov)
    return _done(out, fp, False, t0)


def _warn_fallback(sel, out: Path) -> None:
    """magnitude_matched: say so when the match is poor (partners from other |w| bins)."""
    fb, size = sel.info.get("n_fallback"), len(sel.draws[0].flat_index) if sel.draws else 0
    if sel.kind == "magnitude_matched" and fb and size and fb / size > 0.10:
        q = (sel.info.get("achieved_match") or {}).get("ratio_quantiles", {})
        log(
            f"warning: magnitude_matched ({out}): {fb} of {size} partners ({fb / size:.0%}) come "
            f"from other |w| bins (median |w| ratio partner/top-K {q.get('0.5', float('nan')):.3g}); "
            "the control is not well matched"
        )


# --------------------------------------------------------------------------- perturb


def perturb_stage(
    lm,
    data: DataOptions,
    selections: list[Path],
    *,
    method: str,
    scale: float | None = None,
    prob: float = 1.0,
    bit: str = "exponent_msb",
    seed: int = 0,
    output: Path | None = None,
    json_path: Path | None = None,
    force: bool = False,
) -> StageResult:
    import numpy as np

    from cwa.evaluate import EVAL_VERSION, evaluate
    from cwa.perturb import perturbed, summarize

    t0 = time.perf_counter()
    method, scale, bit = check_perturb_options(method, scale, prob, bit, dtype=lm.dtype)
    check_seed(seed)
    if not selections:
        raise UsageError("cwa perturb needs at least one selection artifact")
    sels = []
    for p in selections:
        sel, art = A.read_selection(p)
        _check_model(lm, A.provenance(art).get("model_fingerprint", ""), art.path)
        sels.append((p, sel, art))
    ev = data.split(lm, seed=seed, calib=False, evaluation=True).evaluation
    fp = A.stage_fingerprint(
        "perturb",
        selections=[a.fingerprint for _, _, a in sels],
        model=lm.fingerprint,
        data=ev.fingerprint,
        method=method,
        scale=scale if method in ("sign_flip", "gauss_noise") else None,
        prob=prob if method == "bit_flip" else None,
        bit=bit if method == "bit_flip" else None,
        seed=seed if method in ("gauss_noise", "bit_flip") else None,
        version=EVAL_VERSION,
    )
    out = A.resolve_output(output, "perturb", fp, ".h5")
    guard_outputs({"-o": out, "--json": json_path}, _input_files(paths=selections, lm=lm, data=data))
    if not force and A.cached(out, fp, A.h5_fingerprint_of):
        if json_path is not None:  # cheap, and never leaves a stale JSON beside a cache hit
            A.write_json(json_path, A.read_h5(out).doc)
        return _done(out, fp, True, t0)

    model = lm.model
    named = _named_params(model)
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    for _, sel, art in sels:  # before any evaluation (not on a cache hit: no model load)
        _check_fits(sel, art, shapes, "the model")
    n_cond = sum(len(s.draws) for _, s, _ in sels)
    arrays: dict[str, Any] = {}
    conditions: list[dict[str, Any]] = []
    per_window: dict[str, Any] = {"conditions": []}
    with progress("perturb", (n_cond + 1) * len(ev)) as adv:
        base = evaluate(model, ev, batch_size=data.batch_size, keep_baseline=True, progress=adv)
        try:
            arrays["baseline/per_window_nll"] = base.per_window_nll
            per_window["baseline"] = base.per_window_nll
            for si, (_, sel, art) in enumerate(sels):
                missing = [n for n in sel.params if n not in named]
                if missing:
                    raise ArtifactError(
                        f"{art.path}: names parameter {missing[0]!r} that the model does not have"
                    )
                params = [named[n] for n in sel.params]
                for d, draw in enumerate(sel.draws):
                    # Each condition gets its own noise stream (index = its position in this
                    # stage), so the top-K and a control never share noise values.
                    with perturbed(
                        params, draw, method, scale=scale, prob=prob, bit=bit, seed=seed,
                        draw_index=len(conditions),
                    ) as rec:
                        res = evaluate(model, ev, batch_size=data.batch_size, baseline=base.baseline, progress=adv)
                    i = len(conditions)
                    m = res.metrics
                    cond = {
                        "name": sel.kind,
                        "selection": si,
                        "seed": sel.seed,
                        "draw": d,
                        "k": sel.k,
                        "mode": sel.mode,
                        "n_selected": int(len(draw.flat_index)),
                        "method": method,
                        "scale": scale,
                        "prob": prob if method == "bit_flip" else None,
                        "bit": bit if method == "bit_flip" else None,
                        "n_changed": int(rec.n_changed),
                        "delta_w_norm": float(rec.delta_w_norm),
                        "nll": m["nll"],
                        "perplexity": m["perplexity"],
                        "token_accuracy": m["token_accuracy"],
                        "bits_per_byte": m["bits_per_byte"],
                        "delta_nll": m["nll"] - base.metrics["nll"],
                        "kl_from_baseline": m["kl_from_baseline"],
                        "top1_agreement": m["top1_agreement"],
                        "restored": bool(rec.restored),
                    }
                    conditions.append(cond)
                    arrays[f"conditions/{i}/per_window_nll"] = res.per_window_nll
                    per_window["conditions"].append(res.per_window_nll)
                    if getattr(rec, "bits", None) is not None:
                        arrays[f"conditions/{i}/bits"] = np.asarray(rec.bits)
        finally:
            if base.baseline is not None:
                base.baseline.close()
    if not all(c["restored"] for c in conditions):
        raise ArtifactError("a perturbation was not restored bit for bit; results discarded")
    per_window["conditions"] = np.asarray(per_window["conditions"]).reshape(len(conditions), len(ev))
    summary = summarize(conditions, per_window)
    doc = {
        "baseline": {k: base.metrics[k] for k in ("nll", "perplexity", "token_accuracy", "bits_per_byte", "n_tokens")},
        "conditions": conditions,
        "summary": summary,
        "metric": sels[0][1].metric,
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "eval_data": ev.source,
        "eval_windows": ev.indices,
        "selections": [str(p) for p, _, _ in sels],
    }
    arrays["eval_windows"] = np.asarray(ev.indices, dtype=np.int64)
    attrs = {
        "fingerprint": fp,
        "method": method,
        "model_fingerprint": lm.fingerprint,
        "data_fingerprint": ev.fingerprint,
        "seed": seed,
        "provenance": {"selections": [str(p) for p, _, _ in sels], "model": lm.name},
    }
    A.write_h5(out, A.PERTURBATION_SCHEMA, attrs, arrays, doc=doc)
    if json_path is not None:
        A.write_json(json_path, doc)
    return _done(out, fp, False, t0)


def check_perturb_options(method: str, scale: float | None, prob: float, bit: str, dtype: str | None = None):
    """Validate the perturbation flags before any work (`cwa run` calls this up front, so
    a bad value never costs a scoring pass); returns (method, scale, bit) resolved.
    With `dtype` (the name the model is loaded in), a `--bit` index is checked against
    that dtype's width too (bit 20 exists in float32, not in bfloat16)."""
    import math

    from cwa.perturb import PERTURBATIONS

    method = PERTURBATIONS.resolve(method)
    scale = default_scale(method, scale)
    if scale is not None and not (math.isfinite(scale) and scale >= 0):
        raise UsageError(f"--perturb-scale {scale}: must be a finite number >= 0")
    if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
        raise UsageError(f"--perturb-prob {prob}: must be a probability in [0, 1]")
    bit = _check_bit(bit)
    if method == "bit_flip" and dtype is not None:
        import torch

        from cwa.perturb import resolve_bit

        try:
            resolve_bit(bit, getattr(torch, dtype))
        except UsageError as e:
            raise UsageError(f"{str(e).rstrip('.')} (the model is loaded in {dtype}; see --dtype)") from None
    return method, scale, bit


def default_scale(method: str, scale: float | None) -> float | None:
    if method == "sign_flip":
        return 1.0 if scale is None else scale
    if method == "gauss_noise":
        return 0.1 if scale is None else scale
    return scale


def _check_bit(bit: str) -> str | int:
    named = ("sign", "exponent_msb", "mantissa_msb", "random")
    if bit in named:
        return bit
    try:
        v = int(bit)
    except ValueError:
        raise UsageError(f"--bit {bit!r}: choose {', '.join(named)} or a bit index (0 = least significant)") from None
    if v < 0:
        raise UsageError(f"--bit {bit}: a bit index must be non-negative")
    return v


# --------------------------------------------------------------------------- eval


def eval_stage(
    lm,
    data: DataOptions,
    *,
    output: Path | None = None,
    force: bool = False,
) -> StageResult:
    from cwa.evaluate import EVAL_VERSION, evaluate

    t0 = time.perf_counter()
    ev = data.split(lm, seed=0, calib=False, evaluation=True).evaluation
    fp = A.stage_fingerprint("eval", model=lm.fingerprint, data=ev.fingerprint, version=EVAL_VERSION)
    out = Path(output) if output is not None else A.default_output("eval", fp, ".json")
    guard_outputs({"-o": out}, _input_files(lm=lm, data=data))
    if not force and out.exists():
        try:
            if json.loads(out.read_text()).get("fingerprint") == fp:
                return _done(out, fp, True, t0)
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    with progress("eval", len(ev)) as adv:
        res = evaluate(lm.model, ev, batch_size=data.batch_size, progress=adv)
    doc = {
        **res.metrics,
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "dtype": lm.dtype,
        "eval_data": ev.source,
        "seq_len": ev.seq_len,
        "eval_windows": ev.indices,
        "data_fingerprint": ev.fingerprint,
        "fingerprint": fp,
        "cwa_version": __version__,
        "created": A.now_iso(),
    }
    A.write_json(out, doc)
    return _done(out, fp, False, t0, metrics=res.metrics)


# --------------------------------------------------------------------------- stability


def stability_stage(
    inputs: list[Path],
    *,
    topk: int | None,
    rank_by: str | None = None,
    mode: str | None = None,
    output: Path | None = None,
    json_path: Path | None = None,
    force: bool = False,
) -> StageResult:
    """Compare the top-K sets of several scores (or selection) artifacts of one model.

    Writes a `stability/1` HDF5 artifact (matrices as datasets, the JSON document as its
    doc) and, with `json_path`, `stability_results.json`. `topk` is required for scores and
    must be None or equal to the selections' K for selections; `mode` defaults to global
    for scores and to the selections' mode for selections. The result's `extra` holds
    `mean_jaccard`, `random_jaccard` and `mean_spearman`.
    """
    from cwa import stability as S

    t0 = time.perf_counter()
    plan = S.plan([Path(p) for p in inputs], topk=topk, mode=mode, rank_by=rank_by)
    fp = A.stage_fingerprint(
        "stability",
        inputs=plan.fingerprints,
        labels=[str(x) for x in plan.labels],
        k=plan.k,
        mode=plan.mode,
        rank_by=plan.rank_by,
        version=S.ANALYSIS_VERSION,
    )
    out = A.resolve_output(output, "stability", fp, ".h5")
    guard_outputs({"-o": out, "--json": json_path}, [Path(p) for p in inputs])
    if not force and A.cached(out, fp, A.h5_fingerprint_of):
        doc = A.read_h5(out).doc
        if json_path is not None:  # cheap, and never leaves a stale JSON beside a cache hit
            A.write_json(json_path, doc)
        return _result(out, fp, True, t0, doc)
    res = S.analyze(plan)
    attrs = {
        "fingerprint": fp,
        "k": plan.k,
        "mode": plan.mode,
        "rank_by": plan.rank_by,
        "kind": plan.kind,
        "input": plan.input_kind,
        "metric": res.doc.get("metric") or "",
        "model_fingerprint": plan.model_fingerprint,
        "provenance": {
            "inputs": [str(i.path) for i in plan.inputs],
            "fingerprints": plan.fingerprints,
        },
    }
    A.write_h5(out, A.STABILITY_SCHEMA, attrs, res.arrays, doc=res.doc)
    if json_path is not None:
        A.write_json(json_path, res.doc)
    return _result(out, fp, False, t0, res.doc)


def _result(out: Path, fp: str, cached: bool, t0: float, doc) -> StageResult:
    doc = doc or {}
    extra = {k: doc.get(k) for k in ("mean_jaccard", "random_jaccard", "mean_spearman")}
    return StageResult(Path(out), fp, cached, time.perf_counter() - t0, extra)
