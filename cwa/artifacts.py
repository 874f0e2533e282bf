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

_SCORE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # safetensors names

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
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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

    if not t.numel():
        return hashlib.sha256(b"").hexdigest()
    # hash the bytes in place (a uint8 view), never a copy of a possibly huge tensor
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# safetensors dtype names -> torch dtype names (scores are float32, bfloat16 or float16)
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_READ_BLOCK = 64 << 20  # bytes per read() call
# Largest piece `chunks()` yields. Measured ranking 1e9 float32 scores (top-K + statistics,
# benchmarks/RESULTS.md): 2^20-entry pieces (4 MB) run the top-K 2x faster than 2^24 ones
# (cache-sized temporaries, cheaper first selections) and keep the consumer's temporaries
# small; statistics take the same time.
PIECE_ELEMS = 1 << 20
# RSS growth (since the last release) after which `chunks()` hands freed heap memory back
# to the OS (see `_ReleaseFreedHeap`).
TRIM_BUDGET_BYTES = 128 << 20


class _ReleaseFreedHeap:
    """Hand freed heap memory back to the OS once the RSS has grown past a budget.

    A consumer of `chunks()` allocates and frees temporaries of a chunk's size over and
    over. glibc serves blocks under its (self-raising, up to 32 MB) mmap threshold from
    the heap, and small long-lived objects allocated in between pin the freed space, so
    the resident set creeps up by megabytes per chunk although live memory stays flat
    (measured: 260 MB -> 700 MB over 100 chunks of a ranking pass). `malloc_trim(0)`
    returns those free pages. It is called only when the RSS has grown by
    `TRIM_BUDGET_BYTES` over the RSS after the previous trim (process-wide, so the floor
    does not ratchet up from one tensor's stream to the next); memory the process really
    keeps raises the floor after one trim. A no-op where glibc is not the allocator.
    """

    trim = None
    page = 4096
    floor: int | None = None

    @classmethod
    def _init(cls) -> None:
        cls.trim = False
        if not os.path.exists("/proc/self/statm"):
            return
        try:
            import ctypes

            cls.trim = ctypes.CDLL("libc.so.6").malloc_trim
            cls.page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            cls.trim = False

    @classmethod
    def _rss(cls) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * cls.page
        except (OSError, ValueError, IndexError):
            return None

    @classmethod
    def check(cls) -> None:
        if cls.trim is None:
            cls._init()
        if not cls.trim:
            return
        rss = cls._rss()
        if rss is None:
            return
        if cls.floor is None or rss < cls.floor:
            cls.floor = rss
        elif rss - cls.floor > TRIM_BUDGET_BYTES:
            cls.trim(0)
            cls.floor = cls._rss() or rss


