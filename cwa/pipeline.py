"""`cwa run`: every stage in order, one loaded model, cache hits by fingerprint, and the
experiment directory of the SPEC:

    OUT/experiment_manifest.json  config.json  sensitivity_stats.json  top_weights.csv
        control_baselines.json  perturbation_results.json  stability_results.json  report.html
        artifacts/  plots/

Per seed: score -> rank (each K) -> controls (each K) -> perturb (each K); then the
stability stage over the seeds' scores, then the plots. Every stage artifact lives under
`OUT/artifacts/` with a fixed name, so running the same command again finds each finished
stage by its fingerprint and recomputes nothing.

Several seeds: `perturbation_results.json` holds the conditions of every seed; its
`summary` is the first seed's and `summary_by_seed` has all. A K sweep (`--topk
50,100,200`): per-K artifacts get `_k{K}`; the top-level files describe the first K and
`summary_by_k` has all.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa import artifacts as A
from cwa import checks as C
from cwa.console import log
from cwa.errors import UsageError
from cwa.stages import (
    DataOptions,
    ModelOptions,
    StageResult,
    check_perturb_options,
    control_stage,
    perturb_stage,
    rank_stage,
    score_stage,
    stability_stage,
)


@dataclass
class RunConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    metric: str = "grad_x_weight"
    topk: list[int] = field(default_factory=lambda: [100])
    mode: str = "global"
    rank_by: str | None = None
    perturb: str = "sign_flip"
    perturb_scale: float | None = None
    perturb_prob: float = 1.0
    bit: str = "exponent_msb"
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    control_draws: int = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stability_check: bool | None = None
    save_plots: bool = True
    out_dir: Path | None = None
    hutchinson_samples: int = 8
    mc_samples: int = 1
    obd: bool = False
    score_dtype: str = "float32"
    include: list[str] | None = None
    exclude: list[str] | None = None
    eval_tasks: list[str] | None = None  # lm-eval tasks (cwa.tasks); a comma list is split
    eval_tasks_path: str | None = None
    eval_tasks_limit: int | None = None
    force: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        """Accept the forms a notebook writes: `model="gpt2"`, `data="corpus.txt"`,
        `topk=100`, `seeds=0`, `controls="random_k,bottom_k"` (normalized in place)."""
        if not isinstance(self.model, ModelOptions):
            self.model = ModelOptions(model=None if self.model is None else str(self.model))
        if not isinstance(self.data, DataOptions):
            self.data = DataOptions(data=None if self.data is None else str(self.data))
        self.topk = _int_list(self.topk, "--topk")
        self.seeds = _int_list(self.seeds, "--seeds")
        if isinstance(self.controls, str):
            self.controls = parse_controls(self.controls)
        self.controls = list(self.controls)
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [x.strip() for x in self.eval_tasks.split(",") if x.strip()]
        if self.eval_tasks_path is not None:
            self.eval_tasks_path = str(self.eval_tasks_path)


def _int_list(v: Any, flag: str) -> list[int]:
    if isinstance(v, str):
        return parse_int_list(v, flag)
    vals = [v] if isinstance(v, int) else list(v)
    if not vals or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
        raise UsageError(f"{flag} {v!r}: expected an integer or a list of integers")
    if len(set(vals)) != len(vals):
        raise UsageError(f"{flag} {v!r}: contains duplicates")
    return vals


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a comma-separated list of integers, e.g. 0,1,2") from None
    if not vals:
        raise UsageError(f"{flag} {text!r}: expected at least one integer")
    if len(set(vals)) != len(vals):
        raise UsageError(f"{flag} {text!r}: contains duplicates")
    return vals


def parse_controls(text: str) -> list[str]:
    from cwa.controls import CONTROLS

    if text.strip().lower() in ("none", ""):
        return []
    out = [CONTROLS.resolve(x) for x in text.split(",") if x.strip()]
    if len(set(out)) != len(out):
        raise UsageError(f"--controls {text!r}: contains duplicates")
    return out


def model_label(model: str | None) -> str:
    from cwa import assets

    if model is None:
        return assets.EMBEDDED_MODEL_NAME
    name = Path(model.rstrip("/")).name
    return name[:-5] if name.endswith(".gguf") else name


def default_out_dir(cfg: RunConfig) -> Path:
    k = "-".join(str(k) for k in cfg.topk)
    return Path("outputs") / f"{model_label(cfg.model.model)}_{cfg.metric}_k{k}"


def _tasks(cfg: RunConfig):
    """The lm-eval task options of the run (`cwa.tasks.TaskEval`), or None."""
    from cwa.tasks import task_eval

    return task_eval(cfg.eval_tasks, cfg.eval_tasks_path, cfg.eval_tasks_limit)


def _ksuf(cfg: RunConfig, k: int) -> str:
    return f"_k{k}" if len(cfg.topk) > 1 else ""


def run(cfg: RunConfig, argv: list[str] | None = None) -> Path:
    """Run the whole experiment; returns the output directory. `cfg` is not changed."""
    started, t_start = A.now_iso(), time.perf_counter()
    cfg, stability = _resolved(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    previous = claim_out_dir(out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    from cwa.metrics import METRICS

    lm = cfg.model.load(second_order=METRICS.get(cfg.metric).second_order, lazy=True)
    r = _Run(cfg, out, lm)
    _check_space(r)
    for seed in cfg.seeds:
        r.one_seed(seed)
    if stability:
        r.stability()
    results = _write_reports(r)
    plots = _plots(r) if cfg.save_plots else []
    A.write_json(out / "config.json", _config_dict(cfg, out, stability))
    removed = remove_stale(out, _produced(r, results is not None, plots))
    this_run = {
        "command_line": argv if argv is not None else sys.argv, "cwd": os.getcwd(), "started": started,
        "finished": A.now_iso(), "seconds": round(time.perf_counter() - t_start, 3), "stages": r.stages,
        "all_cache_hits": all(s.get("cache_hit") for s in r.stages if s["stage"] != "plot"),
        "removed_stale": removed,
    }
    A.write_json(out / "experiment_manifest.json", _manifest(r, this_run, previous, plots))
    from cwa.report import write_run_report

    log(write_run_report(out))  # report.html, read back from what the run wrote; the headline on stderr
    return out


def _resolved(cfg: RunConfig) -> tuple[RunConfig, bool]:
    """A checked copy of `cfg` (names resolved) and whether the stability stage runs.
    Every value is checked before any work, so a typo never costs a scoring pass."""
    import dataclasses

    from cwa.metrics import METRICS

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), data=dataclasses.replace(cfg.data))
    cfg.metric = METRICS.resolve(cfg.metric)
    if cfg.perturb != "none":
        cfg.perturb, _, _ = check_perturb_options(
            cfg.perturb, cfg.perturb_scale, cfg.perturb_prob, cfg.bit, dtype=_load_dtype(cfg)
        )
    for k in cfg.topk:
        C.check_topk(k)
    for s in cfg.seeds:
        C.check_seed(s, "--seeds")
    C.check_mode(cfg.mode)
    C.check_rank_by(cfg.rank_by)
    C.check_draws(cfg.control_draws)
    C.check_score_dtype(cfg.score_dtype, METRICS.get(cfg.metric))
    cfg.data.validate()
    tasks = _tasks(cfg)
    if tasks is not None:
        if cfg.perturb == "none":
            raise UsageError("--eval-tasks with --perturb none: tasks are evaluated by the perturb stage; drop one")
        tasks.check()  # unknown task names fail here, before any work
    stability = cfg.stability_check if cfg.stability_check is not None else len(cfg.seeds) > 1
    if stability and len(cfg.seeds) < 2:
        log("note: --stability-check needs two or more seeds; skipped with one seed")
        stability = False
    return cfg, stability


@dataclass
class _Run:
    """One `cwa run` in progress: its stages' records and artifact paths."""

    cfg: RunConfig
    out: Path
    lm: Any
    stages: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[int, Path] = field(default_factory=dict)
    topk: dict[tuple[int, int], Path] = field(default_factory=dict)
    controls: dict[tuple[int, int, str], Path] = field(default_factory=dict)
    perturb: dict[tuple[int, int], Path] = field(default_factory=dict)
    stab: dict[int, Path] = field(default_factory=dict)

    @property
    def art(self) -> Path:
        return self.out / "artifacts"

    def record(self, stage: str, seed: int | None, k: int | None, r: StageResult) -> Path:
        self.stages.append(
            {"stage": stage, "seed": seed, "k": k, "path": str(r.path.relative_to(self.out)),
             "fingerprint": r.fingerprint, "cache_hit": r.cached, "seconds": round(r.seconds, 4)}
        )
        log(f"{stage:9s} seed={seed} k={k}: {'cache hit' if r.cached else f'{r.seconds:.1f}s'}",
            verbose_only=not self.cfg.verbose)
        return r.path

    def one_seed(self, seed: int) -> None:
        """score -> (rank -> controls -> perturb) for each K."""
        cfg = self.cfg
        r = score_stage(
            self.lm, cfg.data, metric=cfg.metric, seed=seed, mc_samples=cfg.mc_samples,
            hutchinson_samples=cfg.hutchinson_samples, obd=cfg.obd, include=cfg.include,
            exclude=cfg.exclude, score_dtype=cfg.score_dtype, output=self.art / f"scores_seed{seed}.safetensors", force=cfg.force,
        )
        self.scores[seed] = self.record("score", seed, None, r)
        for k in cfg.topk:
            self.one_k(seed, k)

    def one_k(self, seed: int, k: int) -> None:
        from cwa.controls import CONTROLS

        cfg, suf = self.cfg, _ksuf(self.cfg, k)
        r = rank_stage(self.scores[seed], topk=k, mode=cfg.mode, rank_by=cfg.rank_by,
                       output=self.art / f"topk_seed{seed}{suf}.h5", force=cfg.force)
        self.topk[seed, k] = self.record("rank", seed, k, r)
        for c in cfg.controls:
            r = control_stage(
                self.scores[seed], kind=c, ref=self.topk[seed, k], draws=cfg.control_draws, seed=seed,
                lm=self.lm if CONTROLS.get(c).needs_weights else None,
                output=self.art / f"{c}_seed{seed}{suf}.h5", force=cfg.force,
            )
            self.controls[seed, k, c] = self.record("control", seed, k, r)
        if cfg.perturb != "none":
            sels = [self.topk[seed, k]] + [self.controls[seed, k, c] for c in cfg.controls]
            r = perturb_stage(
                self.lm, cfg.data, sels, method=cfg.perturb, scale=cfg.perturb_scale, prob=cfg.perturb_prob,
                bit=cfg.bit, seed=seed, output=self.art / f"perturb_seed{seed}{suf}.h5", force=cfg.force,
                tasks=_tasks(cfg),
            )
            self.perturb[seed, k] = self.record("perturb", seed, k, r)

    def stability(self) -> None:
        cfg = self.cfg
        for k in cfg.topk:
            r = stability_stage(
                [self.scores[s] for s in cfg.seeds], topk=k, rank_by=cfg.rank_by, mode=cfg.mode,
                output=self.art / f"stability{_ksuf(cfg, k)}.h5", force=cfg.force,
            )
            self.stab[k] = self.record("stability", None, k, r)


