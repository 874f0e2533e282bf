"""The embedded corpus and the embedded default model, with their integrity checks.

Both are shipped inside the package so that `cwa run` works offline and gives the same
results whatever the Python version:

* The corpus is a frozen snapshot of CPython's ``pydoc_data.topics`` (the English help
  texts of the standard library; PSF license, see ``corpus/LICENSE-PSF.txt``), stored as
  gzipped JSON with its SHA-256 (``CORPUS_SHA256``). ``pydoc_data`` itself changes with
  every Python release, so it is never read at run time; ``build_corpus.py`` made the
  snapshot.
* The model (``model/``) is a small GPT-2-architecture causal LM with its own byte-level
  BPE tokenizer, trained by ``build_model.py`` on the *train* part of the corpus only.
  ``MODEL_SHA256`` holds the SHA-256 of every file in ``model/``; ``build_model.py``
  rewrites it after training.

This module imports neither torch nor transformers (nor typer): it only reads files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

from cwa.errors import CwaError, UsageError

ASSETS_DIR = Path(__file__).resolve().parent
CORPUS_PATH = ASSETS_DIR / "corpus" / "pydoc_topics.json.gz"
# SHA-256 of the compressed file CORPUS_PATH (CPython 3.11.7, 79 topics).
CORPUS_SHA256: str = "3f3bc63a02bef9f3f02a24235393a32ae02a26490ecdaa75d68a2baddbc8dbf5"
MODEL_DIR = ASSETS_DIR / "model"
EMBEDDED_MODEL_NAME = "cwa-embedded-gpt2"

# The block between the two marker lines is rewritten by `python -m cwa.assets.build_model`.
# BEGIN MODEL_SHA256
MODEL_SHA256: dict[str, str] = {
    "config.json": "6f9888540edeb5ec4cae1ddc4a234a11a94bc59946e5e596041053b2e3a0f90c",
    "generation_config.json": "3754e09d0cf6116606def313715836f6ea452063c8fa2e6370cc11e7c15d4aab",
    "model.safetensors": "a777c3c1c3d0ce2832f506c4f69f15a025ad4178eff0da5b5a3455bceb88aea7",
    "tokenizer.json": "d720c73ca626228cbc4aac11330d9747baf2a8f7154be09f041554eb628bd61c",
    "tokenizer_config.json": "874e76c570b46c46fffd58092edb954163e2f30af61d6e38065a3020b2b2f2c7",
    "training_settings.json": "3adc8a4a63c6397259ec8ce8a9761eb1b11716d3e1f6176ed39c8efdb388a730",
}
# END MODEL_SHA256

_SPLIT_PARTS = ("train", "calibration", "evaluation")
# Minimum shares of the corpus characters given to evaluation and calibration (percent).
_EVALUATION_PERCENT = 15
_CALIBRATION_PERCENT = 15

__all__ = [
    "ASSETS_DIR",
    "CORPUS_PATH",
    "CORPUS_SHA256",
    "EMBEDDED_MODEL_NAME",
    "MODEL_DIR",
    "MODEL_SHA256",
    "corpus_split",
    "load_corpus",
    "split_documents",
    "verify_model",
]


def _sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _load_corpus_cached() -> tuple[tuple[str, str], ...]:
    """Read, verify and parse the snapshot once per process (immutable result)."""
    try:
        raw = CORPUS_PATH.read_bytes()
    except OSError as exc:
        raise CwaError(f"embedded corpus missing or unreadable: {CORPUS_PATH} ({exc})") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != CORPUS_SHA256:
        raise CwaError(
            f"embedded corpus is corrupt: SHA-256 of {CORPUS_PATH.name} is {actual}, "
            f"expected {CORPUS_SHA256}"
        )
    topics = json.loads(gzip.decompress(raw).decode("utf-8"))
    return tuple(sorted(topics.items()))


def load_corpus() -> dict[str, str]:
    """Return the embedded corpus as ``{topic name: help text}``.

    The SHA-256 of the compressed file is checked against ``CORPUS_SHA256`` first; a
    mismatch (or a missing file) raises `cwa.errors.CwaError`. Each call returns a new
    dict, so callers may modify it.
    """
    return dict(_load_corpus_cached())


def _topic_order_key(name: str) -> str:
    """Hash order of topic names: fixed forever, independent of Python's str hashing."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _split_cached() -> tuple[tuple[str, tuple[str, ...]], ...]:
    topics = _load_corpus_cached()
    total = sum(len(text) for _, text in topics)
    chars = {"evaluation": 0, "calibration": 0}
    parts: dict[str, list[str]] = {part: [] for part in _SPLIT_PARTS}
    for name, text in sorted(topics, key=lambda item: _topic_order_key(item[0])):
        # Integer comparisons: no float rounding can move a topic between parts.
        if 100 * chars["evaluation"] < _EVALUATION_PERCENT * total:
            part = "evaluation"
        elif 100 * chars["calibration"] < _CALIBRATION_PERCENT * total:
            part = "calibration"
        else:
            part = "train"
        if part != "train":
            chars[part] += len(text)
        parts[part].append(name)
    return tuple((part, tuple(sorted(parts[part]))) for part in _SPLIT_PARTS)


