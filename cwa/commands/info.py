"""`cwa info`: a readable summary on stdout of an artifact, a JSON report or a model.

A model (a hub id, an HF directory, a PEFT adapter directory, a `.gguf` file, or
`embedded`) is listed parameter by parameter, under the names `named_parameters()` gives,
which are the names `--include` and `--exclude` match, with their shapes and stored
dtypes. The weights are never loaded: the architecture is built from the config on
PyTorch's `meta` device (shapes, no storage), and the stored dtypes come from the
safetensors headers or the GGUF tensor table (read through a memory map). A hub id is
looked up in the local cache only, never downloaded. Pickle checkpoints are not opened (their dtypes show as `?`). An adapter is
described as what `--model` loads: its base model's parameters (the adapter's update is
merged into them), with the fingerprint of base plus adapter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from cwa.commands import _options as O
from cwa.commands.common import read_paths

_EMBEDDED = ("embedded", "cwa-embedded-gpt2")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_ARTIFACT_SUFFIXES = (".h5", ".safetensors", ".json", ".gguf", ".csv", ".png")
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def info_cmd(
    targets: Annotated[
        list[str],
        typer.Argument(help="Artifacts (scores, selection, results, stability), JSON reports (cwa eval, "
                       "perturbation_results.json), models (hub id in the local cache, HF directory, "
                       "PEFT adapter directory, .gguf, embedded), or - for paths on stdin.", metavar="TARGET..."),
    ],
    revision: O.RevisionOpt = None,
    trust_remote_code: O.TrustOpt = False,
) -> None:
    """Show what an artifact, a JSON report or a model holds.

    An artifact or report: its schema, provenance and a summary of its contents. A model:
    every parameter with its shape, stored dtype and whether it is scored by default (2+
    dimensions), the names that --include and --exclude patterns match, without loading
    the weights.

    Examples:

      cwa info cwa-out/scores-1a2b3c4d5e6f7a8b.safetensors

      cwa info outputs/x/artifacts/topk_seed0.h5 outputs/x/perturbation_results.json

      cwa info embedded

      cwa info gpt2 --revision main
    """
    for target in read_paths(targets):
        if _is_model(target):
            d = describe_model(str(target), revision=revision, trust_remote_code=trust_remote_code)
        else:
            d = _describe_artifact(target)
        lines = [f"{target}  schema={d['schema']}", *(f"  {k}: {v}" for k, v in d["fields"])]
        if d["table"]["rows"]:
            lines += table_lines(d["table"]["columns"], d["table"]["rows"])
        lines += [f"  {line}" for line in d["notes"]]
        print("\n".join(lines), flush=True)


def table_lines(columns, rows) -> list[str]:
    """A plain table: left-aligned columns two spaces apart under a rule. No cell is ever
    cut or wrapped (a parameter name must stay whole to be pasted into a glob), so a long
    name widens its column rather than being shortened to the terminal."""
    cells = [tuple(map(str, columns)), *(tuple(map(str, r)) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return [line(cells[0]), "  " + "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, cells[1:])]


def _describe_artifact(target: Path) -> dict[str, Any]:
    """`cwa.artifacts.describe`, with a hint when the file is a model's weights."""
    from cwa import artifacts as A
    from cwa.errors import ArtifactError

    try:
        return A.describe(target)
    except ArtifactError as e:
        if target.suffix == ".safetensors" and (target.parent / "config.json").is_file() and "no cwa schema" in str(e):
            raise ArtifactError(f"{e}; it looks like a model's weights: cwa info {target.parent} lists them") from None
        raise


def _is_model(target: Path) -> bool:
    """A model, not an artifact: a directory, a `.gguf` file, `embedded`, or a name that is
    no file and looks like a hub id (NAME or ORG/NAME, without an artifact's suffix)."""
    s = str(target)
    if target.exists():
        return target.is_dir() or target.suffix == ".gguf"
    if s in _EMBEDDED:
        return True
    return target.suffix not in _ARTIFACT_SUFFIXES and _HUB_ID.fullmatch(s) is not None


