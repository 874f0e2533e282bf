"""Export one perturbation condition as a standard Hugging Face checkpoint
(`cwa perturb --save-model DIR --condition NAME`).

What is written
---------------
The model's own `save_pretrained` (safetensors weights, config.json, generation config)
and the tokenizer's `save_pretrained`, while the condition is applied in place — the
same entries, the same values (the noise of `gauss_noise` / `bit_flip` is regenerated from
the condition's own stream, so it is bit for bit the evaluated one), in the dtype the
condition ran in (`--dtype`; config.json's `dtype` says so). The entries are then
restored and compared bit for bit, as after every condition; the directory is built in a
temporary sibling and renamed into place, so an interrupted export leaves nothing.

Identity, both ways
-------------------
- The results record the saved model under `saved_models` (results document and JSON):
  its path, its model fingerprint — `cwa.models.checkpoint_fingerprint` of the saved
  files, the value `cwa eval --model DIR` reports as `model_fingerprint` — the
  condition's name and index, and the condition fingerprint.
- The saved directory holds `cwa_condition.json` (not a weight or config file, so not
  part of its own fingerprint): the condition fingerprint, the results fingerprint, the
  condition's record (method, scale, n_changed, nll, delta_nll, ...), the selection's and
  its scores' fingerprints, the source model and its fingerprint, the evaluation windows,
  and the saved model's own fingerprint.
- The condition fingerprint is `stage_fingerprint("condition", results=..., condition=...,
  index=...)`; the results fingerprint is known before any evaluation, so neither side
  depends on the other's timing.

`cwa eval --model DIR` (same `--dtype`, data and `--eval-samples`) evaluates the same
windows with the same weights and reproduces the condition's NLL exactly
(tests/integration/test_save_model.py).

Condition names
---------------
A condition is named by its selection's kind (`topk`, `random_k`, `bottom_k`, ...),
`@S` when several selections of the run have that kind (S: the selection's position on the
command line, from 0), and `:D` when its selection has several draws (D: the draw):
`topk`, `bottom_k`, `random_k:7`, `topk@1`.

Refused before any work: a `--condition` that is not a condition of the run (the error
lists them), no `--condition` when the run has several, a directory that exists and is not
empty (or is a file or link), one equal to or inside the input model's directory (an output
never replaces an input), and one that holds another output of the command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cwa.errors import ArtifactError, CwaError, UsageError

CONDITION_FILE = "cwa_condition.json"
CONDITION_SCHEMA = "cwa-condition/1"


# --------------------------------------------------------------------------- names


def condition_labels(sels: list) -> list[tuple[str, int, int]]:
    """(name, selection index, draw) of every condition, in the perturb stage's order."""
    kinds: dict[str, int] = {}
    for s in sels:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    out = []
    for si, s in enumerate(sels):
        base = s.kind + (f"@{si}" if kinds[s.kind] > 1 else "")
        for d in range(len(s.draws)):
            out.append((base + (f":{d}" if len(s.draws) > 1 else ""), si, d))
    return out


def describe_labels(labels: list[tuple[str, int, int]]) -> str:
    """The names for a one-line message, draws as ranges (`random_k:0..19`)."""
    groups: dict[str, list[int]] = {}  # base name -> draws (plain names: [])
    for name, _, d in labels:
        base, sep, _ = name.rpartition(":")
        draws = groups.setdefault(base if sep else name, [])
        if sep:
            draws.append(d)
    return ", ".join(
        b if not ds else f"{b}:{ds[0]}" if len(ds) == 1 else f"{b}:{ds[0]}..{ds[-1]}" for b, ds in groups.items()
    )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ExportPlan:
    """Which condition goes where (checked before any work)."""

    directory: Path
    condition: str
    index: int  # the condition's position in the results
    selection: int
    draw: int


def plan_export(lm, sels: list, save_model, condition: str | None, outputs=()) -> ExportPlan | None:
    """The export `--save-model DIR --condition NAME` asks for, every refusal checked
    now (UsageError); None without `--save-model`."""
    if save_model is None:
        if condition is not None:
            raise UsageError(f"--condition {condition}: names the condition --save-model writes; give --save-model DIR too")
        return None
    labels = condition_labels(sels)
    names = [n for n, _, _ in labels]
    if condition is None:
        if len(labels) != 1:
            raise UsageError(
                f"--save-model: this run has {len(labels)} conditions; pick one with --condition "
                f"({describe_labels(labels)})"
            )
        i = 0
    elif condition in names:
        i = names.index(condition)
    else:
        raise UsageError(
            f"--condition {condition}: not a condition of this run; choose one of {describe_labels(labels)}"
        )
    directory = check_model_dir(Path(save_model), lm, outputs)
    _, si, d = labels[i]
    return ExportPlan(directory, names[i], i, si, d)


def _input_dirs(lm) -> list[Path]:
    """The directories the model was read from (the embedded assets, a local folder, a hub
    snapshot; a .gguf's own file)."""
    from cwa.models import embedded_dir

    out = []
    if lm.source == "embedded":
        out.append(embedded_dir())
    elif lm.source in ("local", "gguf", "peft"):  # peft: the adapter directory
        out.append(Path(lm.name))
    ck = getattr(lm, "_checkpoint", None)
    if ck is not None:
        out.append(Path(ck))
    return out


def _inside(p: Path, d: Path) -> bool:
    p, d = p.resolve(), d.resolve()
    return p == d or d in p.parents


