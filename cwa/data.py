"""Corpora -> token windows for calibration and evaluation.

Windows (SPEC "Models and data"): each document is tokenized without special tokens, the
documents are joined with the EOS token, and the stream is cut into non-overlapping
pieces. A window is `[BOS] + (seq_len - 1)` stream tokens when the tokenizer defines a BOS
token, else `seq_len` stream tokens; a trailing remainder is dropped. The first position
is never a target.

Sources (`--data` / `--eval-data`): a `.txt` file (one document), a directory of `.txt`
files (sorted), a `.jsonl` file (one JSON object per line), the same gzip-compressed
(`.jsonl.gz`, or `.json.gz` as the C4 shards that Wanda and SparseGPT calibrate on are named),
a directory written by `datasets`' `save_to_disk`, `hf:NAME[:CONFIG[:SPLIT]]` through the
`datasets` package (NAME a hub id or a local path; SPLIT may slice, `test[:5%]`,
`train[10:200]`), or a `.npy` integer array `[N, seq_len]` used verbatim. Records give their
document in the field `--text-field` (default `text`). Without any `--data`, the embedded
corpus's calibration and evaluation parts are used.

A hub dataset is read from the `datasets` cache first (as with `HF_HUB_OFFLINE=1`); only
when it is not there is the hub asked, after one HEAD request without retries that fails at
once, with one line, when the hub cannot be reached.

Splitting user data when no `--eval-data` is given: with 10 or more documents, documents
whose index i satisfies `i % 10 == 9` (a fixed 10%) become evaluation documents; otherwise
the last 10% of the windows (at least one) are evaluation windows. Calibration and
evaluation never share a window.

Sampling: `--calib-samples N` draws N calibration windows without replacement with the
generator `(data_seed, "data", 0)`; evaluation windows are drawn once with `(0, "eval", 0)`,
independent of `--seed`, so every seed and condition is evaluated on the same windows.
Indices are sorted ascending and recorded in artifacts.

Bytes for `bits_per_byte` (evaluation windows from text; `.npy` windows have none): each
window carries the number of UTF-8 bytes of the text its target tokens add, counted in
the document they come from (see `count_window_bytes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwa.errors import UsageError

DEFAULT_SEQ_LEN = 256
DEFAULT_TEXT_FIELD = "text"
_RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
_SAVED_DATASET = ("dataset_info.json", "state.json")  # what save_to_disk writes for a Dataset
_SAVED_DATASET_DICT = "dataset_dict.json"  # ... and for a DatasetDict


@dataclass
class Windows:
    """Token windows `[N, T]` (int64) with the indices they have in their source.

    `window_bytes` ([N] int64): the UTF-8 bytes of the text each window's targets add
    (`count_window_bytes`); what `bits_per_byte` divides by. `byte_lengths` ([V]) is the
    older per-token table (`byte_lengths()`), used only when `window_bytes` is None (it is
    exact for byte-level tokenizers only). Both None: no `bits_per_byte`."""

    ids: Any  # torch.LongTensor [N, T]
    indices: list[int]
    source: str
    has_bos: bool
    n_available: int
    byte_lengths: Any = None  # np.ndarray [V] or None
    fingerprint: str = field(default="")
    window_bytes: Any = None  # np.ndarray [N] or None

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


def read_documents(spec: str, text_field: str | None = None) -> list[str]:
    """Documents from a `--data` value that is not a `.npy` file; records (JSON lines, a
    dataset) give theirs in `text_field` (default `text`)."""
    field = text_field or DEFAULT_TEXT_FIELD
    if spec.startswith("hf:"):
        return _read_hf(spec, field)
    p = Path(spec)
    if not p.exists():
        raise UsageError(f"--data {spec}: no such file or directory")
    if p.is_dir() and is_saved_dataset(p):
        docs = _dataset_texts(_load_saved(p, None, spec), field, spec)
    elif p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix == ".txt" and x.is_file())
        if not files:
            raise UsageError(f"--data {spec}: directory has no .txt files (nor a dataset saved with save_to_disk)")
        docs = [_read_text(f) for f in files]
    elif p.suffix == ".txt":
        docs = [_read_text(p)]
    elif p.name.endswith(_RECORD_SUFFIXES):
        docs = _read_jsonl(p, field)
    else:
        raise UsageError(
            f"--data {spec}: unsupported file type {p.suffix!r}; use .txt, a directory of "
            ".txt, .jsonl / .jsonl.gz / .json.gz (JSON lines), a save_to_disk dataset "
            "directory, .npy token windows or hf:NAME"
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError(f"--data {spec}: contains no text")
    return docs


def reads_records(spec: str | None) -> bool:
    """Whether a --data value gives its documents in a field (`--text-field` applies)."""
    if spec is None:
        return False
    if spec.startswith("hf:"):
        return True
    p = Path(spec)
    return p.name.endswith(_RECORD_SUFFIXES) or (p.is_dir() and is_saved_dataset(p))


def is_saved_dataset(p: Path) -> bool:
    return all((p / f).is_file() for f in _SAVED_DATASET) or (p / _SAVED_DATASET_DICT).is_file()


def _read_text(p: Path) -> str:
    """UTF-8 text; a leading byte order mark (as Windows editors write) is dropped."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"--data {p}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--data {p}: cannot read ({e.strerror})") from None