def _check_space(r: _Run) -> None:
    """Before any work: room for the scores of every seed not already on disk (the other
    artifacts are small). 8 B weights are 32 GB of float32 scores per seed."""
    from cwa.stages import SPACE_FIXES, scores_bytes

    cfg = r.cfg
    todo = [s for s in cfg.seeds if cfg.force or not (r.art / f"scores_seed{s}.safetensors").is_file()]
    if todo:
        need = len(todo) * scores_bytes(r.lm, cfg.include, cfg.exclude, cfg.score_dtype)
        A.check_free_space(r.art / "scores", need, f"--out-dir {r.out} ({len(todo)} seeds of scores)", SPACE_FIXES)


def _write_reports(r: _Run) -> dict[str, Any] | None:
    """The top-level reports (cheap; rewritten from the artifacts every time)."""
    cfg, out = r.cfg, r.out
    s0, k0 = cfg.seeds[0], cfg.topk[0]
    sel0 = A.read_selection(r.topk[s0, k0])
    A.write_json(out / "sensitivity_stats.json", {
        "metric": cfg.metric, "seed": s0, "k": k0, **(sel0.doc or {}).get("stats", {}),
        "all_seeds": {str(s): str(r.scores[s].relative_to(out)) for s in cfg.seeds}})
    A.write_topk_csv(out / "top_weights.csv", sel0, r.lm)
    results = _perturbation_report(cfg, r.perturb) if r.perturb else None
    if results is not None:
        A.write_json(out / "perturbation_results.json", results)
    A.write_json(out / "control_baselines.json", _control_report(cfg, r.topk, r.controls, results))
    if r.stab:
        A.write_json(out / "stability_results.json", A.read_stability(r.stab[k0]).doc)
    return results


