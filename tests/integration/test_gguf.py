"""`--model x.gguf`: a tiny HF Llama written as an F32 GGUF (llama.cpp's layout) loads through
transformers' GGUF loader with the same logits, the same tokenizer and the same `cwa eval`."""

from __future__ import annotations

import functools
import json

import pytest

pytest.importorskip("gguf")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cwa.cli import app  # noqa: E402
from cwa.models import load_model  # noqa: E402
from tests.integration import conftest as C  # noqa: E402
from tests.integration.gguf_util import hf_llama_to_gguf  # noqa: E402

runner = CliRunner()

TEXTS = [
    C.make_text(120, 11),
    "hi <|endoftext|> there.\n\nthe model  weight\t9 + 10 = 19; é ü 中文 🙂",
    " leading space, trailing space ",
    "",
]


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def llama_pair(request, tmp_path_factory):
    """(HF directory, .gguf path) of one tiny untied Llama. "bytes": build_tiny's own tokenizer
    (its 200-token budget is under the 257-symbol byte alphabet, so it has no merges); "bpe":
    the same with 320 tokens, so the GGUF carries a real merge table."""
    hf_dir = tmp_path_factory.mktemp(f"llama_{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "bpe":
            mp.setattr(C, "make_tokenizer", functools.partial(C.make_tokenizer, vocab_size=320))
        C.build_tiny(hf_dir, "llama", tied=False)
    # alone in its folder, as a downloaded GGUF is: no tokenizer.json/config.json beside it
    gguf_path = hf_llama_to_gguf(hf_dir, tmp_path_factory.mktemp(f"gguf_{request.param}") / "tiny.gguf")
    return hf_dir, gguf_path


@pytest.fixture(scope="module")
def loaded(llama_pair):
    hf_dir, gguf_path = llama_pair
    hf = load_model(str(hf_dir), dtype="float32", device="cpu")
    gg = load_model(str(gguf_path), dtype="float32", device="cpu")
    return hf, gg


def test_gguf_config_matches_hf(loaded):
    hf, gg = loaded
    assert gg.source == "gguf" and gg.config.model_type == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(gg.config, key) == getattr(hf.config, key), key
    assert gg.config.rms_norm_eps == pytest.approx(hf.config.rms_norm_eps, rel=1e-6)  # stored as f32
    assert gg.config.rope_parameters["rope_theta"] == hf.config.rope_parameters["rope_theta"]


def test_gguf_weights_and_logits_match_hf(loaded):
    hf, gg = loaded
    a, b = hf.model.state_dict(), gg.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:  # q/k included: llama.cpp's row permutation is undone on load
        assert torch.equal(a[name], b[name]), name
    ids = hf.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    bos = hf.tokenizer.bos_token_id
    x = torch.tensor([[bos] + ids[i * 15:(i + 1) * 15] for i in range(4)])
    with torch.no_grad():
        la, lb = hf.model(x).logits, gg.model(x).logits
    assert la.shape == (4, 16, hf.config.vocab_size)
    torch.testing.assert_close(lb, la, rtol=0, atol=1e-5)


def test_gguf_tokenizer_matches_hf(loaded):
    hf, gg = loaded
    ht, gt = hf.tokenizer, gg.tokenizer
    assert len(gt) == len(ht)
    assert gt.get_vocab() == ht.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(gt, attr) == getattr(ht, attr), attr
    assert gt.bos_token_id is not None
    assert sorted(gt.all_special_ids) == sorted(ht.all_special_ids)
    for text in TEXTS:
        for special in (False, True):
            assert gt(text, add_special_tokens=special)["input_ids"] == ht(text, add_special_tokens=special)["input_ids"]
        ids = gt(text, add_special_tokens=False)["input_ids"]
        assert gt.decode(ids) == ht.decode(ids) == text


def test_gguf_beside_hf_tokenizer_files_uses_its_own_tokenizer(llama_pair, loaded, tmp_path):
    """A GGUF converted into its HF folder: transformers alone would take tokenizer.json there
    and lose BOS/EOS; cwa loads the GGUF's tokenizer with the file alone in view."""
    import shutil

    hf_dir, gguf_path = llama_pair
    mixed = shutil.copytree(hf_dir, tmp_path / "mixed")
    shutil.copy(gguf_path, mixed / "tiny.gguf")
    hf, _ = loaded
    gg = load_model(str(mixed / "tiny.gguf"), dtype="float32", device="cpu", lazy=True)
    assert gg.tokenizer.bos_token_id == hf.tokenizer.bos_token_id is not None
    assert gg.tokenizer.eos_token_id == hf.tokenizer.eos_token_id
    assert gg.tokenizer(TEXTS[1])["input_ids"] == hf.tokenizer(TEXTS[1])["input_ids"]
    assert gg.config.vocab_size == hf.config.vocab_size


def _eval(model, data, out):
    args = ["eval", "--model", str(model), "--data", str(data), "--seq-len", "16",
            "--eval-samples", "2", "--device", "cpu", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert r.stdout.strip() == str(out)
    return json.loads(out.read_text())


def test_cli_eval_on_gguf_equals_hf_directory(llama_pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_dir, gguf_path = llama_pair
    data = tmp_path / "words.txt"
    data.write_text(C.make_text(2000, 21))
    gg = _eval(gguf_path, data, tmp_path / "gguf.json")
    hf = _eval(hf_dir, data, tmp_path / "hf.json")
    for key in ("nll", "perplexity", "token_accuracy"):
        assert key in gg and isinstance(gg[key], float), key
    assert gg["model"] == str(gguf_path)
    assert gg["eval_windows"] == hf["eval_windows"]
    assert gg["data_fingerprint"] == hf["data_fingerprint"]
    assert gg["nll"] == pytest.approx(hf["nll"], rel=1e-6, abs=1e-6)
    assert gg["perplexity"] == pytest.approx(hf["perplexity"], rel=1e-6)
    assert gg["token_accuracy"] == hf["token_accuracy"]


def test_cli_eval_missing_gguf_is_one_line_exit_1(tmp_path):
    missing = tmp_path / "nope" / "missing.gguf"
    r = runner.invoke(app, ["eval", "--model", str(missing), "--eval-samples", "1", "--device", "cpu"])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "no such GGUF file" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