def describe_model(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """`cwa info MODEL`, in the shape of `cwa.artifacts.describe`: schema "model", fields,
    a table of every parameter (param, shape, numel, stored dtype, scored by default) and
    notes. Nothing of the weights is loaded (see the module docstring)."""
    from cwa.errors import CwaError

    where = _locate(model, revision)
    config = _config(model, where, trust_remote_code)
    params, aliases, arch = _meta_parameters(model, config, trust_remote_code)
    stored, stored_from = _stored_dtypes(where, config, params)
    try:
        fingerprint = _fingerprint(where) or "unknown (the weights are not there)"
    except CwaError as e:
        fingerprint = f"unreadable ({e})"

    rows, n_scored, numel_scored, unmatched = [], 0, 0, 0
    for name, (shape, numel) in params.items():
        dtype = stored.get(name, "?")
        unmatched += dtype == "?"
        scored = len(shape) >= 2
        n_scored += scored
        numel_scored += numel if scored else 0
        rows.append((name, "x".join(map(str, shape)) or "scalar", str(numel), dtype, "yes" if scored else ""))
    counts: dict[str, int] = {}
    for d in stored.values():
        counts[d] = counts.get(d, 0) + 1
    fields = [("model", where["name"]), ("source", where["kind"]), ("path", str(where["path"]))]
    if where.get("adapter_commit"):
        fields.append(("commit", where["adapter_commit"]))
    if where.get("adapter"):
        fields.append(("base model", where["base"]))
    if where.get("commit"):
        fields.append(("base commit" if where.get("adapter") else "commit", where["commit"]))
    fields += [
        ("architecture", arch), ("model_type", str(getattr(config, "model_type", None))),
        ("fingerprint", fingerprint),
        ("parameters", f"{sum(n for _, n in params.values()):,} in {len(params)} tensors"),
        ("scored by default", f"{numel_scored:,} in {n_scored} tensors (2+ dimensions)"),
        ("stored dtypes", ", ".join(f"{d} x{n}" for d, n in sorted(counts.items())) or "unknown"),
    ]
    notes = [f"tied: {', '.join(a)} share {name} (scored once, as {name}; a glob on any of the names matches)"
             for name, a in aliases.items()]
    notes.append("scored: the default set; --include replaces it, --exclude removes matches (globs on these names)")
    if where.get("adapter"):
        notes.append("adapter: loaded, its update is merged into the base's weights: the parameters, shapes and "
                     "stored dtypes are the base's (the adapter's own factors are not parameters)")
    if unmatched:
        notes.append(f"{unmatched} parameter(s) with stored dtype '?': {stored_from}")
    return {"schema": "model", "fields": fields,
            "table": {"columns": ("param", "shape", "numel", "stored", "scored"), "rows": rows}, "notes": notes}


def _locate(model: str, revision: str | None) -> dict[str, Any]:
    """kind (embedded, local directory, gguf, hub cache), path and name of a --model value."""
    from cwa import models
    from cwa.errors import ArtifactError, CwaError, UsageError

    p = Path(model)
    kind = ("gguf" if p.suffix == ".gguf" else "local directory") if p.exists() else None
    if kind is None and model in _EMBEDDED:
        kind = "embedded"
    if kind != "hub" and kind is not None and revision is not None:
        raise UsageError(f"--revision {revision}: applies to hub ids only, and {model} is {kind}; drop --revision")
    if kind == "embedded":
        from cwa import assets

        assets.verify_model()
        return {"kind": kind, "name": assets.EMBEDDED_MODEL_NAME, "path": models.embedded_dir(), "folder": models.embedded_dir()}
    if kind == "gguf":
        if not p.is_file():
            raise ArtifactError(f"{model}: is not a regular file, expected a .gguf model")
        return {"kind": kind, "name": model, "path": p, "gguf": p}
    if kind == "local directory":
        if (p / ".cwa-run").exists() or (p / "experiment_manifest.json").exists():
            raise UsageError(
                f"{model}: a cwa run output directory, not a model; pass its files "
                f"(e.g. {p / 'perturbation_results.json'}, {p / 'artifacts'}/*)"
            )
        if not (p / "config.json").is_file() and (p / models.ADAPTER_CONFIG).is_file():
            return _locate_adapter(model, p)
        if not (p / "config.json").is_file():
            raise CwaError(f"{model}: not a model directory (no config.json) and not an artifact file")
        return {"kind": kind, "name": model, "path": p, "folder": p}
    found = models.hub_snapshot(model, revision)
    if found is None:
        refs = models.hub_refs(model)
        if revision is not None and refs is not None:
            raise UsageError(
                f"--revision {revision}: not in the local cache of {model} (cached: {', '.join(refs) or 'none'})"
            )
        raise ArtifactError(
            f"{model}: no such file, and no hub model of that name is in the local cache "
            f"(cwa info never downloads: hf download {model})"
        )
    commit, snap = found
    if not (snap / "config.json").is_file() and (snap / models.ADAPTER_CONFIG).is_file():
        return {**_locate_adapter(model, snap), "adapter_commit": commit}  # a cached adapter repository
    return {"kind": "hub cache", "name": model, "path": snap, "folder": snap, "commit": commit}


def _locate_adapter(model: str, p: Path) -> dict[str, Any]:
    """A PEFT adapter directory: its base model, located like any model, with the adapter
    noted (what `--model` loads is the base with the adapter's update merged in, under the
    base's parameter names; peft is not needed to describe it)."""
    from cwa import models
    from cwa.errors import CwaError

    base, rev = models.adapter_base_ref(p, model)
    try:
        where = _locate(base, rev)
    except CwaError as e:
        raise type(e)(f"{model}: its base model {base} ({models.ADAPTER_CONFIG}) cannot be read: {e}") from None
    if "adapter" in where:
        raise CwaError(f"{model}: its base model {base} is itself an adapter; merge that one first")
    return {**where, "kind": f"PEFT adapter on {where['kind']}", "name": model, "path": p,
            "adapter": p, "base": f"{where['name']} ({where['path']})"}


def _config(model: str, where: dict[str, Any], trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from cwa.errors import CwaError

    hf_logging.set_verbosity_error()
    try:
        if "gguf" in where:
            g = where["gguf"]
            return AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name, trust_remote_code=trust_remote_code)
        return AutoConfig.from_pretrained(str(where["folder"]), trust_remote_code=trust_remote_code)
    except Exception as e:  # the loaders raise many types (OSError, ValueError, ...)
        raise CwaError(_load_error(model, e, "read its config")) from None


def _meta_parameters(model: str, config, trust_remote_code: bool):
    """{name: (shape, numel)} in `named_parameters()` order, {name: its tied aliases}, and
    the architecture's class name, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from cwa.errors import CwaError

    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CwaError(_load_error(model, e, "build its architecture")) from None
    params = {n: (tuple(p.shape), p.numel()) for n, p in m.named_parameters()}
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for n, p in m.named_parameters(remove_duplicate=False):
        if id(p) in first and first[id(p)] != n:
            aliases.setdefault(first[id(p)], []).append(n)
        first.setdefault(id(p), n)
    return params, aliases, type(m).__name__


def _stored_dtypes(where: dict[str, Any], config, params) -> tuple[dict[str, str], str]:
    """{parameter name: stored dtype} as far as the checkpoint names them, and why the
    others are unknown."""
    from cwa import models

    if "gguf" in where:
        return _gguf_dtypes(where["gguf"], config, params)
    kind, files = models.weight_files(where["folder"])
    if kind is None:
        return {}, "no weight files in the directory (a hub snapshot without its weights?)"
    if kind == "pickle":
        return {}, "the weights are pickle files, which cwa never opens"
    header: dict[str, str] = {}
    for f in files:
        for key, (_, dtype) in models._safetensors_header(f).items():
            header[key] = _DTYPE_NAMES.get(dtype, dtype)
    prefix = getattr(config, "base_model_prefix", None) or ""
    out = {}
    for name in params:
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in header:
                out[name] = header[key]
                break
    return out, "the checkpoint stores them under other names (renamed when loaded)"


def _gguf_dtypes(path: Path, config, params) -> tuple[dict[str, str], str]:
    """Stored types from the GGUF tensor table (F32, F16, Q8_0, ...), matched to the HF
    names by gguf's own name map (llama.cpp's `blk.N.attn_q.weight` for
    `model.layers.N.self_attn.q_proj.weight`)."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        types = {t.name: _DTYPE_NAMES.get(t.tensor_type.name, t.tensor_type.name) for t in reader.tensors}
        arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
        names = gguf.get_tensor_name_map(arch_id, int(getattr(config, "num_hidden_layers", 0) or 0))
    except Exception:  # no gguf package, an architecture it has no name map for, a damaged table
        return {}, "the GGUF tensor table could not be matched to the model's names"
    out = {}
    for name in params:
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if g in types:
            out[name] = types[g]
    return out, "the GGUF stores them under names gguf's name map does not know"


def _fingerprint(where: dict[str, Any]) -> str | None:
    """The model fingerprint artifacts record (`cwa.model_fingerprint`): hashed once per
    file, then memoized (see `cwa.models`)."""
    from cwa import models

    if "gguf" in where:
        base = models.gguf_fingerprint(where["gguf"])
    else:
        base = models.checkpoint_fingerprint(where["folder"], where.get("commit"))
    if "adapter" not in where or base is None:
        return base
    weights = models.adapter_weights_file(where["adapter"])  # hashed, never unpickled
    return None if weights is None else models.adapter_fingerprint(where["adapter"], base, weights)


def _load_error(model: str, e: Exception, what: str) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in msg or "custom code" in msg:
        return (f"{model}: its code would have to run to {what}; pass --trust-remote-code only if you "
                "trust its source")
    return f"{model}: cannot {what} ({msg[:200]})"
