"""bits_per_byte counts the bytes of the text the target tokens add, in context.

The references here do not share the library's method: the bytes a window's targets add
are read off the original documents, by decoding every prefix of a document with its
real tokens (`_prefix_bytes`), against tokenizers built like Llama-2's (SentencePiece
word-boundary pieces `▁word`, byte fallback `<0xNN>` for characters without a piece,
decoders that strip the leading space of a decoded string).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwa.data import (
    Windows,
    byte_lengths,
    count_window_bytes,
    make_windows,
    prepare_data,
    tokenize_stream,
)
from cwa.evaluation import evaluate
from tests.integration.reliability_util import assert_ok, invoke

WORDS = "the a model weight layer token gradient loss value error score rank seed data window python is and of to in".split()
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"

# Word boundaries everywhere; é, ï, €, 日本, emoji have no piece and fall back to bytes
# (2, 2, 3, 3+3 and 4 byte tokens); newlines and double spaces too.
DOCS = [
    "the model is the data and the café has a naïve weight of €5 😀 in python",
    "rank the error 😀😀 of a window\nto the loss  value of 日本 data",
    "é€😀 is a value and the seed of the token gradient is the layer",
    "weight loss of a score to the rank in the model and the python data window",
]


def _sp_tokenizer(kind: str, bos: bool = True):
    """A Llama-2-style tokenizer. "bpe": Llama-2's tokenizer.json (normalizer Prepend("▁") +
    Replace(" ", "▁"), BPE with byte_fallback); "unigram": a Metaspace pre-tokenizer
    (prepend_scheme "first", as Mistral's and newer conversions) over a Unigram model with
    byte_fallback. Both decode with Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    if kind == "bpe":
        vocab: dict[str, int] = {}
        for t in specials + bytes_ + ["▁"] + list(CHARS):
            vocab.setdefault(t, len(vocab))
        merges = []
        for w in WORDS:
            cur = "▁"
            for ch in w:
                if (cur, ch) not in merges:
                    merges.append((cur, ch))
                cur += ch
                vocab.setdefault(cur, len(vocab))
        tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        pieces = [(t, 0.0) for t in specials] + [(t, -20.0) for t in bytes_]
        pieces += [("▁", -3.0)] + [(c, -5.0) for c in CHARS] + [("▁" + w, -2.0) for w in WORDS]
        tk = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>" if bos else None, eos_token="</s>", unk_token="<unk>"
    )


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _prefix_bytes(tok, doc_ids: list[int], text: str) -> list[int]:
    """P[j]: bytes of the document `text` covered by its first j tokens. A prefix that
    decodes to a prefix of `text` covers exactly that; one that ends inside a character
    (byte tokens whose character is not complete, decoded as U+FFFD) covers the last
    clean prefix plus one byte per byte token after it."""
    is_byte = set(tok.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
    out, clean_j, clean_b = [0], 0, 0
    for j in range(1, len(doc_ids) + 1):
        s = _decode(tok, doc_ids[:j])
        if "\ufffd" not in s and text.startswith(s):
            clean_j, clean_b = j, len(s.encode("utf-8"))
            out.append(clean_b)
        else:
            assert all(t in is_byte for t in doc_ids[clean_j:j]), "only byte tokens can end mid-character"
            out.append(clean_b + (j - clean_j))
    assert out[-1] == len(text.encode("utf-8"))
    return out


def _reference_bytes(tok, docs: list[str], seq_len: int) -> list[int]:
    """Bytes of every window's targets, from the documents: the stream is rebuilt by hand
    (documents joined with EOS; BOS + seq_len - 1 stream tokens, or seq_len without BOS,
    whose first token is then not a target)."""
    per_doc = [tok.encode(d, add_special_tokens=False) for d in docs]
    pos = []  # (document, token index) of every stream position; None for EOS
    for i, ids in enumerate(per_doc):
        if i:
            pos.append(None)
        pos += [(i, j) for j in range(len(ids))]
    P = [_prefix_bytes(tok, ids, d) for ids, d in zip(per_doc, docs, strict=True)]
    has_bos = tok.bos_token_id is not None
    body = seq_len - 1 if has_bos else seq_len
    out = []
    for k in range(len(pos) // body):
        targets = pos[k * body + (0 if has_bos else 1) : (k + 1) * body]
        out.append(sum(P[i][j + 1] - P[i][j] for i, j in (p for p in targets if p is not None)))
    return out


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def sp(kind):
    tok = _sp_tokenizer(kind)
    for d in DOCS:  # the references rely on an exact round trip
        assert _decode(tok, tok.encode(d, add_special_tokens=False)) == d
    ids = tok.encode(DOCS[0], add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["▁the", "▁model"]
    assert "<0xC3>" in tok.convert_ids_to_tokens(ids)
    return tok


def _old_table_bytes(tok, ids) -> int:
    """What cwa counted before: each target token decoded alone (`byte_lengths`)."""
    bl = byte_lengths(tok)
    return int(bl[ids[:, 1:]].sum())


@pytest.mark.parametrize("seq_len", [5, 8, 13, 32])
def test_window_bytes_equal_the_documents_bytes(sp, seq_len):
    stream = tokenize_stream(DOCS, sp)
    w = make_windows(DOCS, sp, seq_len, stream=stream)
    got = count_window_bytes(stream, sp, seq_len, list(range(len(w))))
    want = _reference_bytes(sp, DOCS, seq_len)
    assert len(want) == len(w)
    assert got.tolist() == want
    # with BOS every stream token is a target: the windows cover every byte once
    body = seq_len - 1
    if len(stream.ids) % body == 0:
        assert int(got.sum()) == sum(len(d.encode()) for d in DOCS)
    # the old per-token table undercounts (a word's leading space lost), so bits_per_byte
    # came out too high
    assert _old_table_bytes(sp, w) < int(got.sum())


def test_windows_without_bos_do_not_count_their_first_token(kind):
    tok = _sp_tokenizer(kind, bos=False)
    assert tok.bos_token_id is None
    for seq_len in (4, 9, 16):
        stream = tokenize_stream(DOCS, tok)
        w = make_windows(DOCS, tok, seq_len, stream=stream)
        assert w.shape[1] == seq_len
        assert count_window_bytes(stream, tok, seq_len, list(range(len(w)))).tolist() == \
            _reference_bytes(tok, DOCS, seq_len)


def test_a_window_start_by_hand(sp):
    """BOS + 2 tokens: [▁the ▁model] [▁is ▁the] [▁data ▁and]: the first window's "the"
    starts the document (its ▁ is the tokenizer's dummy prefix, 3 bytes), the others
    start mid-document (" is the" = 7, " data and" = 9 bytes)."""
    docs = ["the model is the data and"]
    stream = tokenize_stream(docs, sp)
    assert sp.convert_ids_to_tokens(stream.ids) == ["▁the", "▁model", "▁is", "▁the", "▁data", "▁and"]
    got = count_window_bytes(stream, sp, 3, [0, 1, 2]).tolist()
    assert got == [len("the model"), len(" is the"), len(" data and")]
    # the old table: "the model" 3 + 5, "is the" 2 + 3, "data and" 4 + 3
    assert _old_table_bytes(sp, make_windows(docs, sp, 3)) == 20 < sum(got) == 25


def test_a_character_cut_by_a_window_counts_once(sp):
    """"😀" is 4 byte tokens; cut after any of them, each window counts its own bytes."""
    docs = ["a 😀 the"]
    stream = tokenize_stream(docs, sp)
    toks = sp.convert_ids_to_tokens(stream.ids)
    assert toks == ["▁a", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁the"]
    got = count_window_bytes(stream, sp, 2, list(range(7))).tolist()  # one target per window
    assert got == [1, 1, 1, 1, 1, 1, 4]
    assert sum(got) == len(docs[0].encode())


def test_prepare_data_carries_window_bytes(sp, tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=len(sp), max_position_embeddings=64)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in DOCS * 3))
    s = prepare_data(sp, cfg, data=str(f), seq_len=8, calib_samples=3, eval_samples=None)
    docs = DOCS * 3
    ev_docs = [d for i, d in enumerate(docs) if i % 10 == 9]
    cal_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    assert s.evaluation.window_bytes.tolist() == _reference_bytes(sp, ev_docs, 8)
    cal_ref = _reference_bytes(sp, cal_docs, 8)
    assert s.calibration.window_bytes.tolist() == [cal_ref[i] for i in s.calibration.indices]
    # one source split by windows: the evaluation windows are the last ones
    t = tmp_path / "one.txt"
    t.write_text(" ".join(DOCS), encoding="utf-8")
    s = prepare_data(sp, cfg, data=str(t), seq_len=8, calib_samples=2, eval_samples=None)
    ref = _reference_bytes(sp, [" ".join(DOCS)], 8)
    assert s.evaluation.window_bytes.tolist() == [ref[s.calibration.n_available + i] for i in s.evaluation.indices]
    assert s.evaluation.indices == list(range(s.evaluation.n_available))


def test_byte_level_bytes_are_the_old_table(tiny_gpt2, tmp_path):
    """GPT-2's byte-level BPE: every token is its own bytes, so the count is the old
    per-token table's sum, non-ASCII text (split across windows) included."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    docs = DOCS + ["the model 😀 é € data"]
    for seq_len in (5, 16):
        stream = tokenize_stream(docs, tok)
        w = make_windows(docs, tok, seq_len, stream=stream)
        got = count_window_bytes(stream, tok, seq_len, list(range(len(w))))
        bl = byte_lengths(tok)
        assert got.tolist() == [int(bl[row[1:]].sum()) for row in w]
        if len(stream.ids) % (seq_len - 1) == 0:
            assert int(got.sum()) == sum(len(d.encode()) for d in docs)


def test_evaluate_divides_by_window_bytes(tiny_llama):
    """evaluate(): summed NLL in bits over summed window_bytes; byte_lengths is unused
    when window_bytes is given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (4, 10), generator=g)
    nb = np.array([7, 0, 30, 11])
    w = Windows(ids, list(range(4)), "t", False, 4, byte_lengths=np.full(1000, 99), window_bytes=nb)
    m = evaluate(model, w, batch_size=3).metrics
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / 48, rel=1e-5)
    w0 = Windows(ids, list(range(4)), "t", False, 4, window_bytes=np.zeros(4, dtype=np.int64))
    assert evaluate(model, w0).metrics["bits_per_byte"] is None


