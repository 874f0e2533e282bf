"""The embedded corpus and model: integrity, the split, and that the model is a real LM."""

from __future__ import annotations

import hashlib
import math

import pytest

import cwa.assets as assets
from cwa.errors import CwaError, UsageError

# Pinned so that a change of the rule, of the snapshot or of Python cannot move topics
# between parts unnoticed (the README lists this split).
EXPECTED_EVALUATION = [
    "augassign",
    "await",
    "bltin-null-object",
    "break",
    "class",
    "for",
    "formatstrings",
    "numeric-types",
    "power",
    "sequence-types",
    "specialattrs",
    "try",
    "typesseq",
    "while",
    "with",
]
EXPECTED_CALIBRATION = ["assert", "async", "atom-identifiers", "slicings", "specialnames"]


# ------------------------------------------------------------------------------ corpus


def test_corpus_sha256_matches_file():
    assert hashlib.sha256(assets.CORPUS_PATH.read_bytes()).hexdigest() == assets.CORPUS_SHA256


def test_corpus_loads_79_topics():
    corpus = assets.load_corpus()
    assert len(corpus) == 79
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in corpus.items())
    corpus.clear()  # callers get their own copy
    assert len(assets.load_corpus()) == 79


def test_corpus_license_notice_is_shipped():
    text = (assets.CORPUS_PATH.parent / "LICENSE-PSF.txt").read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in text
    assert "Python Software Foundation; All Rights Reserved" in text


def test_corrupt_corpus_is_a_cwa_error(monkeypatch):
    monkeypatch.setattr(assets, "CORPUS_SHA256", "0" * 64)
    assets._load_corpus_cached.cache_clear()
    try:
        with pytest.raises(CwaError, match="embedded corpus is corrupt"):
            assets.load_corpus()
    finally:
        assets._load_corpus_cached.cache_clear()


# ------------------------------------------------------------------------------- split


def test_split_is_a_disjoint_cover():
    split = assets.corpus_split()
    assert set(split) == {"train", "calibration", "evaluation"}
    names = [n for part in split.values() for n in part]
    assert len(names) == len(set(names))
    assert set(names) == set(assets.load_corpus())
    for part in split.values():
        assert part and part == sorted(part)


def test_split_is_deterministic_and_pinned():
    assert assets.corpus_split() == assets.corpus_split()
    split = assets.corpus_split()
    assert split["evaluation"] == EXPECTED_EVALUATION
    assert split["calibration"] == EXPECTED_CALIBRATION


def test_split_shares_follow_the_rule():
    corpus = assets.load_corpus()
    total = sum(map(len, corpus.values()))
    split = assets.corpus_split()
    for part in ("evaluation", "calibration"):
        assert sum(len(corpus[n]) for n in split[part]) >= 0.15 * total
    assert sum(len(corpus[n]) for n in split["train"]) >= 0.5 * total


def test_split_documents_order_and_unknown_part():
    corpus = assets.load_corpus()
    for part, names in assets.corpus_split().items():
        assert assets.split_documents(part) == [corpus[n] for n in names]
    with pytest.raises(UsageError, match="unknown corpus part"):
        assets.split_documents("test")


# ------------------------------------------------------------------------------- model


def test_model_files_match_sha256():
    assert assets.MODEL_SHA256, "embedded model not built"
    files = {p.name for p in assets.MODEL_DIR.iterdir() if p.is_file()}
    assert files == set(assets.MODEL_SHA256)
    assets.verify_model()


def test_verify_model_detects_tampering(monkeypatch):
    tampered = dict(assets.MODEL_SHA256)
    tampered["config.json"] = "0" * 64
    monkeypatch.setattr(assets, "MODEL_SHA256", tampered)
    with pytest.raises(CwaError, match="corrupt: SHA-256 of config.json"):
        assets.verify_model()
    monkeypatch.setattr(assets, "MODEL_SHA256", {**assets.MODEL_SHA256, "gone.bin": "0" * 64})
    with pytest.raises(CwaError, match="missing gone.bin"):
        assets.verify_model()


def test_model_dir_is_at_most_5_mb():
    size = sum(p.stat().st_size for p in assets.MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 5_000_000


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(assets.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(assets.MODEL_DIR)
    model.eval()
    return model, tokenizer


def test_model_is_gpt2_with_conv1d(model_and_tokenizer):
    from transformers.pytorch_utils import Conv1D

    model, tokenizer = model_and_tokenizer
    assert model.config.model_type == "gpt2"
    assert model.config.n_positions >= 256
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv) == 4 * model.config.n_layer  # c_attn, c_proj, c_fc, mlp c_proj
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert len(tokenizer) == model.config.vocab_size


def test_model_predicts_evaluation_text(model_and_tokenizer):
    """A real margin: mean NLL on held-out windows is far below the uniform log(V)."""
    import torch

    from cwa.assets.build_model import make_windows, window_nll

    model, tokenizer = model_and_tokenizer
    windows = make_windows(tokenizer, assets.split_documents("evaluation"), 256)
    assert len(windows) > 2 * 32 and windows[:, 0].eq(tokenizer.bos_token_id).all()
    assert len(make_windows(tokenizer, assets.split_documents("calibration"), 256)) > 2 * 32
    with torch.no_grad():
        nll = window_nll(model(input_ids=windows[:4]).logits, windows[:4]).mean().item()
    uniform = math.log(model.config.vocab_size)
    assert nll < uniform - 2.0, (nll, uniform)