@dataclass
class ScoresFile:
    """A scores artifact opened lazily: `names` in param order, one tensor at a time.

    Tensors are read with explicit file reads at the offsets of the safetensors header
    into freshly allocated buffers, never through a memory map: pages of a mapped file
    that have been touched count in the process's resident set until it is unmapped, so
    streaming a 4 GB file through a map looks like a 4 GB process. `chunks()` therefore
    holds one chunk at a time, and `get()` exactly one tensor.
    """

    path: Path
    meta: dict[str, str]
    names: list[str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # name -> (safetensors dtype, first byte, end byte) in the file; empty: use safe_open
    layout: dict[str, tuple[str, int, int]] = field(default_factory=dict, repr=False)
    _verified: set[str] = field(default_factory=set, repr=False)
    _hashes: dict[str, str] | None = field(default=None, repr=False)

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

    def _hash_of(self, name: str) -> str | None:
        if self._hashes is None:
            h = self.json_meta("cwa.sha256") or {}
            self._hashes = h if isinstance(h, dict) else {}
        return self._hashes.get(name)

    def _check_hash(self, name: str, digest: str) -> None:
        if digest != self._hash_of(name):
            raise ArtifactError(
                f"{self.path}: tensor {name!r} does not match its recorded SHA-256 "
                "(file corrupted); recompute it with --force"
            )
        self._verified.add(name)

    def _readable(self, name: str) -> bool:
        return name in self.layout and self.layout[name][0] in _ST_DTYPES

    def _read(self, f, name: str, start: int, count: int):
        """`count` stored values of `name` from flat index `start`, in the stored dtype."""
        import torch

        st_dtype, begin, end = self.layout[name]
        dtype = getattr(torch, _ST_DTYPES[st_dtype])
        out = torch.empty(count, dtype=dtype)
        buf = memoryview(out.view(torch.uint8).numpy())
        item = out.element_size()
        off = begin + start * item
        if off + count * item > end:
            raise ArtifactError(f"{self.path}: read past the end of tensor {name!r}")
        f.seek(off)
        got = 0
        while got < len(buf):
            n = f.readinto(buf[got : got + _READ_BLOCK])
            if not n:
                raise ArtifactError(f"{self.path}: tensor {name!r} is truncated")
            got += n
        return out

    def get(self, name: str, verify: bool = True):
        """The whole tensor as float32 (hash-verified when the file carries hashes)."""
        import torch

        if not self._readable(name):
            return self._get_safe_open(name, verify)
        with open(self.path, "rb", buffering=0) as f:
            t = self._read(f, name, 0, self.numel(name))
        if verify and name not in self._verified and self._hash_of(name) is not None:
            self._check_hash(name, _tensor_sha(t))
        return t.to(torch.float32).reshape(self.shapes[name])

    def _get_safe_open(self, name: str, verify: bool):
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{self.path}: cannot read tensor {name!r}: {e}") from None
        if verify and self._hash_of(name) is not None:
            self._check_hash(name, _tensor_sha(t))
        return t.to(torch.float32)

    def chunks(
        self, name: str, chunk_elems: int = 1 << 24, verify: bool = True
    ) -> Iterator[tuple[int, Any]]:
        """Yield (flat_offset, float32 1-D tensor) pieces of a tensor, at most `chunk_elems`
        values each, so that peak memory is about one chunk whatever the tensor's size.

        Pieces are at most `PIECE_ELEMS` values whatever `chunk_elems` asks (smaller
        pieces are as exact and faster to process). Each piece is a new tensor (a consumer
        may keep it). With `verify`, the SHA-256 of a tensor not yet verified is computed
        along the way and checked after its last piece (an `ArtifactError` then ends the
        iteration); later passes skip it.
        """
        import torch

        n = self.numel(name)
        step = max(1, min(int(chunk_elems), PIECE_ELEMS))
        if n <= step or not self._readable(name):
            yield 0, self.get(name, verify=verify).reshape(-1)
            return
        h = None
        if verify and name not in self._verified and self._hash_of(name) is not None:
            h = hashlib.sha256()
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, n, step):
                raw = self._read(f, name, start, min(step, n - start))
                if h is not None:
                    h.update(raw.view(torch.uint8).numpy())
                yield start, raw.to(torch.float32)
                del raw
                _ReleaseFreedHeap.check()  # the consumer is done with the piece
        if h is not None:
            self._check_hash(name, h.hexdigest())


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
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{path}: not a safetensors file (metadata must map strings to strings)")
    if meta.get("cwa.schema") != SCORES_SCHEMA:
        got = meta.get("cwa.schema", "no cwa schema")
        raise ArtifactError(f"{path}: expected a scores artifact ({SCORES_SCHEMA}), found {got}")
    try:
        order = json.loads(meta["cwa.param_order"])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: scores artifact without a valid cwa.param_order") from None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or len(set(order)) != len(order):
        raise ArtifactError(f"{path}: scores artifact without a valid cwa.param_order")
    keys = {k for k in header if k != "__metadata__"}
    if set(order) != keys:
        raise ArtifactError(f"{path}: cwa.param_order does not match the stored tensors")
    # The per-tensor SHA-256 covers the bytes only: a header that relabels them (F32 read
    # as I32) would pass it, so the stored dtype must be the one the metadata declares.
    want = _SCORE_DTYPES.get(meta.get("cwa.score_dtype", "float32"))
    for k in order:
        if not isinstance(header[k], dict) or header[k].get("dtype") != want:
            raise ArtifactError(
                f"{path}: tensor {k!r} is not stored as {meta.get('cwa.score_dtype', 'float32')} "
                "as its metadata says (file corrupted); recompute it with --force"
            )
    try:
        hashes = json.loads(meta.get("cwa.sha256", "{}"))
    except json.JSONDecodeError:
        hashes = None
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise ArtifactError(f"{path}: scores artifact with a malformed cwa.sha256")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise ArtifactError(f"{path}: invalid safetensors file: {e}") from None
    shapes = {k: tuple(int(s) for s in header[k]["shape"]) for k in order}
    with open(path, "rb") as f:
        base = 8 + int.from_bytes(f.read(8), "little")
    layout = {}
    for k in order:
        a, b = header[k]["data_offsets"]
        layout[k] = (str(header[k].get("dtype", "")), base + int(a), base + int(b))
    return ScoresFile(path=path, meta=dict(meta), names=list(order), shapes=shapes, layout=layout)


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
    from cwa.ranking import Selection

    art = read_h5(path, SELECTION_SCHEMA)
    a = art.attrs
    try:
        n = int(a["n_draws"])
        params = [str(p) for p in art.arrays["params"]]
        draws = [_read_draw(art, d, len(params)) for d in range(n)]
        sel = Selection(
            kind=str(a["kind"]),
            k=int(a["k"]),
            mode=str(a["mode"]),
            metric=str(a["metric"]),
            rank_by=str(a["rank_by"]),
            seed=int(a["seed"]),
            ties_at_k=int(a["ties_at_k"]),
            params=params,
            draws=draws,
            info=json.loads(a.get("info", "{}")),
        )
        if n < 1 or sel.k < 1 or sel.mode not in ("global", "per_layer") or len(set(params)) != len(params):
            raise ValueError("bad n_draws, k, mode or params")
        if not isinstance(sel.info, dict):
            raise ValueError("bad info")
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{art.path}: malformed selection artifact ({e})") from None
    return sel, art