def test_cwa_eval_with_a_sentencepiece_llama(tmp_path):
    """End to end: a tiny Llama saved with the Llama-2-style tokenizer; `cwa eval`'s
    bits_per_byte is the summed NLL / ln 2 / the documents' bytes of its windows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _sp_tokenizer("bpe")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path / "sp-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    text = " ".join(DOCS * 6)
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "eval.json"
    r = invoke(["eval", "--model", d, "--data", data, "--seq-len", "32", "--eval-samples", "3", "-o", out])
    assert_ok(r)
    rep = json.loads(out.read_text())

    # the windows by hand: one document, BOS + 31 stream tokens, the last 10% evaluate
    stream = tok.encode(text, add_special_tokens=False)
    n = len(stream) // 31
    rows = [[tok.bos_token_id] + stream[k * 31 : (k + 1) * 31] for k in range(n)]
    first_eval = n - max(1, math.ceil(0.1 * n))
    assert n - first_eval == 3 and rep["eval_windows"] == [0, 1, 2]
    ids = torch.tensor(rows[first_eval:])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
    true_bytes = sum(_reference_bytes(tok, [text], 32)[first_eval:])
    assert rep["n_tokens"] == 3 * 31
    assert rep["nll"] * rep["n_tokens"] == pytest.approx(nll, rel=1e-5)
    assert rep["bits_per_byte"] == pytest.approx(nll / math.log(2) / true_bytes, rel=1e-5)
    old = nll / math.log(2) / _old_table_bytes(tok, ids)
    assert old > rep["bits_per_byte"] * 1.03  # the old count was off by this much


def test_old_method_error_factor(sp):
    """The old per-token table overstated bits_per_byte by true / old bytes: x1.263 here
    (918 bytes counted of 1159), mostly the space of every word-initial piece."""
    text = " ".join(DOCS * 4)
    stream = tokenize_stream([text], sp)
    w = make_windows([text], sp, 32, stream=stream)
    true = int(count_window_bytes(stream, sp, 32, list(range(len(w)))).sum())
    assert true == sum(_reference_bytes(sp, [text], 32))
    old = _old_table_bytes(sp, w)
    assert (old, true) == (918, 1159)
