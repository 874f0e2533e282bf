"""Input edge cases: .npy windows wider than the model's context, byte order marks and
line separators in text data, and artifact paths on stdin (`-`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from cwa import artifacts as A
from cwa.data import make_windows, prepare_data, read_documents
from tests.integration.conftest import make_text
from tests.integration.reliability_util import (
    assert_clean_error,
    assert_ok,
    assert_refused,
    invoke,
    tree_state,
)

# --------------------------------------------------------------------------- .npy width


@pytest.fixture()
def wide(tmp_path, tiny_gpt2):
    """`[4, 128]` token windows for a model with 64 positions."""
    assert AutoConfig.from_pretrained(tiny_gpt2).n_positions == 64
    p = tmp_path / "wide.npy"
    np.save(p, np.random.default_rng(0).integers(0, 100, size=(4, 128)))
    return p


@pytest.mark.parametrize("seq", [["--seq-len", "128"], []], ids=["seq-len-128", "no-seq-len"])
def test_npy_wider_than_the_context_is_a_usage_error(tiny_gpt2, wide, tmp_path, seq):
    before = tree_state(tmp_path)
    r = invoke(["score", "--model", tiny_gpt2, "--data", wide, *seq, "--calib-samples", "2",
                "-o", tmp_path / "s.safetensors"])
    line = assert_refused(r, 2, str(wide), "width 128", "context is 64", before=before, roots=[tmp_path])
    assert "--data" in line


def test_npy_eval_data_wider_than_the_context_is_a_usage_error(tiny_gpt2, wide, tmp_path):
    before = tree_state(tmp_path)
    r = invoke(["eval", "--model", tiny_gpt2, "--eval-data", wide, "-o", tmp_path / "e.json"])
    assert_refused(r, 2, "--eval-data", str(wide), "width 128", "context is 64", before=before, roots=[tmp_path])


def test_npy_of_the_context_width_still_works(tiny_gpt2, tmp_path):
    p = tmp_path / "fit.npy"
    np.save(p, np.random.default_rng(0).integers(0, 100, size=(4, 64)))
    out = tmp_path / "e.json"
    assert_ok(invoke(["eval", "--model", tiny_gpt2, "--data", p, "--eval-samples", "1", "-o", out]))
    rep = json.loads(out.read_text())
    assert rep["seq_len"] == 64 and rep["bits_per_byte"] is None


def test_text_seq_len_beyond_the_context_is_a_usage_error(tiny_gpt2, tmp_path):
    t = tmp_path / "t.txt"
    t.write_text(make_text(400, 1))
    before = tree_state(tmp_path)
    r = invoke(["score", "--model", tiny_gpt2, "--data", t, "--seq-len", "128", "-o", tmp_path / "s.safetensors"])
    assert_refused(r, 2, "--seq-len 128", "context of 64", before=before, roots=[tmp_path])


# --------------------------------------------------------------------------- text encodings

BOM = "\ufeff"


def test_jsonl_with_a_byte_order_mark(tmp_path):
    texts = ["the first document", "a second one, é", "third"]
    body = "\n".join(json.dumps({"text": t}) for t in texts)
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(body, encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert read_documents(str(bom)) == read_documents(str(plain)) == texts
    # CRLF line ends too
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + body.replace("\n", "\r\n").encode("utf-8") + b"\r\n")
    assert read_documents(str(crlf)) == texts


def test_txt_with_a_byte_order_mark(tmp_path, tiny_gpt2):
    text = make_text(300, 3)
    plain, bom = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_text(text, encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = read_documents(str(bom))
    assert got == [text] and not got[0].startswith(BOM)
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(bom, d / "a.txt")
    assert read_documents(str(d)) == [text]
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    cfg = AutoConfig.from_pretrained(tiny_gpt2)
    a = prepare_data(tok, cfg, data=str(bom), seq_len=16, calib_samples=None, eval_samples=None)
    b = prepare_data(tok, cfg, data=str(plain), seq_len=16, calib_samples=None, eval_samples=None)
    assert a.calibration.ids.tolist() == b.calibration.ids.tolist() == make_windows([text], tok, 16)[:-len(b.evaluation)].tolist()
    assert a.evaluation.window_bytes.tolist() == b.evaluation.window_bytes.tolist()


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped; a record ends at "\\n"."""
    texts = ["one\u2028two", "three\u2029four\x85five", "six"]
    f = tmp_path / "sep.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts), encoding="utf-8")
    assert read_documents(str(f)) == texts


# --------------------------------------------------------------------------- stdin paths


@pytest.fixture()
def spaced(k, tmp_path):
    """A copy of the kit's scores artifact under a folder whose name holds spaces."""
    d = tmp_path / "dir with space"
    d.mkdir()
    p = d / "s.safetensors"
    shutil.copy(k.scores, p)
    return p


def test_info_reads_one_path_per_line(spaced, k):
    text = f"\n  {spaced}  \r\n\n{k.topk}\r\n"
    r = invoke(["info", "-"], input=text)
    out = assert_ok(r)
    assert f"{spaced}  schema={A.SCORES_SCHEMA}" in out
    assert f"{k.topk}  schema={A.SELECTION_SCHEMA}" in out


def test_rank_reads_a_path_with_spaces(spaced, k, tmp_path):
    via_stdin, direct = tmp_path / "a.h5", tmp_path / "b.h5"
    assert_ok(invoke(["rank", "-", "--topk", "5", "-o", via_stdin], input=f"{spaced}\n"))
    assert_ok(invoke(["rank", spaced, "--topk", "5", "-o", direct]))
    sa, sb = A.read_selection(via_stdin), A.read_selection(direct)
    assert sa.k == 5 and sa.n_draws == 1 and len(sa.draws[0].flat_index) == 5
    for f in ("param_index", "flat_index", "score"):
        np.testing.assert_array_equal(getattr(sa.draws[0], f), getattr(sb.draws[0], f))


@pytest.mark.parametrize("garbage", [
    b"\xff\xfe\x00\x01garbage\x89PNG\r\n\x1a\n",  # not UTF-8
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # not UTF-8 either
    b"path\x00with nul\n",  # UTF-8 but binary (NUL)
], ids=["bytes", "png", "nul"])
@pytest.mark.parametrize("cmd", [["info", "-"], ["rank", "-", "--topk", "5"]], ids=["info", "rank"])
def test_binary_stdin_is_refused_without_echoing_it(k, tmp_path, garbage, cmd):
    before = tree_state(tmp_path)
    r = invoke([*cmd, "-o", tmp_path / "x.h5"] if cmd[0] == "rank" else cmd, input=garbage)
    what = "artifact" if cmd[0] == "info" else "scores"
    line = assert_refused(r, 2, f"'-': stdin did not hold {what} paths (one per line)", before=before, roots=[tmp_path])
    assert line.isprintable() and "PNG" not in line and "garbage" not in line and "nul" not in line


def test_a_missing_path_on_stdin_is_named_printably(k):
    r = invoke(["info", "-"], input=f"{k.scores}\nno\x1b[31msuch\tfile.h5\n")
    line = assert_clean_error(r, 1, "no\\x1b[31msuch\\tfile.h5", "no such file")
    assert line.isprintable()
    long = "x" * 1000 + "\x07"
    r = invoke(["rank", "-", "--topk", "5"], input=long + "\n")
    line = assert_clean_error(r, 1, "x" * 150, "no such file")
    assert line.isprintable() and len(line) < 300 and "\\x07" not in line


def test_empty_stdin_is_still_a_usage_error(k):
    r = invoke(["info", "-"], input="\n  \r\n")
    assert_clean_error(r, 2, "'-'", "stdin")
