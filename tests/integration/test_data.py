"""Data forms, windowing, splitting and sampling against hand constructions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from cwa.data import make_windows, prepare_data, read_documents
from cwa.errors import UsageError


@pytest.fixture(scope="module")
def tok_cfg(tiny_gpt2):
    return AutoTokenizer.from_pretrained(tiny_gpt2), AutoConfig.from_pretrained(tiny_gpt2)


def test_windows_match_a_hand_construction(tok_cfg):
    tok, _ = tok_cfg
    docs = ["the model has a weight.", "python function return value", "a b c"]
    w = make_windows(docs, tok, seq_len=6)
    stream = []
    for i, d in enumerate(docs):
        if i:
            stream.append(tok.eos_token_id)
        stream += tok.encode(d, add_special_tokens=False)
    n = len(stream) // 5
    want = [[tok.bos_token_id] + stream[j * 5 : (j + 1) * 5] for j in range(n)]
    assert w.tolist() == want


def test_windows_without_bos_use_full_length(tok_cfg):
    tok, _ = tok_cfg
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.bos_token = None
    w = make_windows(["the model has a weight and a value"] * 3, tok2, seq_len=4)
    assert w.shape[1] == 4
    stream = []
    for i in range(3):
        if i:
            stream.append(tok.eos_token_id)
        stream += tok.encode("the model has a weight and a value", add_special_tokens=False)
    assert w.reshape(-1).tolist() == stream[: (len(stream) // 4) * 4]


def test_every_data_form_loads(tok_cfg, text_docs, tmp_path):
    tok, cfg = tok_cfg
    d, docs = text_docs
    single = tmp_path / "one.txt"
    single.write_text("\n".join(docs))
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)))
    for spec in (str(d), str(single), str(jl)):
        s = prepare_data(tok, cfg, data=spec, seq_len=16, calib_samples=4, eval_samples=2)
        assert s.calibration.ids.shape == (4, 16) and s.evaluation.ids.shape == (2, 16)
    arr = np.random.default_rng(0).integers(0, len(tok), size=(20, 16))
    npy = tmp_path / "w.npy"
    np.save(npy, arr)
    s = prepare_data(tok, cfg, data=str(npy), seq_len=16, calib_samples=5, eval_samples=2)
    # .npy windows are used verbatim: the last 10% (2 windows) evaluate
    assert s.evaluation.ids.tolist() == arr[18:].tolist()
    assert all(row in arr[:18].tolist() for row in s.calibration.ids.tolist())
    assert s.evaluation.byte_lengths is None
    # jsonl and a directory give the same documents in the same order
    assert read_documents(str(jl)) == read_documents(str(d))


def test_ten_or_more_documents_split_by_document(tok_cfg, text_docs):
    tok, cfg = tok_cfg
    d, docs = text_docs
    s = prepare_data(tok, cfg, data=str(d), seq_len=16, calib_samples=None, eval_samples=None)
    ev_docs = [docs[9]]  # i % 10 == 9
    cal_docs = [t for i, t in enumerate(docs) if i % 10 != 9]
    assert s.evaluation.ids.tolist() == make_windows(ev_docs, tok, 16).tolist()
    assert s.calibration.ids.tolist() == make_windows(cal_docs, tok, 16).tolist()


def test_few_documents_split_last_ten_percent_of_windows(tok_cfg, text_docs):
    tok, cfg = tok_cfg
    _, docs = text_docs
    from pathlib import Path

    p = Path(tok.name_or_path) / "few.txt"
    p.write_text(docs[0] + docs[1])
    s = prepare_data(tok, cfg, data=str(p), seq_len=16, calib_samples=None, eval_samples=None)
    allw = make_windows([docs[0] + docs[1]], tok, 16)
    n_eval = int(np.ceil(0.1 * len(allw)))
    assert s.evaluation.ids.tolist() == allw[-n_eval:].tolist()
    assert s.calibration.ids.tolist() == allw[:-n_eval].tolist()


def test_sampling_is_seeded_and_eval_is_independent_of_seed(tok_cfg, text_docs):
    tok, cfg = tok_cfg
    d, _ = text_docs
    a = prepare_data(tok, cfg, data=str(d), seq_len=16, calib_samples=5, eval_samples=3, data_seed=0)
    b = prepare_data(tok, cfg, data=str(d), seq_len=16, calib_samples=5, eval_samples=3, data_seed=0)
    c = prepare_data(tok, cfg, data=str(d), seq_len=16, calib_samples=5, eval_samples=3, data_seed=1)
    assert a.calibration.indices == b.calibration.indices
    assert a.calibration.indices != c.calibration.indices
    assert len(set(a.calibration.indices)) == 5
    assert a.evaluation.indices == c.evaluation.indices
    assert torch.equal(a.evaluation.ids, c.evaluation.ids)


@pytest.mark.parametrize(
    "make,kwargs,needle",
    [
        (lambda p: str(p / "missing.txt"), {}, "no such file"),
        (lambda p: (p / "empty.txt").write_text("") and str(p / "empty.txt") or str(p / "empty.txt"), {}, "no text"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "x"}\n') and str(p / "x.jsonl"), {}, "'text'"),
        (lambda p: (p / "x.csv").write_text("a,b") and str(p / "x.csv"), {}, "unsupported"),
        (lambda p: None, {"seq_len": 0}, "--seq-len 0"),
        (lambda p: None, {"seq_len": 10_000}, "context"),
        (lambda p: None, {"calib_samples": 10_000}, "10000"),
        (lambda p: "hf:some/dataset", {}, "datasets"),
    ],
)
def test_bad_data_is_one_clear_usage_error(tok_cfg, tmp_path, make, kwargs, needle):
    tok, cfg = tok_cfg
    spec = make(tmp_path)
    kw = {"seq_len": 16, "calib_samples": 2, "eval_samples": 1, **kwargs}
    if spec is None:
        d = tmp_path / "ok.txt"
        d.write_text("the model has a weight " * 200)
        spec = str(d)
    with pytest.raises(UsageError) as e:
        prepare_data(tok, cfg, data=spec, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_wrongly_shaped_npy_is_refused(tok_cfg, tmp_path):
    tok, cfg = tok_cfg
    p = tmp_path / "bad.npy"
    np.save(p, np.zeros((3,), dtype=np.int64))
    with pytest.raises(UsageError, match="integer array"):
        prepare_data(tok, cfg, data=str(p))
    np.save(p, np.zeros((4, 8), dtype=np.int64))
    with pytest.raises(UsageError, match="--seq-len"):
        prepare_data(tok, cfg, data=str(p), seq_len=16)
