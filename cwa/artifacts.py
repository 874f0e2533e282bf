"""Artifacts: the files stages read and write. The only module that imports h5py and
safetensors.

- Scores (`scores/1`): a `.safetensors` file, one tensor per scored parameter, string
  metadata (SPEC list). Read one tensor (or one row-chunk of a tensor) at a time.
- Selections (`selection/1`), perturbation results (`perturbation/1`) and stability
  (`stability/1`): HDF5 files with root attributes, datasets, and a JSON document.

Integrity: every write goes to a temporary file in the target directory and is renamed
into place, so an interrupted stage leaves nothing half-written. HDF5 files carry a
512-byte user block holding a magic string and the SHA-256 of everything after it; the
hash is checked before h5py opens the file, so a corrupted file is a clean `ArtifactError`,
never a crash inside the HDF5 library. Scores carry per-tensor SHA-256s in `cwa.sha256`,
verified whenever a whole tensor is read. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa import __version__
from cwa.errors import ArtifactError, CwaError, UsageError

SCORES_SCHEMA = "scores/1"
SELECTION_SCHEMA = "selection/1"
PERTURBATION_SCHEMA = "perturbation/1"
STABILITY_SCHEMA = "stability/1"

_USERBLOCK = 512
_MAGIC = b"CWA-H5-SHA256\n"

DEFAULT_OUT_DIR = Path("cwa-out")


# --------------------------------------------------------------------------- helpers


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of obj (sorted keys)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def stage_fingerprint(stage: str, **parts: Any) -> str:
    """Fingerprint of a stage: its name, input fingerprints, model/data fingerprints and
    every option that changes the result (callers leave out batch size, device, verbosity)."""
    return stable_hash({"stage": stage, **parts})


def json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"; numpy scalars
    and arrays become Python values."""
    import math

    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if np is not None:
        if isinstance(obj, np.ndarray):
            return json_safe(obj.tolist())
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            obj = float(obj)
        if isinstance(obj, np.bool_):
            return bool(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` on success,
    delete it on any failure (including KeyboardInterrupt / SystemExit)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, dumps(obj) + "\n")


def default_output(stage: str, fingerprint: str, ext: str, out_dir: Path | None = None) -> Path:
    """Content-derived default output name under ./cwa-out/."""
    return Path(out_dir or DEFAULT_OUT_DIR) / f"{stage}-{fingerprint[:16]}{ext}"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected an artifact file")


# --------------------------------------------------------------------------- scores


def write_scores(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    *,
    dtype: str = "float32",
) -> Path:
    """Write a scores artifact. `tensors` in param order; `meta` values are JSON-encoded
    unless already strings. Adds schema, param order, per-tensor hashes, version, time."""
    import torch
    from safetensors.torch import save_file

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {}
    hashes = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu", tdtype).contiguous()
        out[name] = t
        hashes[name] = _tensor_sha(t)
    md = {k: v if isinstance(v, str) else json.dumps(json_safe(v)) for k, v in meta.items()}
    md.update(
        {
            "cwa.schema": SCORES_SCHEMA,
            "cwa.param_order": json.dumps(list(tensors)),
            "cwa.sha256": json.dumps(hashes),
            "cwa.version": __version__,
            "cwa.created": now_iso(),
            "cwa.score_dtype": dtype,
        }
    )
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=md)
    return Path(path)


def _tensor_sha(t) -> str:
    import torch

    b = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(b).hexdigest()


@dataclass
class ScoresFile:
    """A scores artifact opened lazily: `names` in param order, one tensor at a time."""

    path: Path
    meta: dict[str, str]
    names: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return self.meta.get("cwa.metric", "")

    @property
    def fingerprint(self) -> str:
        return self.meta.get("cwa.fingerprint", "")

    @property
    def model_fingerprint(self) -> str:
        return self.meta.get("cwa.model_fingerprint", "")

    def json_meta(self, key: str, default: Any = None) -> Any:
        v = self.meta.get(key)
        if v is None:
            return default
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n

    def get(self, name: str, verify: bool = True):
        """The whole tensor as float32 (hash-verified when the file carries hashes)."""
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{self.path}: cannot read tensor {name!r}: {e}") from None
        if verify:
            hashes = self.json_meta("cwa.sha256") or {}
            if name in hashes and _tensor_sha(t) != hashes[name]:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r} does not match its recorded SHA-256 "
                    "(file corrupted); recompute it with --force"
                )
        return t.to(torch.float32)

    def chunks(self, name: str, chunk_elems: int = 1 << 24) -> Iterator[tuple[int, Any]]:
        """Yield (flat_offset, float32 1-D tensor) pieces of a tensor, reading whole rows
        at a time so that peak memory is about `chunk_elems` values (not verified)."""
        import torch
        from safetensors import safe_open

        shape = self.shapes[name]
        n = self.numel(name)
        if len(shape) <= 1 or n <= chunk_elems:
            yield 0, self.get(name).reshape(-1)
            return
        row = n // shape[0]
        rows = max(1, chunk_elems // row)
        with safe_open(str(self.path), framework="pt") as f:
            sl = f.get_slice(name)
            for r0 in range(0, shape[0], rows):
                piece = sl[r0 : min(shape[0], r0 + rows)]
                yield r0 * row, piece.to(torch.float32).reshape(-1)


def _read_safetensors_header(path: Path) -> dict:
    """Parse and validate the safetensors header without loading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ArtifactError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: not a safetensors file (bad header)")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = v["data_offsets"]
            ok = 0 <= a <= b <= data_len
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{path}: tensor {k!r} lies outside the file (truncated?)")
    return header


def open_scores(path: str | os.PathLike) -> ScoresFile:
    """Open a scores artifact, checking its header and schema."""
    path = Path(path)
    _check_exists(path)
    header = _read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("cwa.schema") != SCORES_SCHEMA:
        got = meta.get("cwa.schema", "no cwa schema")
        raise ArtifactError(f"{path}: expected a scores artifact ({SCORES_SCHEMA}), found {got}")
    try:
        order = json.loads(meta["cwa.param_order"])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: scores artifact without a valid cwa.param_order") from None
    keys = {k for k in header if k != "__metadata__"}
    if set(order) != keys:
        raise ArtifactError(f"{path}: cwa.param_order does not match the stored tensors")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise ArtifactError(f"{path}: invalid safetensors file: {e}") from None
    shapes = {k: tuple(int(s) for s in header[k]["shape"]) for k in order}
    return ScoresFile(path=path, meta=dict(meta), names=list(order), shapes=shapes)


# --------------------------------------------------------------------------- HDF5


@dataclass
class H5Artifact:
    """An HDF5 artifact read whole: root attributes, datasets by path, JSON document."""

    path: Path
    schema: str
    attrs: dict[str, Any]
    arrays: dict[str, Any]
    doc: Any

    @property
    def fingerprint(self) -> str:
        return str(self.attrs.get("fingerprint", ""))


def write_h5(
    path: str | os.PathLike,
    schema: str,
    attrs: dict[str, Any],
    arrays: dict[str, Any],
    doc: Any = None,
) -> Path:
    """Write an HDF5 artifact atomically with the SHA-256 user block."""
    import h5py
    import numpy as np

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            f.attrs["cwa.schema"] = schema
            f.attrs["cwa.version"] = __version__
            f.attrs["cwa.created"] = now_iso()
            for k, v in attrs.items():
                if isinstance(v, dict | list | tuple) or v is None:
                    v = json.dumps(json_safe(v))
                f.attrs[k] = v
            if doc is not None:
                f.attrs["cwa.doc"] = dumps(doc, indent=None)
            for name, arr in arrays.items():
                arr = np.asarray(arr)
                if arr.dtype.kind in "UO":
                    arr = np.array([str(x) for x in arr.ravel()], dtype=h5py.string_dtype())
                f.create_dataset(name, data=arr)
        _seal_userblock(tmp)
    return Path(path)


def _seal_userblock(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(_USERBLOCK)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    block = (_MAGIC + h.hexdigest().encode() + b"\n").ljust(_USERBLOCK, b"\0")
    with open(path, "rb+") as f:
        f.write(block)


def _verify_userblock(path: Path) -> None:
    with open(path, "rb") as f:
        block = f.read(_USERBLOCK)
        if len(block) < _USERBLOCK or not block.startswith(_MAGIC):
            raise ArtifactError(f"{path}: not a cwa HDF5 artifact")
        want = block[len(_MAGIC) : len(_MAGIC) + 64].decode("ascii", "replace")
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise ArtifactError(
            f"{path}: content does not match its SHA-256 (corrupted or truncated); "
            "recompute it with --force"
        )


def read_h5(path: str | os.PathLike, expect: str | tuple[str, ...] | None = None) -> H5Artifact:
    """Verify and read a whole HDF5 artifact."""
    import h5py
    import numpy as np

    path = Path(path)
    _check_exists(path)
    _verify_userblock(path)
    arrays: dict[str, Any] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr(v) for k, v in f.attrs.items()}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    a = obj[()]
                    if obj.dtype.kind == "O" or h5py.check_string_dtype(obj.dtype):
                        a = np.array([x.decode() if isinstance(x, bytes) else x for x in np.ravel(a)])
                    arrays[name] = a

            f.visititems(visit)
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable HDF5 file: {e}") from None
    schema = str(attrs.pop("cwa.schema", ""))
    if expect is not None:
        want = (expect,) if isinstance(expect, str) else expect
        if schema not in want:
            raise ArtifactError(
                f"{path}: expected a {' or '.join(want)} artifact, found {schema or 'no schema'}"
            )
    doc = attrs.pop("cwa.doc", None)
    if isinstance(doc, str):
        doc = json.loads(doc)
    return H5Artifact(path=path, schema=schema, attrs=attrs, arrays=arrays, doc=doc)


def _attr(v: Any) -> Any:
    import numpy as np

    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def artifact_schema(path: str | os.PathLike) -> str:
    """The schema of any cwa artifact (for dispatch), raising ArtifactError if none."""
    path = Path(path)
    _check_exists(path)
    with open(path, "rb") as f:
        start = f.read(len(_MAGIC))
    if start == _MAGIC:
        return read_h5(path).schema
    if path.suffix == ".json":
        raise ArtifactError(f"{path}: a JSON report, not a stage artifact")
    return open_scores(path).meta["cwa.schema"]


# --------------------------------------------------------------------------- selections


def write_selection(
    path: str | os.PathLike,
    sel: Any,
    *,
    fingerprint: str,
    provenance: dict[str, Any],
    extra_arrays: dict[str, Any] | None = None,
    doc: Any = None,
) -> Path:
    """Write a `cwa.ranking.Selection` as a `selection/1` HDF5 artifact."""
    import numpy as np

    arrays: dict[str, Any] = {"params": np.array(sel.params, dtype=object)}
    for d, draw in enumerate(sel.draws):
        arrays[f"draws/{d}/param_index"] = np.asarray(draw.param_index, dtype=np.int32)
        arrays[f"draws/{d}/flat_index"] = np.asarray(draw.flat_index, dtype=np.int64)
        arrays[f"draws/{d}/score"] = np.asarray(draw.score, dtype=np.float32)
    arrays.update(extra_arrays or {})
    attrs = {
        "kind": sel.kind,
        "k": int(sel.k),
        "mode": sel.mode,
        "metric": sel.metric,
        "rank_by": sel.rank_by,
        "seed": int(sel.seed),
        "ties_at_k": int(sel.ties_at_k),
        "n_draws": len(sel.draws),
        "fingerprint": fingerprint,
        "provenance": provenance,
        "info": sel.info,
    }
    return write_h5(path, SELECTION_SCHEMA, attrs, arrays, doc=doc)


def read_selection(path: str | os.PathLike):
    """Read a selection artifact: returns (Selection, H5Artifact)."""
    from cwa.ranking import Draw, Selection

    art = read_h5(path, SELECTION_SCHEMA)
    a = art.attrs
    try:
        n = int(a["n_draws"])
        draws = [
            Draw(
                param_index=art.arrays[f"draws/{d}/param_index"],
                flat_index=art.arrays[f"draws/{d}/flat_index"],
                score=art.arrays[f"draws/{d}/score"],
            )
            for d in range(n)
        ]
        sel = Selection(
            kind=str(a["kind"]),
            k=int(a["k"]),
            mode=str(a["mode"]),
            metric=str(a["metric"]),
            rank_by=str(a["rank_by"]),
            seed=int(a["seed"]),
            ties_at_k=int(a["ties_at_k"]),
            params=[str(p) for p in art.arrays["params"]],
            draws=draws,
            info=json.loads(a.get("info", "{}")),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{art.path}: malformed selection artifact ({e})") from None
    return sel, art


def provenance(art: H5Artifact) -> dict[str, Any]:
    p = art.attrs.get("provenance", "{}")
    try:
        return json.loads(p) if isinstance(p, str) else dict(p)
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------- cache


def cached(path: Path, fingerprint: str, opener: Callable[[Path], str]) -> bool:
    """True when `path` exists, opens cleanly and carries `fingerprint`."""
    if not path.exists():
        return False
    try:
        return opener(path) == fingerprint
    except CwaError:
        return False


def scores_fingerprint_of(path: Path) -> str:
    return open_scores(path).fingerprint


def h5_fingerprint_of(path: Path) -> str:
    return read_h5(path).fingerprint


def resolve_output(
    output: str | os.PathLike | None, stage: str, fingerprint: str, ext: str
) -> Path:
    if output is None:
        return default_output(stage, fingerprint, ext)
    p = Path(output)
    if p.exists() and p.is_dir():
        raise UsageError(f"-o {p}: is a directory; give a file path ending in {ext}")
    return p
