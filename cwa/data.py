"""Corpora -> token windows for calibration and evaluation.

Windows (SPEC "Models and data"): each document is tokenized without special tokens, the
documents are joined with the EOS token, and the stream is cut into non-overlapping
pieces. A window is `[BOS] + (seq_len - 1)` stream tokens when the tokenizer defines a BOS
token, else `seq_len` stream tokens; a trailing remainder is dropped. The first position
is never a target.

Sources (`--data` / `--eval-data`): a `.txt` file (one document), a directory of `.txt`
files (sorted), a `.jsonl` file with a `text` field, `hf:NAME[:CONFIG[:SPLIT]]` through the
`datasets` package, or a `.npy` integer array `[N, seq_len]` used verbatim. Without any
`--data`, the embedded corpus's calibration and evaluation parts are used.

Splitting user data when no `--eval-data` is given: with 10 or more documents, documents
whose index i satisfies `i % 10 == 9` (a fixed 10%) become evaluation documents; otherwise
the last 10% of the windows (at least one) are evaluation windows. Calibration and
evaluation never share a window.

Sampling: `--calib-samples N` draws N calibration windows without replacement with the
generator `(data_seed, "data", 0)`; evaluation windows are drawn once with `(0, "eval", 0)`,
independent of `--seed`, so every seed and condition is evaluated on the same windows.
Indices are sorted ascending and recorded in artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import UsageError

DEFAULT_SEQ_LEN = 256


@dataclass
class Windows:
    """Token windows `[N, T]` (int64) with the indices they have in their source."""

    ids: Any  # torch.LongTensor [N, T]
    indices: list[int]
    source: str
    has_bos: bool
    n_available: int
    byte_lengths: Any = None  # np.ndarray [V] or None (no bits_per_byte)
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = windows_fingerprint(self.ids)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])


def windows_fingerprint(ids) -> str:
    import numpy as np

    arr = np.ascontiguousarray(ids.cpu().numpy().astype("<i8"))
    h = hashlib.sha256(f"{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def read_documents(spec: str) -> list[str]:
    """Documents from a `--data` value that is not a `.npy` file."""
    if spec.startswith("hf:"):
        return _read_hf(spec)
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"--data {spec}: no such file or directory")
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix == ".txt" and x.is_file())
        if not files:
            raise UsageError(f"--data {spec}: directory has no .txt files")
        docs = [_read_text(f) for f in files]
    elif p.suffix == ".txt":
        docs = [_read_text(p)]
    elif p.suffix == ".jsonl":
        docs = _read_jsonl(p)
    else:
        raise UsageError(
            f"--data {spec}: unsupported file type {p.suffix!r}; use .txt, a directory of "
            ".txt, .jsonl with a 'text' field, .npy token windows or hf:NAME"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"--data {spec}: contains no text")
    return docs


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--data {p}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--data {p}: cannot read ({e.strerror})") from None


def _read_jsonl(p: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--data {p}: line {i} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise UsageError(f"--data {p}: line {i} has no string 'text' field")
        docs.append(rec["text"])
    return docs


def _read_hf(spec: str) -> list[str]:
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--data {spec}: needs the 'datasets' package (pip install 'cwa[datasets]')"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise UsageError(f"--data {spec}: cannot load dataset ({type(e).__name__}: {e})") from None
    if "text" not in ds.column_names:
        raise UsageError(f"--data {spec}: dataset has no 'text' column ({ds.column_names})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


def read_npy(spec: str, seq_len: int | None, vocab_size: int | None):
    import numpy as np
    import torch

    p = Path(spec)
    if not p.exists():
        raise UsageError(f"--data {spec}: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"--data {spec}: not a readable .npy array ({e})") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise UsageError(
            f"--data {spec}: expected an integer array [N, seq_len], got {arr.dtype} {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] < 2:
        raise UsageError(f"--data {spec}: needs at least one window of 2 or more tokens")
    if seq_len is not None and arr.shape[1] != seq_len:
        raise UsageError(f"--data {spec}: windows have width {arr.shape[1]} but --seq-len is {seq_len}")
    if arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size):
        raise UsageError(f"--data {spec}: token ids outside the vocabulary [0, {vocab_size})")
    return torch.from_numpy(arr.astype(np.int64))


# --------------------------------------------------------------------------- windows


def make_windows(docs: list[str], tokenizer, seq_len: int):
    """Cut documents into windows `[N, seq_len]` (see module docstring)."""
    import torch

    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    enc = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i, ids in enumerate(enc):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    body = seq_len - 1 if bos is not None else seq_len
    n = len(stream) // body
    t = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        t = torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)
    return t


def byte_lengths(tokenizer):
    """UTF-8 byte length of each token id's text (special tokens 0), for bits_per_byte.

    Byte-level BPE (GPT-2, Llama 3, Pythia) maps every character of a token string to one
    byte, so the length of the token string is exact; other tokenizers use the decoded
    text of the token alone (`<0xNN>` byte-fallback pieces count one byte)."""
    import re

    import numpy as np

    vocab = tokenizer.get_vocab()
    n = max(len(tokenizer), max(vocab.values()) + 1)
    out = np.zeros(n, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    byte_level = _is_byte_level(tokenizer)
    for tok, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            out[i] = len(tok)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            out[i] = 1
        else:
            out[i] = len(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out


def _is_byte_level(tokenizer) -> bool:
    try:
        state = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:
        return False
    dec = state.get("decoder") or {}
    types = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]
    return "ByteLevel" in types


def model_context(cfg) -> int | None:
    """The model's maximum number of positions, from its config (None when unknown)."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_seq_len(seq_len: int | None, context: int | None) -> int:
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: must be at least 2 (a window needs a target)")
    if context is not None and seq_len > context:
        raise UsageError(f"--seq-len {seq_len}: exceeds the model's context of {context} tokens")
    return seq_len