def corpus_split() -> dict[str, list[str]]:
    """Split the corpus topics into disjoint ``train``, ``calibration`` and ``evaluation``.

    The rule, exactly (it depends only on the snapshot, never on the Python version):

    1. Let ``total`` be the number of characters (Unicode code points, ``len(text)``) of
       all topic texts.
    2. Order the topics by the hex SHA-256 of their UTF-8 encoded name (a fixed
       pseudo-random order that does not favour alphabetical neighbours).
    3. Walk the topics in that order. A topic goes to ``evaluation`` while the characters
       already given to evaluation are below 15% of ``total``; otherwise to
       ``calibration`` while its characters are below 15% of ``total``; otherwise to
       ``train``. So evaluation and calibration each get at least 15% (a little more, by
       the size of their last topic) and train gets the rest.

    Train is used only to build the embedded model; calibration feeds scoring; evaluation
    measures the effect of perturbations. Returns ``{part: sorted topic names}``.
    """
    return {part: list(names) for part, names in _split_cached()}


def split_documents(part: str) -> list[str]:
    """Return the texts of one part of the split, in sorted topic-name order.

    ``part`` is one of ``"train"``, ``"calibration"``, ``"evaluation"``; anything else is a
    `cwa.errors.UsageError`.
    """
    if part not in _SPLIT_PARTS:
        raise UsageError(f"unknown corpus part {part!r}; expected one of {', '.join(_SPLIT_PARTS)}")
    topics = dict(_load_corpus_cached())
    return [topics[name] for name in dict(_split_cached())[part]]


def verify_model() -> None:
    """Check every file of the embedded model against ``MODEL_SHA256``.

    Raises `cwa.errors.CwaError` (one line) when the model has not been built, a file is
    missing, a file's SHA-256 differs, or ``MODEL_DIR`` holds a file that is not listed
    (hidden files are ignored).
    """
    if not MODEL_SHA256:
        raise CwaError(
            f"embedded model not built: run `python -m cwa.assets.build_model` ({MODEL_DIR})"
        )
    present = (
        {p.name for p in MODEL_DIR.iterdir() if p.is_file() and not p.name.startswith(".")}
        if MODEL_DIR.is_dir()
        else set()
    )
    missing = sorted(set(MODEL_SHA256) - present)
    if missing:
        raise CwaError(f"embedded model incomplete: missing {', '.join(missing)} in {MODEL_DIR}")
    extra = sorted(present - set(MODEL_SHA256))
    if extra:
        raise CwaError(f"embedded model has unexpected files {', '.join(extra)} in {MODEL_DIR}")
    for name, expected in sorted(MODEL_SHA256.items()):
        actual = _sha256_file(MODEL_DIR / name)
        if actual != expected:
            raise CwaError(
                f"embedded model is corrupt: SHA-256 of {name} is {actual}, expected {expected}"
            )