def _plots(r: _Run) -> list[str]:
    from cwa.plots import plot_artifacts

    t0 = time.perf_counter()
    cfg = r.cfg
    inputs = [r.topk[s, k] for s in cfg.seeds for k in cfg.topk]
    inputs += [r.perturb[s, k] for s in cfg.seeds for k in cfg.topk if (s, k) in r.perturb]
    inputs += [r.stab[k] for k in cfg.topk if k in r.stab]
    plots = [str(p.relative_to(r.out)) for p in plot_artifacts(inputs, r.out / "plots")]
    r.stages.append({"stage": "plot", "seconds": round(time.perf_counter() - t0, 4), "cache_hit": False,
                     "files": plots})
    return plots


def _produced(r: _Run, results: bool, plots: list[str]) -> set[Path]:
    out = r.out
    produced = {out / n for n in ("config.json", "experiment_manifest.json", "sensitivity_stats.json",
                                  "top_weights.csv", "control_baselines.json")}
    produced |= {out / "perturbation_results.json"} if results else set()
    produced |= {out / "stability_results.json"} if r.stab else set()
    return produced | {out / s["path"] for s in r.stages if "path" in s} | {out / f for f in plots}


def _manifest(r: _Run, this_run: dict[str, Any], previous: dict[str, Any] | None, plots: list[str]) -> dict[str, Any]:
    lm = r.lm
    return {
        "cwa_version": __version__,
        **{k: this_run[k] for k in ("command_line", "cwd", "started", "finished", "seconds")},
        "versions": _versions(),
        "git_commit": cwa_commit(),
        "hardware": _hardware(),
        "model": {"name": lm.name, "fingerprint": lm.fingerprint, "dtype": lm.dtype, "device": lm.device,
                  "revision": lm.revision, "commit": getattr(lm, "commit", None), "source": lm.source,
                  "loaded": lm.loaded},
        "data": _data_fingerprints(r.scores, r.perturb),
        "stages": _with_compute_timings(r.stages, previous, this_run["started"]),
        "artifacts": {str(p.relative_to(r.out)): _fp_of(p) for p in sorted(r.art.iterdir()) if not p.name.startswith(".")},
        "plots": plots,
        "all_cache_hits": this_run["all_cache_hits"],
        "runs": (previous.get("runs") or [] if previous else []) + [this_run],
    }