def sample_indices(n_available: int, n: int, seed: int, purpose: str, what: str) -> list[int]:
    """n distinct indices out of n_available, sorted, from the (seed, purpose, 0) stream."""
    import torch

    from cwa.rng import generator

    if n <= 0:
        raise UsageError(f"--{what}-samples {n}: must be a positive number of windows")
    if n > n_available:
        raise UsageError(
            f"--{what}-samples {n}: only {n_available} {what} windows exist; ask for at most "
            f"{n_available} or use a shorter --seq-len / more data"
        )
    perm = torch.randperm(n_available, generator=generator(seed, purpose, 0))[:n]
    return sorted(int(i) for i in perm)


@dataclass
class DataSplit:
    calibration: Windows | None
    evaluation: Windows | None
    seq_len: int


def prepare_data(
    tokenizer,
    config,
    *,
    data: str | None = None,
    eval_data: str | None = None,
    seq_len: int | None = None,
    calib_samples: int | None = 32,
    eval_samples: int | None = 32,
    data_seed: int = 0,
    need_calib: bool = True,
    need_eval: bool = True,
) -> DataSplit:
    """Calibration and evaluation windows for a stage (see module docstring).

    `calib_samples` / `eval_samples` None means all available windows."""
    seq = resolve_seq_len(seq_len, model_context(config))
    vocab = getattr(config, "vocab_size", None)
    has_bos = tokenizer.bos_token_id is not None

    def from_docs(docs, label):
        w = make_windows(docs, tokenizer, seq)
        if w.shape[0] == 0:
            raise UsageError(
                f"{label}: too little text for one window of {seq} tokens; use a shorter --seq-len"
            )
        return w

    calib_all = eval_all = None
    calib_src = eval_src = ""
    npy = False
    if data is None:
        from cwa import assets

        calib_src, eval_src = "embedded:calibration", "embedded:evaluation"
        if need_calib:
            calib_all = from_docs(assets.split_documents("calibration"), calib_src)
        if need_eval and eval_data is None:
            eval_all = from_docs(assets.split_documents("evaluation"), eval_src)
    elif data.endswith(".npy"):
        npy = True
        allw = read_npy(data, seq_len, vocab)
        seq = allw.shape[1]
        calib_src = eval_src = data
        calib_all, eval_all = _split_windows(allw, eval_data is None)
    else:
        docs = read_documents(data)
        calib_src = eval_src = data
        if eval_data is None and len(docs) >= 10:
            cal_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
            ev_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
            calib_all = from_docs(cal_docs, f"--data {data} (calibration documents)")
            eval_all = from_docs(ev_docs, f"--data {data} (evaluation documents)")
        else:
            calib_all, eval_all = _split_windows(from_docs(docs, f"--data {data}"), eval_data is None)
    if eval_data is not None and need_eval:
        eval_src = eval_data
        if eval_data.endswith(".npy"):
            eval_all = read_npy(eval_data, seq, vocab)
            npy = True
        else:
            eval_all = from_docs(read_documents(eval_data), f"--eval-data {eval_data}")

    bl = None if npy else byte_lengths(tokenizer)
    calib = ev = None
    if need_calib:
        n = calib_all.shape[0]
        idx = list(range(n)) if calib_samples is None else sample_indices(n, calib_samples, data_seed, "data", "calib")
        calib = Windows(calib_all[idx], idx, calib_src, has_bos and not npy, n, bl)
    if need_eval:
        n = eval_all.shape[0]
        idx = list(range(n)) if eval_samples is None else sample_indices(n, eval_samples, 0, "eval", "eval")
        ev = Windows(eval_all[idx], idx, eval_src, has_bos and not npy, n, bl)
    return DataSplit(calib, ev, seq)


def _split_windows(w, split: bool):
    """Calibration / evaluation windows of one source: the last 10% evaluate."""
    if not split:
        return w, None
    n = w.shape[0]
    if n < 2:
        raise UsageError(
            f"need at least 2 windows to split calibration from evaluation, found {n}; "
            "give --eval-data or a shorter --seq-len"
        )
    n_eval = max(1, math.ceil(0.1 * n))
    return w[: n - n_eval], w[n - n_eval :]