def _read_gzip_text(p: Path) -> str:
    import gzip
    import zlib

    try:
        with gzip.open(p, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise UsageError(f"--data {p}: not a valid gzip file (truncated or corrupt)") from None
    except OSError as e:
        raise UsageError(f"--data {p}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"--data {p}: not UTF-8 text once decompressed") from None


def _read_jsonl(p: Path, field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    """JSON lines, plain or gzip-compressed: the string `field` of every record."""
    docs = []
    text = _read_gzip_text(p) if p.suffix == ".gz" else _read_text(p)
    # Records end at "\n" only: str.splitlines() would also cut at U+2028, U+0085 and
    # other characters that JSON allows unescaped inside a string. A byte order mark
    # that starts a line (files concatenated) is dropped like the file's first one.
    for i, line in enumerate(text.split("\n"), 1):
        line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--data {p}: line {i} is not valid JSON (expected one JSON object per line)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            keys = f" (its fields: {', '.join(map(str, list(rec)[:8]))})" if isinstance(rec, dict) else ""
            raise UsageError(
                f"--data {p}: line {i} has no string {field!r} field{keys}; name the field with --text-field"
            )
        docs.append(rec[field])
    return docs


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (NAME, CONFIG or None, SPLIT, default train). A colon
    inside brackets belongs to the split's slice (`test[:5%]`)."""
    parts, cur, depth = [], "", 0
    for c in spec[3:]:
        depth += (c == "[") - (c == "]")
        if c == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    if len(parts) > 3 or not parts[0]:
        raise UsageError(
            f"--data {spec}: expected hf:NAME[:CONFIG[:SPLIT]] (e.g. hf:wikitext:wikitext-2-raw-v1:test[:5%])"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _read_hf(spec: str, field: str = DEFAULT_TEXT_FIELD) -> list[str]:
    name, config, split = parse_hf_spec(spec)
    datasets = _datasets(spec)
    if Path(name).is_dir() and is_saved_dataset(Path(name)):
        return _dataset_texts(_load_saved(Path(name), split, spec), field, spec)
    ds = _load_hf(datasets, name, config, split, spec)
    return _dataset_texts(ds, field, spec)


def _dataset_texts(ds, field: str, spec: str) -> list[str]:
    if field not in ds.column_names:
        raise UsageError(
            f"--data {spec}: dataset has no {field!r} column (columns: {', '.join(ds.column_names)}); "
            "name the column with --text-field"
        )
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def _datasets(spec: str):
    """The `datasets` package, its "Generating split" bars and log lines off stderr unless
    --verbose."""
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--data {spec}: needs the 'datasets' package (pip install 'cwa[datasets]')"
        ) from None
    from cwa.models import library_progress

    if library_progress():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _load_saved(path: Path, split: str | None, spec: str):
    """A dataset written by `save_to_disk`; of a DatasetDict, `split` (default train, or its
    only split), which may slice (`test[:10%]`)."""
    datasets = _datasets(spec)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, ArrowInvalid, JSONDecodeError, ...
        raise UsageError(f"--data {spec}: cannot read the saved dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = split or ("train" if "train" in ds or len(names) != 1 else names[0])
        base = split.split("[", 1)[0]
        if base not in ds:
            raise UsageError(
                f"--data {spec}: the saved dataset has no split {base!r} (splits: {', '.join(names)}); "
                f"pick one with hf:{path}::SPLIT"
            )
        return _slice(ds[base], split, spec)
    if split is not None:
        return _slice(ds, split, spec, own=str(ds.split) if ds.split is not None else None)
    return ds


def _slice(ds, split: str, spec: str, own: str | None = None):
    """`ds` cut by the slice of `split` (`train[:10%]`, `train[5:50]`), as datasets reads it."""
    import datasets

    base = split.split("[", 1)[0]
    if own is not None and base not in (own, "train"):
        raise UsageError(f"--data {spec}: the saved dataset is the {own!r} split, not {base!r}")
    if "[" not in split:
        return ds
    try:
        instr = datasets.ReadInstruction.from_spec(split.replace(base, "x", 1)).to_absolute({"x": len(ds)})
    except (ValueError, AssertionError, KeyError) as e:
        raise UsageError(f"--data {spec}: bad split slice {split!r} ({e})") from None
    rows = [i for a in instr for i in range(a.from_, a.to)]
    return ds.select(rows)


def _load_hf(datasets, name: str, config: str | None, split: str, spec: str):
    """`load_dataset` from the cache first (no request), then the hub after a quick check
    that it answers; a local path never leaves the machine."""
    try:
        with _datasets_offline(datasets):
            return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        first = e
    local = Path(name).exists()
    from huggingface_hub import constants

    if local or constants.HF_HUB_OFFLINE or getattr(datasets.config, "HF_HUB_OFFLINE", False):
        why = "" if local else "; it is not available offline (not in the datasets cache)"
        raise UsageError(f"--data {spec}: cannot load dataset ({type(first).__name__}: {_line(first)}){why}") from None
    from cwa.models import hub_check

    got = hub_check(name, "README.md", repo_type="dataset")
    if got is not None:
        kind, detail = got
        if kind == "unreachable":
            raise UsageError(
                f"--data {spec}: it is not in the datasets cache and the hub ({constants.ENDPOINT}) cannot be "
                f"reached ({detail}); load it once where there is a network, point HF_HOME at a cache "
                "that holds it, or pass a local path"
            )
        raise UsageError(f"--data {spec}: not in the datasets cache and {detail}")
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise UsageError(f"--data {spec}: cannot load dataset ({type(e).__name__}: {_line(e)})") from None


def _line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


@contextlib.contextmanager
def _datasets_offline(datasets):
    """`datasets` (and the hub client under it) as with HF_HUB_OFFLINE=1, for one call."""
    import huggingface_hub.constants as hc

    saved = (getattr(datasets.config, "HF_HUB_OFFLINE", False), hc.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = True
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def read_npy(
    spec: str,
    seq_len: int | None,
    vocab_size: int | None,
    context: int | None = None,
    label: str = "--data",
    width_from: str = "--seq-len",
):
    """The windows of a `.npy` file, checked against `--seq-len` (or the width the other
    data source set, named by `width_from`), the model's context and its vocabulary."""
    import numpy as np
    import torch

    p = Path(spec)
    if not p.exists():
        raise UsageError(f"{label} {spec}: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"{label} {spec}: not a readable .npy array ({e})") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise UsageError(
            f"{label} {spec}: expected an integer array [N, seq_len], got {arr.dtype} {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] < 2:
        raise UsageError(f"{label} {spec}: needs at least one window of 2 or more tokens")
    width = int(arr.shape[1])
    if context is not None and width > context:
        raise UsageError(
            f"{label} {spec}: windows have width {width} but the model's context is {context} "
            f"tokens; give windows of at most {context} tokens"
        )
    if seq_len is not None and width != seq_len:
        raise UsageError(f"{label} {spec}: windows have width {width} but {width_from} is {seq_len}")
    if arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size):
        raise UsageError(f"{label} {spec}: token ids outside the vocabulary [0, {vocab_size})")
    return torch.from_numpy(arr.astype(np.int64))


# --------------------------------------------------------------------------- windows


@dataclass
class TokenStream:
    """Documents tokenized without special tokens, joined with EOS into one stream."""

    docs: list[list[int]]  # the token ids of each document
    starts: list[int]  # the stream index of each document's first token
    ids: list[int]  # the stream


def tokenize_stream(docs: list[str], tokenizer) -> TokenStream:
    eos = tokenizer.eos_token_id
    enc = [list(x) for x in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    stream: list[int] = []
    starts: list[int] = []
    for i, ids in enumerate(enc):
        if i and eos is not None:
            stream.append(eos)
        starts.append(len(stream))
        stream.extend(ids)
    return TokenStream(enc, starts, stream)


def _body_len(tokenizer, seq_len: int) -> int:
    """Stream tokens per window: one position goes to BOS when the tokenizer has one."""
    return seq_len - 1 if tokenizer.bos_token_id is not None else seq_len


def make_windows(docs: list[str], tokenizer, seq_len: int, stream: TokenStream | None = None):
    """Cut documents into windows `[N, seq_len]` (see module docstring)."""
    import torch

    st = tokenize_stream(docs, tokenizer) if stream is None else stream
    bos = tokenizer.bos_token_id
    body = _body_len(tokenizer, seq_len)
    n = len(st.ids) // body
    t = torch.tensor(st.ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        t = torch.cat([torch.full((n, 1), bos, dtype=torch.long), t], dim=1)
    return t


# Tokens of the document decoded before a span whose bytes are counted (see
# count_window_bytes); the decoders in use only treat the first token of a string apart.
_CONTEXT = 4
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def count_window_bytes(stream: TokenStream, tokenizer, seq_len: int, windows, table=None, byte_level=None):
    """UTF-8 bytes of the text that the target tokens of each window in `windows` (indices
    into `make_windows(..., stream=stream)`) add; `[len(windows)]` int64.

    "The text the targets add" is what decoding them appends to the decoded text of
    everything before them *in their document* (special tokens such as BOS and EOS add
    none; no `clean_up_tokenization_spaces`). Counting in the document, not the window,
    decides the cases at a window's start:

    - BOS is a special token: it adds no text (and is never a target).
    - A SentencePiece piece `▁word` (Llama-2, Mistral, Gemma) that begins a window in the
      middle of a document adds " word": the space is a byte of the document and the
      model predicts it, as part of the token. Decoding the window alone would lose it,
      since SentencePiece decoders strip the leading space of a decoded string; so did the
      per-token table cwa used before, which decoded each token alone (so bits_per_byte
      came out too high: x1.26 on the SentencePiece tokenizer of the tests).
    - The same piece at the start of a document adds "word": that space was put there by
      the tokenizer (`add_dummy_prefix`, Metaspace `prepend_scheme`), it is not in the
      document, and decoding the document strips it. It does not count.
    - Without BOS a window's first token is context, not a target: its text does not count.

    So with BOS the windows cut from a stream count every byte of their documents' decoded
    text once (without BOS, all but the first token's of each window).

    Byte-level tokenizers (GPT-2, Llama 3, Pythia: every token is a fixed byte string) sum
    the per-token table `byte_lengths` (`table` and `byte_level`, when given, save building
    the table and inspecting the tokenizer again). Others decode each
    document span after `_CONTEXT` tokens of the document before it and take the
    difference of the two decoded lengths; byte-fallback pieces `<0x80>`..`<0xFF>` (the
    bytes of a character that has no piece) are first replaced by the one-byte piece
    `<0x41>`, so that a character cut by a window boundary does not decode to U+FFFD: each
    of its bytes counts in the window holding its byte token, as with byte-level tokens."""
    import numpy as np

    body = _body_len(tokenizer, seq_len)
    skip = 0 if tokenizer.bos_token_id is not None else 1  # the first token of a window is context
    if byte_level is None:
        byte_level = _is_byte_level(tokenizer)
    if byte_level:
        tab = byte_lengths(tokenizer, byte_level=True) if table is None else table
        out = np.zeros(len(windows), dtype=np.int64)
        for r, k in enumerate(windows):
            ids = stream.ids[k * body + skip : (k + 1) * body]
            out[r] = int(tab[np.minimum(np.asarray(ids, dtype=np.int64), len(tab) - 1)].sum())
        return out
    return _decoded_window_bytes(stream, tokenizer, windows, body, skip)


def _decoded_window_bytes(stream: TokenStream, tokenizer, windows, body: int, skip: int):
    """`count_window_bytes` for a tokenizer that is not byte-level: each document span of a
    window decoded after `_CONTEXT` tokens of the document before it, minus those tokens'
    decoded length; byte-fallback pieces replaced by `<0x41>` first. `[len(windows)]` int64."""
    import bisect

    import numpy as np

    out = np.zeros(len(windows), dtype=np.int64)
    remap = _byte_piece_placeholders(tokenizer)
    docs: dict[int, list[int]] = {}

    def doc(i: int) -> list[int]:
        if i not in docs:
            d = stream.docs[i]
            docs[i] = [remap.get(t, t) for t in d] if remap else d
        return docs[i]

    for r, k in enumerate(windows):
        a, b = k * body + skip, (k + 1) * body  # the window's targets: stream[a:b]
        i = max(0, bisect.bisect_right(stream.starts, a) - 1)
        total = 0
        while i < len(stream.starts) and stream.starts[i] < b:
            s = stream.starts[i]
            lo, hi = max(a, s) - s, min(b, s + len(stream.docs[i])) - s
            if lo < hi:
                d = doc(i)
                c = max(0, lo - _CONTEXT)
                total += _decoded_bytes(tokenizer, d[c:hi]) - _decoded_bytes(tokenizer, d[c:lo])
            i += 1
        out[r] = total
    return out


def _decoded_bytes(tokenizer, ids: list[int]) -> int:
    """UTF-8 length of the decoded ids (no special tokens, no clean-up of spaces)."""
    if not ids:
        return 0
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def _byte_piece_placeholders(tokenizer) -> dict[int, int]:
    """Byte-fallback pieces `<0x80>`..`<0xFF>` -> the id of `<0x41>` ("A"), when the
    vocabulary has byte pieces; else {}."""
    vocab = tokenizer.get_vocab()
    a = vocab.get("<0x41>")
    if a is None:
        return {}
    return {i: a for tok, i in vocab.items() if (m := _BYTE_PIECE.fullmatch(tok)) and int(m.group(1), 16) >= 0x80}


def byte_lengths(tokenizer, byte_level: bool | None = None):
    """UTF-8 byte length of each token id's text (special tokens 0), decoded alone.

    Exact for byte-level BPE (GPT-2, Llama 3, Pythia), which maps every character of a
    token string to one byte; `count_window_bytes` uses it for them. For other tokenizers
    a token's text depends on its neighbours (a SentencePiece `▁word` decodes to "word"
    alone, " word" within a text), so this table is only an approximation there
    (`<0xNN>` byte-fallback pieces count one byte)."""
    import numpy as np

    vocab = tokenizer.get_vocab()
    n = max(len(tokenizer), max(vocab.values()) + 1)
    out = np.zeros(n, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    if byte_level is None:
        byte_level = _is_byte_level(tokenizer)
    for tok, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            out[i] = len(tok)
        elif _BYTE_PIECE.fullmatch(tok):
            out[i] = 1
        else:
            out[i] = len(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
    return out


def _is_byte_level(tokenizer) -> bool:
    if hasattr(tokenizer, "byte_encoder") and not hasattr(tokenizer, "backend_tokenizer"):
        return True  # a slow byte-level BPE tokenizer (GPT2Tokenizer and its kind)
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


@dataclass
class _Part:
    """All windows of one source: their ids, whether they start with BOS, and how to count
    the bytes of their targets (None: `.npy` windows, whose text is unknown)."""

    ids: Any
    has_bos: bool
    bytes_of: Callable[[list[int]], Any] | None = None

    def take(self, idx: list[int], source: str, n_available: int) -> Windows:
        nb = None if self.bytes_of is None else self.bytes_of(idx)
        return Windows(self.ids[idx], idx, source, self.has_bos, n_available, window_bytes=nb)


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
    text_field: str | None = None,
) -> DataSplit:
    """Calibration and evaluation windows for a stage (see module docstring).

    `calib_samples` / `eval_samples` None means all available windows. `text_field`: the
    field of a record source that holds its document (default `text`)."""
    field = check_text_field(text_field, data, eval_data)
    context = model_context(config)
    vocab = getattr(config, "vocab_size", None)
    npy_data = data is not None and data.endswith(".npy")
    allw = None
    if npy_data:
        # the file's width is the window length: checked (against --seq-len and the
        # model's context) with the file named, before anything else
        allw = read_npy(data, seq_len, vocab, context)
        seq = int(allw.shape[1])
    else:
        seq = resolve_seq_len(seq_len, context)
    win = _Windower(tokenizer, seq, tokenizer.bos_token_id is not None)
    calib_all, eval_all, calib_src, eval_src = _data_parts(
        win, data, allw, need_calib, need_eval, split=eval_data is None, field=field
    )
    if eval_data is not None and need_eval:
        eval_src = eval_data
        if eval_data.endswith(".npy"):
            width_from = (
                f"the width of the --data windows ({data})" if npy_data
                else "--seq-len" if seq_len is not None else "the default --seq-len"
            )
            eval_all = _Part(read_npy(eval_data, seq, vocab, context, "--eval-data", width_from), False)
        else:
            eval_all = win.part(read_documents(eval_data, field), f"--eval-data {eval_data}")
    calib = ev = None
    if need_calib:
        calib = _keyed(_sample(calib_all, calib_samples, data_seed, "data", "calib", calib_src), data, field)
    if need_eval:
        ev = _keyed(_sample(eval_all, eval_samples, 0, "eval", "eval", eval_src),
                    eval_data if eval_data is not None else data, field)
    return DataSplit(calib, ev, seq)


def check_text_field(text_field: str | None, data: str | None, eval_data: str | None) -> str:
    """The record field documents are read from: `text` unless `--text-field` names one,
    which needs a source that has fields."""
    if text_field is None:
        return DEFAULT_TEXT_FIELD
    if not text_field.strip():
        raise UsageError("--text-field '': give the name of the field that holds the text")
    if not (reads_records(data) or reads_records(eval_data)):
        given = " and ".join(f"{o} {v}" for o, v in (("--data", data), ("--eval-data", eval_data)) if v) or "the embedded corpus"
        raise UsageError(
            f"--text-field {text_field}: {given} has no fields; it applies to .jsonl, .jsonl.gz, "
            ".json.gz, hf: and save_to_disk data"
        )
    return text_field


def _keyed(w: Windows, spec: str | None, field: str) -> Windows:
    """A field other than `text` is part of the data fingerprint of a record source (the
    same token ids read from another field are another input, by name)."""
    if field != DEFAULT_TEXT_FIELD and reads_records(spec):
        w.fingerprint = hashlib.sha256(f"{w.fingerprint}|text_field={field}".encode()).hexdigest()
    return w


@dataclass
class _Windower:
    """Cuts documents into windows of `seq` tokens; whether the tokenizer is byte-level,
    and its byte table, are found once for every source."""

    tokenizer: Any
    seq: int
    has_bos: bool
    table: dict = field(default_factory=dict)

    def part(self, docs: list[str], label: str) -> _Part:
        tokenizer, seq, table = self.tokenizer, self.seq, self.table
        stream = tokenize_stream(docs, tokenizer)
        w = make_windows(docs, tokenizer, seq, stream=stream)
        if w.shape[0] == 0:
            raise UsageError(
                f"{label}: too little text for one window of {seq} tokens; use a shorter --seq-len"
            )

        def bytes_of(idx):
            if not table:
                table["byte_level"] = bl = _is_byte_level(tokenizer)
                table["table"] = byte_lengths(tokenizer, byte_level=True) if bl else None
            return count_window_bytes(stream, tokenizer, seq, idx, table["table"], table["byte_level"])

        return _Part(w, self.has_bos, bytes_of)


def _data_parts(
    win: _Windower, data: str | None, allw: Any, need_calib: bool, need_eval: bool, split: bool,
    field: str = DEFAULT_TEXT_FIELD,
) -> tuple[_Part | None, _Part | None, str, str]:
    """All calibration and evaluation windows of `--data` (the embedded corpus when None;
    `allw`: the windows of a `.npy` file), and their sources. `split`: no `--eval-data`,
    so evaluation windows come from `--data` too."""
    calib_all = eval_all = None
    if data is None:
        from cwa import assets

        calib_src, eval_src = "embedded:calibration", "embedded:evaluation"
        if need_calib:
            calib_all = win.part(assets.split_documents("calibration"), calib_src)
        if need_eval and split:
            eval_all = win.part(assets.split_documents("evaluation"), eval_src)
        return calib_all, eval_all, calib_src, eval_src
    if allw is not None:
        calib_all, eval_all = _split_windows(_Part(allw, False), split)
        return calib_all, eval_all, data, data
    docs = read_documents(data, field)
    if split and len(docs) >= 10:
        cal_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
        ev_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
        calib_all = win.part(cal_docs, f"--data {data} (calibration documents)")
        eval_all = win.part(ev_docs, f"--data {data} (evaluation documents)")
    else:
        calib_all, eval_all = _split_windows(win.part(docs, f"--data {data}"), split)
    return calib_all, eval_all, data, data


def _sample(
    part: _Part, samples: int | None, seed: int, purpose: str, what: str, source: str
) -> Windows:
    """`samples` windows of `part` drawn with `seed` (all of them when None)."""
    n = part.ids.shape[0]
    idx = list(range(n)) if samples is None else sample_indices(n, samples, seed, purpose, what)
    return part.take(idx, source, n)


def _split_windows(part: _Part, split: bool) -> tuple[_Part, _Part | None]:
    """Calibration / evaluation windows of one source: the last 10% evaluate."""
    if not split:
        return part, None
    n = part.ids.shape[0]
    if n < 2:
        raise UsageError(
            f"need at least 2 windows to split calibration from evaluation, found {n}; "
            "give --eval-data or a shorter --seq-len"
        )
    cut = n - max(1, math.ceil(0.1 * n))
    count = part.bytes_of
    tail = None if count is None else (lambda idx: count([cut + i for i in idx]))
    return _Part(part.ids[:cut], part.has_bos, count), _Part(part.ids[cut:], part.has_bos, tail)