MARKER = ".cwa-run"  # marks a directory as a cwa run's output directory


def claim_out_dir(out: Path) -> dict[str, Any] | None:
    """Make `out` a cwa output directory, or refuse it: a directory that holds files cwa
    did not write (no marker, e.g. a model directory) is a usage error, so `cwa run` never
    overwrites someone's config.json. Returns the previous run's manifest, if any."""
    import json

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out}: is a file; give a directory")
    marker = out / MARKER
    ours = {"artifacts", "plots", *_REPORTS}  # what an interrupted first run may have left
    if out.is_dir() and any(p.name not in ours for p in out.iterdir()) and not marker.is_file():
        legacy = out / "experiment_manifest.json"
        try:
            ok = "cwa_version" in json.loads(legacy.read_text())
        except (OSError, ValueError, TypeError):
            ok = False
        if not ok:
            first = sorted(p.name for p in out.iterdir())[0]
            raise UsageError(
                f"--out-dir {out}: holds files cwa did not write (e.g. {first}); choose a new or "
                "empty directory"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        A.write_text_atomic(marker, f"cwa output directory (cwa {__version__})\n")
    try:
        prev = json.loads((out / "experiment_manifest.json").read_text())
        return prev if isinstance(prev, dict) else None
    except (OSError, ValueError):
        return None


# What `cwa run` writes: stale files of these kinds are removed when a run no longer makes them.
_REPORTS = ("perturbation_results.json", "stability_results.json", "control_baselines.json",
            "sensitivity_stats.json", "top_weights.csv")


def remove_stale(out: Path, produced: set[Path]) -> list[str]:
    """Remove what an earlier run in `out` wrote and this one did not (another seed's
    artifacts, old plots, an old stability report); only files of cwa's own kinds."""
    keep = {p.resolve() for p in produced}
    stale = [out / n for n in _REPORTS]
    stale += [p for p in (out / "artifacts").glob("*") if p.suffix in (".safetensors", ".h5")]
    stale += [p for p in (out / "plots").glob("*.png")]
    removed = []
    for p in stale:
        if p.is_file() and p.resolve() not in keep:
            p.unlink()
            removed.append(str(p.relative_to(out)))
    return sorted(removed)


def _with_compute_timings(stages: list[dict[str, Any]], previous: dict[str, Any] | None, started: str) -> list[dict[str, Any]]:
    """A cache hit keeps the timing of the run that computed the artifact: each stage
    record gets `compute_seconds` and `computed` (that run's start), found in the previous
    manifest by path and fingerprint (a run's start identifies it)."""
    before = {(s.get("path"), s.get("fingerprint")): s for s in (previous or {}).get("stages") or []
              if isinstance(s, dict)}
    out = []
    for s in stages:
        s = dict(s)
        if "path" in s:
            old = before.get((s["path"], s["fingerprint"]))
            if s["cache_hit"] and old is not None:
                s["compute_seconds"] = old.get("compute_seconds", old.get("seconds"))
                s["computed"] = old.get("computed", (previous or {}).get("started"))
            elif not s["cache_hit"]:
                s["compute_seconds"] = s["seconds"]
                s["computed"] = started
        out.append(s)
    return out


def _fp_of(p: Path) -> str | None:
    try:
        if p.suffix == ".safetensors":
            return A.open_scores(p).fingerprint
        return A.read_h5(p).fingerprint
    except Exception:
        return None


def _data_fingerprints(scores_paths: dict[int, Path], perturb_paths: dict) -> dict[str, Any]:
    d: dict[str, Any] = {"calibration": {}, "evaluation": None}
    for s, p in scores_paths.items():
        sc = A.open_scores(p)
        d["calibration"][str(s)] = {"fingerprint": sc.meta.get("cwa.data_fingerprint"),
                                    "windows": sc.json_meta("cwa.windows", [])}
    for p in perturb_paths.values():
        d["evaluation"] = {"fingerprint": A.read_h5(p).attrs.get("data_fingerprint")}
        break
    return d


def _load_dtype(cfg: RunConfig) -> str | None:
    """The dtype name the model will be loaded in (resolved without loading it; None when
    `auto` needs a config that is not downloaded yet: the perturb stage checks again)."""
    from cwa.models import planned_dtype

    m = cfg.model
    return planned_dtype(None if m.model is None else str(m.model), m.revision, m.dtype, m.device)


def _perturbation_report(cfg: RunConfig, perturb_paths: dict[tuple[int, int], Path]) -> dict[str, Any]:
    s0, k0 = cfg.seeds[0], cfg.topk[0]
    docs = {key: A.read_h5(p).doc for key, p in perturb_paths.items()}
    conditions = []
    for (_seed, _k), doc in sorted(docs.items()):
        conditions.extend(doc["conditions"])
    rep = {
        "baseline": docs[s0, k0]["baseline"],
        "conditions": conditions,
        "summary": docs[s0, k0]["summary"],
        "summary_by_seed": {str(s): docs[s, k0]["summary"] for s in cfg.seeds if (s, k0) in docs},
    }
    if len(cfg.topk) > 1:
        rep["summary_by_k"] = {str(k): docs[s0, k]["summary"] for k in cfg.topk if (s0, k) in docs}
    rep["method"] = cfg.perturb
    rep["eval_windows"] = docs[s0, k0].get("eval_windows")
    if "task_eval" in docs[s0, k0]:  # lm-eval tasks (cwa.tasks): what was evaluated
        rep["task_eval"] = docs[s0, k0]["task_eval"]
    return rep


def _control_report(cfg, topk_paths, control_paths, results) -> dict[str, Any]:
    """Per control: the selection summary and its effect, for the first seed at the top
    level (the SPEC's layout) and for every seed under `by_seed`."""
    by_seed_effects = (results or {}).get("summary_by_seed") or {}
    by_seed = {
        str(s): _controls_of_seed(cfg, s, topk_paths, control_paths, by_seed_effects.get(str(s)) or {})
        for s in cfg.seeds
    }
    return {**by_seed[str(cfg.seeds[0])], "by_seed": by_seed}


def _controls_of_seed(cfg, seed, topk_paths, control_paths, summary) -> dict[str, Any]:
    import numpy as np

    k0 = cfg.topk[0]
    ref = A.read_selection(topk_paths[seed, k0])
    ref_keys = set(zip(ref.draws[0].param_index.tolist(), ref.draws[0].flat_index.tolist(), strict=True))
    rep: dict[str, Any] = {}
    for c in cfg.controls:
        sel = A.read_selection(control_paths[seed, k0, c])
        overlaps = [
            len(ref_keys & set(zip(d.param_index.tolist(), d.flat_index.tolist(), strict=True))) for d in sel.draws
        ]
        idx, n = np.unique(sel.draws[0].param_index, return_counts=True)
        rep[c] = {
            "k": sel.k,
            "mode": sel.mode,
            "size": int(len(sel.draws[0].flat_index)),
            "draws": len(sel.draws),
            "seed": sel.seed,
            "overlap_with_topk": overlaps,
            "per_tensor_counts_draw0": {sel.params[i]: int(c_) for i, c_ in zip(idx, n, strict=True)},
            "info": sel.info,
            "effect": summary.get(c),
        }
    return rep


def _config_dict(cfg: RunConfig, out: Path, stability: bool) -> dict[str, Any]:
    d = asdict(cfg)
    d["out_dir"] = str(out)
    d["stability_check"] = stability
    return d


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    v: dict[str, Any] = {"python": sys.version.split()[0]}
    for pkg in ("cwa", "torch", "transformers", "tokenizers", "safetensors", "h5py", "numpy", "lm_eval"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    v["pip_freeze"] = pip_freeze()
    return v


def pip_freeze() -> list[str]:
    """The installed distributions as sorted `name==version` lines, like `pip freeze`, read
    with `importlib.metadata` (no subprocess, works where pip is not installed). Unlike pip
    freeze, pip, setuptools and wheel are listed too. A distribution found twice on the
    path is listed once (the first, the one Python imports). One installed from a
    directory, editable or not, or from a VCS gets its source as a requirements comment:
    `cwa==0.1.0  # editable, file:///src/cwa`, `pkg==1.0  # git+https://...@<commit>`."""
    import importlib.metadata as md
    import json
    import re

    seen: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if not name:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        line = f"{name}=={dist.version}"
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "null")
        except (OSError, ValueError):
            direct = None
        if isinstance(direct, dict) and direct.get("url"):
            vcs = direct.get("vcs_info") or {}
            if (direct.get("dir_info") or {}).get("editable"):
                line += f"  # editable, {direct['url']}"
            elif vcs:
                line += f"  # {vcs.get('vcs', 'vcs')}+{direct['url']}@{vcs.get('commit_id', '?')}"
            else:
                line += f"  # {direct['url']}"
        seen[key] = line
    return [seen[k] for k in sorted(seen)]


def cwa_commit() -> str | None:
    """cwa's own commit: the checkout cwa is imported from (an editable install), else the
    commit pip recorded for a VCS install (direct_url.json), else None. Never the
    repository of the working directory, which may be the user's own project."""
    import importlib.metadata as md
    import json

    import cwa

    src = Path(cwa.__file__).resolve().parent.parent
    if (src / ".git").exists():
        try:
            r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10)
                return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        info = json.loads(md.distribution("cwa").read_text("direct_url.json") or "{}")
        return (info.get("vcs_info") or {}).get("commit_id")
    except (md.PackageNotFoundError, ValueError, AttributeError):
        return None


def _hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ValueError, OSError, AttributeError):
        hw["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        hw["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw

