"""Downstream task accuracy through lm-evaluation-harness (`cwa perturb --eval-tasks`).

Perplexity says how much a perturbation hurts next-token prediction; a task metric says
whether the model still answers questions. `--eval-tasks NAMES` evaluates the baseline and
every condition on lm-eval tasks, with the weights perturbed in place exactly as for
perplexity: `cwa.stages` calls `TaskRunner` inside the same apply -> evaluate -> restore
window (`cwa.perturbation.perturbed`), so the harness sees the perturbed model object
itself (lm-eval's `HFLM` wraps the already-loaded `PreTrainedModel`: no copy, no reload)
and the bit-for-bit restore check covers it.

What lm-eval does and what cwa does
-----------------------------------
- Task names come from lm-eval's own registry (`TaskManager`); `--eval-tasks-path DIR`
  adds a directory of YAML tasks (lm-eval's `include_path`). Unknown names are a usage
  error listing the closest names.
- Metrics and their standard errors are lm-eval's (`acc`, `acc_norm`, ... with
  `acc_stderr`, ...: closed form for means, lm-eval's bootstrap for the others, with its
  default `bootstrap_iters`). A metric of a filter other than `none` keeps lm-eval's key
  (`exact_match,strict-match`); a standard error lm-eval cannot give (`N/A`) is null.
- `--eval-tasks-limit N` evaluates the first N documents of each task (lm-eval's
  `limit`), the same documents for every condition.
- Randomness: before every evaluation Python's, NumPy's and torch's global generators and
  each task's few-shot sampler are seeded from the stage's seed (as `simple_evaluate`
  does), so the baseline and every condition get the same few-shot examples; the caller's
  global generator states are restored afterwards.

cwa calls `lm_eval.evaluator.evaluate` on tasks loaded once per stage instead of
`simple_evaluate` per condition: `simple_evaluate` reloads every dataset and collects
environment information by subprocess (`pip list`, 2-3 s) on each call, and has no way
to reuse loaded tasks. The few lines of set-up it does (seeds, `num_fewshot` default 0,
few-shot seed) are repeated here, nothing else. lm-eval's caches (`use_cache`,
`cache_requests`) and sample logging are off; its log lines and progress bars are kept
off stderr unless `CWA_DEBUG` is set, and nothing it prints reaches stdout (the pipeline
contract).

Caveats: the perturb fingerprint covers the task names, the limit, the seed, lm-eval's
version and the content of every file under `--eval-tasks-path`; a data file that a local
YAML names outside that directory, or a hub dataset of a built-in task, is not hashed
(keep local data inside the directory, or use `--force`). lm-eval scores in the model's
dtype (bfloat16 on CUDA by default), unlike cwa's float32 NLL.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa import checks as C
from cwa.console import debug_enabled
from cwa.errors import CwaError, UsageError
from cwa.registry import did_you_mean

EXTRA = "pip install 'cwa[tasks]'"
#: Part of the perturb fingerprint when tasks are evaluated: how cwa turns lm-eval's
#: results into `tasks.{task}.{metric}` (bump when that changes).
TASKS_VERSION = 1


def lm_eval_version() -> str:
    """The installed lm-eval's version; a usage error naming the extra when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise UsageError(f"--eval-tasks needs lm-evaluation-harness, which is not installed: {EXTRA}") from None
    return str(lm_eval.__version__)


@dataclass(frozen=True)
class TaskEval:
    """What to evaluate: lm-eval task (or group, or tag) names, an optional directory of
    local YAML tasks and an optional per-task document limit. Built, checked, by
    `task_eval`; the names are resolved against the registry by `check` (or on first
    use)."""

    names: tuple[str, ...]
    path: Path | None = None
    limit: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> SHA-256, under `path`
    lm_eval: str = ""

    def fingerprint(self, seed: int) -> dict[str, Any]:
        """The perturb fingerprint's part for the tasks (the path's location is not in it:
        the same task files elsewhere give the same results)."""
        return {"names": list(self.names), "limit": self.limit, "files": self.files, "lm_eval": self.lm_eval,
                "seed": lm_eval_seed(seed), "version": TASKS_VERSION}

    def record(self, seed: int) -> dict[str, Any]:
        """The `task_eval` block of the results: what was evaluated, with what."""
        return {"tasks": list(self.names), "path": None if self.path is None else str(self.path),
                "files": self.files, "limit": self.limit, "lm_eval_version": self.lm_eval,
                "seed": lm_eval_seed(seed)}

    def check(self):
        """Resolve the names (a usage error listing close matches for an unknown one);
        returns the lm-eval `TaskManager` that knows them all."""
        return _manager_for(self)

    def runner(self, lm, *, batch_size: int, seed: int) -> TaskRunner:
        return TaskRunner(self, lm, batch_size=batch_size, seed=seed)