def check_model_dir(directory: Path, lm, outputs=()) -> Path:
    """`--save-model DIR`: a new or empty directory outside the input model and holding no
    other output of the command; its file system can be written. Returns DIR."""
    from cwa import artifacts as A

    label = f"--save-model {directory}"
    if directory.is_symlink():
        raise UsageError(f"{label}: is a symbolic link; give the path of a new or empty directory")
    if directory.exists():
        if not directory.is_dir():
            raise UsageError(f"{label}: exists and is not a directory; give a new or empty directory")
        if any(directory.iterdir()):
            raise UsageError(f"{label}: exists and is not empty; give a new or empty directory")
    for d in _input_dirs(lm):
        if _inside(directory, d) or _inside(d, directory):
            raise UsageError(
                f"{label}: is {'inside' if _inside(directory, d) else 'a parent of'} the input model ({d}); "
                "an output never replaces an input — choose a directory outside it"
            )
    for o in outputs:
        if o is not None and _inside(Path(o), directory):
            raise UsageError(f"{label}: would hold the output {o}; give the saved model a directory of its own")
    A.check_output(directory / "config.json", "--save-model", artifact=False)  # parents, writable
    return directory


# --------------------------------------------------------------------------- export


def save_condition(lm, sels: list, pplan, res, xp: ExportPlan, results_path=None) -> dict[str, Any]:
    """Apply condition `xp` in place, save model + tokenizer to `xp.directory`, restore
    and verify; record the saved model in `res.doc["saved_models"]` and return that
    record. `pplan` is the perturb stage's plan (method and options), `res` its results
    (computed now or read from a cache hit), `results_path` where they are written."""
    from cwa import __version__
    from cwa import artifacts as A
    from cwa.models import checkpoint_fingerprint

    cond = res.conditions[xp.index]
    sel = sels[xp.selection]
    final = xp.directory
    final.parent.mkdir(parents=True, exist_ok=True)
    A.check_free_space(final / "model.safetensors", _weight_bytes(lm.model), f"--save-model {final}",
                       "choose a directory on a file system with room")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name[:100]}.", suffix=".cwa-tmp", dir=final.parent))
    try:
        _write_checkpoint(lm, sel, pplan, xp, cond, tmp)
        fp = checkpoint_fingerprint(tmp)
        cfp = A.stage_fingerprint("condition", results=res.fingerprint, condition=xp.condition, index=xp.index)
        meta = {
            "schema": CONDITION_SCHEMA, "condition": xp.condition, "condition_index": xp.index,
            "condition_fingerprint": cfp, "results_fingerprint": res.fingerprint,
            "results": None if results_path is None else str(results_path),
            "record": cond, "model_fingerprint": fp, "dtype": lm.dtype,
            "selection": {
                "path": None if sel.path is None else str(sel.path), "fingerprint": sel.fingerprint,
                "kind": sel.kind, "k": sel.k, "mode": sel.mode, "metric": sel.metric, "draw": xp.draw,
                "scores_fingerprint": sel.provenance.get("scores_fingerprint"),
            },
            "source_model": {"name": lm.name, "fingerprint": lm.fingerprint, "revision": lm.revision,
                             "commit": lm.commit},
            "eval": {"data_fingerprint": res.attrs.get("data_fingerprint"), "source": res.doc.get("eval_data"),
                     "windows": res.doc.get("eval_windows"), "nll": cond.get("nll"),
                     "baseline_nll": res.baseline.get("nll")},
            "cwa_version": __version__, "created": A.now_iso(),
        }
        A.write_json(tmp / CONDITION_FILE, meta)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {"path": str(final), "model_fingerprint": fp, "condition": xp.condition,
              "condition_index": xp.index, "condition_fingerprint": cfp, "dtype": lm.dtype}
    saved = [s for s in res.doc.get("saved_models") or [] if s.get("path") != str(final)]
    res.doc["saved_models"] = [*saved, record]
    return record


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 20)


def _write_checkpoint(lm, sel, pplan, xp: ExportPlan, cond: dict, tmp: Path) -> None:
    """save_pretrained with the condition applied; the restore is checked bit for bit,
    and the re-applied condition must change what the evaluated one changed."""
    from cwa.perturbation import perturbed

    named = dict(lm.model.named_parameters())
    params = [named[n] for n in sel.params]
    try:
        with perturbed(params, sel.draws[xp.draw], pplan.method, scale=pplan.scale, prob=pplan.prob,
                       bit=pplan.bit, seed=pplan.seed, draw_index=xp.index) as rec:
            if rec.n_changed != cond.get("n_changed") or not _same(rec.delta_w_norm, cond.get("delta_w_norm")):
                raise ArtifactError(
                    f"--save-model: condition {xp.condition} re-applied changes {rec.n_changed} weights "
                    f"(‖Δw‖ {rec.delta_w_norm:.6g}) but the results record {cond.get('n_changed')} "
                    f"({cond.get('delta_w_norm')}); they are not the same condition — nothing saved"
                )
            lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise CwaError(f"--save-model {xp.directory}: cannot write the model ({e.strerror or e}); nothing was saved") from None
    if not rec.restored:
        raise ArtifactError(
            f"--save-model: condition {xp.condition} was not restored bit for bit after saving; "
            "the model in memory is not the original — nothing saved"
        )


def _same(a, b) -> bool:
    import math

    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished directory onto DIR (absent or empty: rename replaces an empty
    directory on POSIX; elsewhere the empty one is removed first)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final.is_dir() and not any(final.iterdir())):
            raise
        with contextlib.suppress(OSError):
            final.rmdir()
        os.replace(tmp, final)


def read_condition(directory) -> dict[str, Any]:
    """The `cwa_condition.json` of a saved model (ArtifactError when absent or invalid)."""
    import json

    p = Path(directory) / CONDITION_FILE
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{p}: cannot read the condition record ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != CONDITION_SCHEMA:
        raise ArtifactError(f"{p}: not a {CONDITION_SCHEMA} record")
    return doc