def _read_draw(art: H5Artifact, d: int, n_params: int):
    """Draw d of a selection, checked: 1-D integer indices of one length, parameter
    indices in range, flat indices non-negative, no entry twice (ValueError otherwise).
    Bounds inside each tensor are checked where its shape is known (perturb, control)."""
    import numpy as np

    from cwa.ranking import Draw

    pi, fi, sc = (np.asarray(art.arrays[f"draws/{d}/{k}"]) for k in ("param_index", "flat_index", "score"))
    if pi.ndim != 1 or fi.ndim != 1 or sc.ndim != 1 or pi.dtype.kind not in "iu" or fi.dtype.kind not in "iu":
        raise ValueError(f"draw {d}: indices are not 1-D integer arrays")
    if sc.dtype.kind != "f":
        raise ValueError(f"draw {d}: scores are not floating point")
    if len(pi) and (pi.min() < 0 or pi.max() >= n_params or fi.min() < 0 or fi.max() >= 1 << 40):
        raise ValueError(f"draw {d}: index out of range")
    if len(pi) and len(np.unique((pi.astype(np.int64) << 40) | fi.astype(np.int64))) != len(pi):
        raise ValueError(f"draw {d}: lists an entry twice")
    return Draw(param_index=pi, flat_index=fi, score=sc)


def provenance(art: H5Artifact) -> dict[str, Any]:
    """The provenance attribute as a dict ({} when absent or not a JSON object)."""
    p = art.attrs.get("provenance", "{}")
    try:
        p = json.loads(p) if isinstance(p, str) else p
    except json.JSONDecodeError:
        return {}
    return p if isinstance(p, dict) else {}


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