def task_eval(names: str | Sequence[str] | None, path: str | Path | None = None,
              limit: int | None = None) -> TaskEval | None:
    """The checked task options (None when no task is asked for): `names` a comma list or
    a sequence; `path` an existing directory; `limit` a positive integer. Needs lm-eval
    installed (a usage error naming `cwa[tasks]` otherwise)."""
    if isinstance(names, str):
        names = [n for n in (x.strip() for x in names.split(",")) if n]
    names = [str(n).strip() for n in (names or []) if str(n).strip()]
    if not names:
        if path is not None or limit is not None:
            flag = "--eval-tasks-path" if path is not None else "--eval-tasks-limit"
            raise UsageError(f"{flag} needs --eval-tasks NAMES (the lm-eval tasks to evaluate)")
        return None
    if len(set(names)) != len(names):
        raise UsageError(f"--eval-tasks {','.join(names)}: lists a task twice")
    if limit is not None:
        limit = C.check_positive("--eval-tasks-limit", limit, "a positive number of documents per task")
    files: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise UsageError(f"--eval-tasks-path {path}: {what}; give a directory of lm-eval task YAML files")
        files = task_files(path)
    return TaskEval(tuple(names), path, limit, files, lm_eval_version())


def task_files(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path` (recursively; hidden entries and `__pycache__`
    skipped), by relative POSIX path, sorted."""
    out: dict[str, str] = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not p.is_file():
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[rel.as_posix()] = h.hexdigest()
    return out


def lm_eval_seed(seed: int) -> int:
    """The seed handed to lm-eval: cwa seeds are 64-bit, NumPy's global seed is 32-bit."""
    return int(seed) % 2**32


# --------------------------------------------------------------------------- the registry

_MANAGERS: dict[tuple, Any] = {}  # one index per (path, its files, defaults): building the full one takes seconds


def _manager(spec: TaskEval, defaults: bool):
    key = (None if spec.path is None else str(spec.path.resolve()), tuple(spec.files.items()), defaults)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        with _quiet():
            _MANAGERS[key] = TaskManager(include_path=None if spec.path is None else str(spec.path),
                                         include_defaults=defaults)
    return _MANAGERS[key]


def _managers(spec: TaskEval) -> Iterator[Any]:
    """The local tasks alone first (indexing them takes a moment; lm-eval's own ~15,000
    take seconds), then lm-eval's registry with the local tasks added (which override
    built-in tasks of the same name, as in lm-eval)."""
    if spec.path is not None:
        yield _manager(spec, defaults=False)
    yield _manager(spec, defaults=True)


def _manager_for(spec: TaskEval):
    """The first manager that knows every name; else a usage error naming the unknown
    ones with their closest registered names."""
    manager = None
    for manager in _managers(spec):
        if all(n in manager.all_tasks for n in spec.names):
            return manager
    known = manager.all_tasks
    missing = [n for n in spec.names if n not in known]
    hints = "".join(did_you_mean(n, known, n=5) for n in missing) if len(missing) == 1 else "".join(
        f" {n}:{did_you_mean(n, known, n=5) or ' no close match.'}" for n in missing)
    where = f" or in --eval-tasks-path {spec.path}" if spec.path is not None else ""
    raise UsageError(
        f"--eval-tasks {','.join(missing)}: no such lm-eval task{'s' if len(missing) > 1 else ''} "
        f"(lm-eval {spec.lm_eval}{where}).{hints} (`lm-eval ls tasks` lists them)"
    )


def _load(spec: TaskEval) -> dict[str, Any]:
    """lm-eval's loaded tasks (`TaskManager.load`): from the first index that knows every
    name; a local-only index that cannot build a task (its YAML includes a built-in one)
    falls back to the full registry."""
    _manager_for(spec)  # unknown names: a usage error
    last: Exception | None = None
    for m in _managers(spec):
        if not all(n in m.all_tasks for n in spec.names):
            continue
        try:
            with _quiet():
                return m.load(list(spec.names))
        except Exception as e:  # lm-eval raises KeyError, ValueError, datasets' errors, ...
            last = e
    raise CwaError(f"--eval-tasks {','.join(spec.names)}: lm-eval could not load the task: "
                   f"{type(last).__name__}: {_one_line(last)}")


# --------------------------------------------------------------------------- evaluation


class TaskRunner:
    """Evaluates `lm.model` as it is at each call on the tasks of `spec` (loaded once)."""

    def __init__(self, spec: TaskEval, lm, *, batch_size: int, seed: int) -> None:
        from lm_eval.models.huggingface import HFLM

        self.spec, self.seed = spec, lm_eval_seed(seed)
        loaded = _load(spec)
        with _quiet():
            # The tokenizer is copied: HFLM sets a pad token on the one it gets.
            self._lm = HFLM(pretrained=lm.model, tokenizer=copy.deepcopy(lm.tokenizer), batch_size=batch_size)
        self._tasks = loaded
        for task in loaded["tasks"].values():  # as simple_evaluate: no few-shot unless the task asks
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        self.info: dict[str, Any] = {}

    def __call__(self) -> dict[str, dict[str, float | None]]:
        """{task: {metric: value, metric_stderr: value}} of the model now."""
        import random

        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        with _rng_kept(), _quiet():
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)
            for task in self._tasks["tasks"].values():
                task.set_fewshot_seed(seed=self.seed)  # the same few-shot examples for every condition
            try:
                out = evaluate(lm=self._lm, task_dict=self._tasks, limit=self.spec.limit,
                               cache_requests=False, log_samples=False)
            except Exception as e:
                raise CwaError(f"--eval-tasks {','.join(self.spec.names)}: lm-eval failed: "
                               f"{type(e).__name__}: {_one_line(e)}") from e
        if out is None:  # pragma: no cover - only on a non-zero rank
            raise CwaError("lm-eval returned no results (not rank 0)")
        if not self.info:
            self.info = {k.replace("-", "_"): out.get(k) for k in ("n-samples", "n-shot", "versions", "higher_is_better")}
        return metrics_of(out)


def metrics_of(out: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's `results` as {task: {metric: value}}: `acc,none` -> `acc`,
    `acc_stderr,none` -> `acc_stderr`, another filter's key kept whole; `N/A` -> None."""
    tasks: dict[str, dict[str, float | None]] = {}
    for task, entry in (out.get("results") or {}).items():
        m: dict[str, float | None] = {}
        for key, v in entry.items():
            if "," not in key:  # alias, name, sample_len, samples
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else key
            m[name] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
        tasks[task] = m
    return tasks


def _one_line(e: BaseException | None) -> str:
    text = " ".join(str(e).split()) if e is not None else ""
    return text[:300] + ("…" if len(text) > 300 else "")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's prints never reach stdout; its log lines and progress bars are kept off
    stderr too unless CWA_DEBUG is on."""
    if debug_enabled():
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Seeding lm-eval touches the global generators: put the caller's states back."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- summary


def summarize_tasks(conditions: list[dict], baseline: dict[str, dict]) -> dict[str, dict]:
    """Per summarized condition name (the conditions `cwa.perturbation.summarize` takes:
    the first top-K condition's seed and K), per task and metric (standard errors
    aside): a one-draw condition's `value`, `stderr` and `delta` (value − baseline); a
    control of R ≥ 2 draws its draws' `mean`, `std` (ddof 1), `delta` (mean − baseline)
    and `n_draws`."""
    import numpy as np

    first = next((c for c in conditions if c.get("name") == "topk" and c.get("tasks")), None)
    if first is None:
        return {}
    chosen = [c for c in conditions if c.get("seed") == first.get("seed") and c.get("k") == first.get("k")]
    out: dict[str, dict] = {}
    for name in dict.fromkeys(c.get("name") for c in chosen):
        group = [c.get("tasks") or {} for c in chosen if c.get("name") == name]
        block: dict[str, dict] = {}
        for task, base in baseline.items():
            per: dict[str, dict] = {}
            for metric in metric_names(base):
                vals = np.array([_num(g.get(task, {}).get(metric)) for g in group], dtype=np.float64)
                b = _num(base.get(metric))
                if len(vals) == 1:
                    per[metric] = {"value": float(vals[0]), "stderr": group[0].get(task, {}).get(stderr_key(metric)),
                                   "delta": float(vals[0] - b)}
                else:
                    with np.errstate(all="ignore"):
                        mean = float(np.mean(vals))
                        per[metric] = {"mean": mean, "std": float(np.std(vals, ddof=1)), "delta": mean - b,
                                       "n_draws": len(vals)}
            block[task] = per
        out[name] = block
    return out


def metric_names(metrics: dict[str, Any]) -> list[str]:
    """The metrics of one task's block, standard errors aside, in lm-eval's order."""
    return [m for m in metrics if not _is_stderr(m)]


def _is_stderr(key: str) -> bool:
    return key.split(",", 1)[0].endswith("_stderr")


def stderr_key(metric: str) -> str:
    """The key of a metric's standard error: `acc` -> `acc_stderr`,
    `exact_match,strict-match` -> `exact_match_stderr,strict-match` (lm-eval's form)."""
    name, _, filt = metric.partition(",")
    return f"{name}_stderr,{filt}" if filt else f"{name}_stderr"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def table(doc: dict[str, Any]) -> list[str]:
    """The task metrics of a results document as text lines for stderr: the baseline, then
    each summarized condition (value ± lm-eval's stderr; mean and sd over draws)."""
    base = (doc.get("baseline") or {}).get("tasks") or {}
    if not base:
        return []
    cols = [(t, m) for t, ms in base.items() for m in metric_names(ms)]
    head = [f"{t} {m}" for t, m in cols]
    rows = [["baseline", *[_pm(base[t].get(m), base[t].get(stderr_key(m))) for t, m in cols]]]
    for name, block in (doc.get("summary") or {}).items():
        tb = (block or {}).get("tasks") if isinstance(block, dict) else None
        if not tb:
            continue
        cells = []
        n = 1
        for t, m in cols:
            s = tb.get(t, {}).get(m, {})
            if "mean" in s:
                n = s.get("n_draws", n)
                cells.append(f"{_f(s['mean'])} (sd {_f(s.get('std'))})")
            else:
                cells.append(_pm(s.get("value"), s.get("stderr")))
        rows.append([name if n == 1 else f"{name} ({n} draws)", *cells])
    task_eval = doc.get("task_eval") or {}
    lim = task_eval.get("limit")
    title = f"lm-eval tasks ({'first ' + str(lim) + ' documents, ' if lim else ''}lm-eval {task_eval.get('lm_eval_version', '?')}):"
    widths = [max(len(r[i]) for r in [["condition", *head], *rows]) for i in range(len(cols) + 1)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(["condition", *head], widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _pm(v: Any, se: Any) -> str:
    return _f(v) if se is None else f"{_f(v)} ± {_f(se)}"


def attach(doc: dict[str, Any], spec: TaskEval, runner: TaskRunner, seed: int) -> None:
    """Add to a results document what the tasks need beyond the per-condition `tasks`:
    the `task_eval` record and, per summarized condition, `summary[name]["tasks"]`."""
    doc["task_eval"] = {**spec.record(seed), **runner.info}
    summary = doc.setdefault("summary", {})
    for name, block in summarize_tasks(doc.get("conditions") or [], (doc.get("baseline") or {}).get("tasks") or {}).items():
        if isinstance(summary.get(name), dict):
            summary[name]["tasks"] = block
