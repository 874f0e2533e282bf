"""Bad input, every command: one clear stderr line naming the value and the fix, exit 2
(usage) or 1 (run-time failure), nothing on stdout, no traceback unless CWA_DEBUG=1.

Most of the matrix runs in process (`CliRunner`); a few cases run the console script as
a real process, where the parser's own errors and the top-level handler live.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.integration.reliability_util import (
    SEQ,
    assert_clean_error,
    assert_ok,
    cwa_subprocess,
    invoke,
)


@pytest.fixture(scope="module")
def bad(k):
    """Files that are not what a command expects."""
    import h5py

    d = k.root / "bad"
    if d.exists():
        return d
    d.mkdir()
    (d / "junk.txt").write_text("hello, not an artifact")
    (d / "empty.txt").write_text("")
    (d / "zero.h5").write_bytes(b"")
    (d / "latin1.txt").write_bytes(b"\xff\xfe caf\xe9 " * 20)
    (d / "short.txt").write_text("the")
    (d / "notext.jsonl").write_text('{"body": "x"}\n')
    (d / "badjson.jsonl").write_text("{nope\n")
    (d / "table.csv").write_text("a,b\n1,2\n")
    (d / "empty_dir").mkdir()
    np.save(d / "float.npy", np.zeros((4, int(SEQ)), dtype=np.float32))
    np.save(d / "flat.npy", np.zeros((int(SEQ),), dtype=np.int64))
    np.save(d / "narrow.npy", np.zeros((4, 8), dtype=np.int64))
    np.save(d / "oov.npy", np.full((4, int(SEQ)), 10**6, dtype=np.int64))
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    with h5py.File(d / "plain.h5", "w") as f:  # HDF5, but not written by cwa
        f["x"] = [1, 2, 3]
    s = k.scores.read_bytes()
    (d / "trunc.safetensors").write_bytes(s[: len(s) // 2])
    h = k.topk.read_bytes()
    (d / "trunc.h5").write_bytes(h[: len(h) // 2])
    (d / "no_config").mkdir()
    (d / "no_config" / "tokenizer.json").write_text("{}")
    (d / "bad_config").mkdir()
    (d / "bad_config" / "config.json").write_text("{")
    shutil.copytree(k.model, d / "bad_weights")
    (d / "bad_weights" / "model.safetensors").write_bytes(b"garbage" * 10)
    return d


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.chdir(tmp_path)  # default outputs (./cwa-out) land here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import: the hub is imported by now


def _case(id_, code, needles, make):
    return pytest.param(make, code, needles, id=id_)


M, D = "{model}", "{data}"  # placeholders, expanded by _args

CASES = [
    # ---- unknown names, with "did you mean"
    _case("score-unknown-metric", 2, ["'grad_x_weigth'", "Did you mean: grad_x_weight"],
          lambda k, b: ["score", "--model", M, D, "--metric", "grad_x_weigth"]),
    _case("perturb-unknown-method", 2, ["'sign_flp'", "Did you mean: sign_flip"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "sign_flp"]),
    _case("control-unknown-kind", 2, ["'random_kk'", "Did you mean: random_k"],
          lambda k, b: ["control", k.scores, "--kind", "random_kk", "--topk", "5"]),
    _case("rank-unknown-mode", 2, ["--mode 'globl'", "Did you mean: global"],
          lambda k, b: ["rank", k.scores, "--mode", "globl"]),
    _case("rank-unknown-rank-by", 2, ["--rank-by 'ab'", "Did you mean: abs"],
          lambda k, b: ["rank", k.scores, "--rank-by", "ab"]),
    _case("control-unknown-mode", 2, ["--mode 'perlayer'", "Did you mean: per_layer"],
          lambda k, b: ["control", k.scores, "--topk", "5", "--mode", "perlayer"]),
    _case("perturb-unknown-bit", 2, ["--bit 'expo'", "exponent_msb"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "bit_flip", "--bit", "expo"]),
    _case("run-unknown-control", 2, ["'random_kk'", "Did you mean: random_k"],
          lambda k, b: ["run", "--model", M, "--controls", "random_kk"]),
    _case("run-unknown-metric", 2, ["'hessian'", "Did you mean: hessian_diag"],
          lambda k, b: ["run", "--model", M, "--metric", "hessian"]),
    _case("run-unknown-perturbation", 2, ["'gaus_noise'", "Did you mean: gauss_noise"],
          lambda k, b: ["run", "--model", M, "--perturb", "gaus_noise"]),
    _case("eval-unknown-dtype", 2, ["--dtype 'float8'"], lambda k, b: ["eval", "--model", M, "--dtype", "float8"]),
    _case("eval-unknown-device", 2, ["--device 'tpu'"], lambda k, b: ["eval", "--model", M, "--device", "tpu"]),
    # ---- models that are missing or unreadable
    _case("model-missing-dir", 1, ["/nonexistent/model/dir", "no such directory"],
          lambda k, b: ["eval", "--model", "/nonexistent/model/dir"]),
    _case("model-not-on-hub-offline", 1, ["some-org/not-a-model", "not available offline"],
          lambda k, b: ["eval", "--model", "some-org/not-a-model"]),
    _case("model-is-a-file", 1, ["junk.txt", "model directory"],
          lambda k, b: ["score", "--model", b / "junk.txt"]),
    _case("model-dir-without-config", 1, ["no_config", "no config.json"],
          lambda k, b: ["eval", "--model", b / "no_config"]),
    _case("model-corrupt-config", 1, ["bad_config", "cannot load"],
          lambda k, b: ["eval", "--model", b / "bad_config"]),
    _case("model-corrupt-weights", 1, ["model.safetensors", "not a valid safetensors file"],
          lambda k, b: ["eval", "--model", b / "bad_weights", D]),
    _case("model-missing-gguf", 1, ["nope.gguf", "no such GGUF file"],
          lambda k, b: ["perturb", k.topk, "--model", "nope.gguf"]),
    # ---- data: missing, empty, wrongly shaped, wrong type
    _case("data-missing", 2, ["--data missing.txt", "no such file"],
          lambda k, b: ["score", "--model", M, "--data", "missing.txt"]),
    _case("eval-data-missing", 2, ["missing.txt", "no such file"],
          lambda k, b: ["eval", "--model", M, D, "--eval-data", "missing.txt"]),
    _case("data-empty", 2, ["empty.txt", "no text"],
          lambda k, b: ["score", "--model", M, "--data", b / "empty.txt"]),
    _case("eval-data-empty", 2, ["empty.txt", "no text"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--eval-data", b / "empty.txt"]),
    _case("data-empty-dir", 2, ["empty_dir", "no .txt files"],
          lambda k, b: ["score", "--model", M, "--data", b / "empty_dir"]),
    _case("data-too-short", 2, ["short.txt", "--seq-len"],
          lambda k, b: ["score", "--model", M, "--data", b / "short.txt", "--seq-len", SEQ]),
    _case("data-not-utf8", 2, ["latin1.txt", "UTF-8"],
          lambda k, b: ["score", "--model", M, "--data", b / "latin1.txt"]),
    _case("data-wrong-type", 2, ["table.csv", "unsupported file type"],
          lambda k, b: ["eval", "--model", M, "--data", b / "table.csv"]),
    _case("data-jsonl-without-text", 2, ["notext.jsonl", "'text'"],
          lambda k, b: ["score", "--model", M, "--data", b / "notext.jsonl"]),
    _case("data-jsonl-invalid", 2, ["badjson.jsonl", "line 1"],
          lambda k, b: ["score", "--model", M, "--data", b / "badjson.jsonl"]),
    _case("npy-float", 2, ["float.npy", "integer array"],
          lambda k, b: ["score", "--model", M, "--data", b / "float.npy"]),
    _case("npy-1d", 2, ["flat.npy", "[N, seq_len]"],
          lambda k, b: ["score", "--model", M, "--data", b / "flat.npy"]),
    _case("npy-width-vs-seq-len", 2, ["narrow.npy", "--seq-len is 16"],
          lambda k, b: ["score", "--model", M, "--data", b / "narrow.npy", "--seq-len", SEQ]),
    _case("npy-out-of-vocabulary", 2, ["oov.npy", "vocabulary"],
          lambda k, b: ["eval", "--model", M, "--data", b / "oov.npy"]),
    _case("npy-pickled-objects", 2, ["pickled.npy", "not a readable .npy"],
          lambda k, b: ["score", "--model", M, "--data", b / "pickled.npy"]),
    _case("npy-garbage", 2, ["garbage.npy", "not a readable .npy"],
          lambda k, b: ["score", "--model", M, "--data", b / "garbage.npy"]),
    # ---- --seq-len
    _case("seq-len-zero", 2, ["--seq-len 0", "at least 2"],
          lambda k, b: ["score", "--model", M, "--data", k.text, "--seq-len", "0"]),
    _case("seq-len-beyond-context", 2, ["--seq-len 100000", "context of 64"],
          lambda k, b: ["eval", "--model", M, "--data", k.text, "--seq-len", "100000"]),
    _case("perturb-seq-len-beyond-context", 2, ["--seq-len 65", "context of 64"],
          lambda k, b: ["perturb", k.topk, "--model", M, "--data", k.text, "--seq-len", "65"]),
    # ---- sample counts
    _case("calib-samples-zero", 2, ["--calib-samples 0"], lambda k, b: ["score", "--model", M, D, "--calib-samples", "0"]),
    _case("calib-samples-negative", 2, ["--calib-samples -3"], lambda k, b: ["score", "--model", M, D, "--calib-samples", "-3"]),
    _case("calib-samples-too-many", 2, ["--calib-samples 100000", "at most"],
          lambda k, b: ["score", "--model", M, D, "--calib-samples", "100000"]),
    _case("eval-samples-zero", 2, ["--eval-samples 0"], lambda k, b: ["eval", "--model", M, D, "--eval-samples", "0"]),
    _case("eval-samples-too-many", 2, ["--eval-samples 100000", "at most"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--eval-samples", "100000"]),
    _case("batch-size-zero", 2, ["--batch-size 0"], lambda k, b: ["score", "--model", M, D, "--batch-size", "0"]),
    _case("hutchinson-samples-zero", 2, ["--hutchinson-samples 0"],
          lambda k, b: ["score", "--model", M, D, "--metric", "hutchinson_diag", "--hutchinson-samples", "0"]),
    _case("mc-samples-negative", 2, ["--mc-samples -1"],
          lambda k, b: ["score", "--model", M, D, "--metric", "hessian_diag", "--mc-samples", "-1"]),
    _case("control-draws-zero", 2, ["--control-draws 0"],
          lambda k, b: ["control", k.scores, "--ref", k.topk, "--control-draws", "0"]),
    _case("run-calib-samples-zero", 2, ["--calib-samples 0"], lambda k, b: ["run", "--model", M, "--calib-samples", "0"]),
    _case("run-control-draws-zero", 2, ["--control-draws 0"], lambda k, b: ["run", "--model", M, "--control-draws", "0"]),
    # ---- K
    _case("rank-k-zero", 2, ["--topk 0"], lambda k, b: ["rank", k.scores, "--topk", "0"]),
    _case("rank-k-negative", 2, ["--topk -4"], lambda k, b: ["rank", k.scores, "--topk", "-4"]),
    _case("rank-k-beyond-population", 2, ["100000000", "population"],
          lambda k, b: ["rank", k.scores, "--topk", "100000000"]),
    _case("control-k-zero", 2, ["--topk 0"], lambda k, b: ["control", k.scores, "--topk", "0"]),
    _case("control-k-beyond-population", 2, ["100000000", "population"],
          lambda k, b: ["control", k.scores, "--topk", "100000000"]),
    _case("control-k-no-room-outside-topk", 2, ["layer_matched", "smaller K"],
          lambda k, b: ["control", k.scores, "--topk", "20000", "--kind", "layer_matched"]),
    _case("stability-k-zero", 2, ["--topk 0"], lambda k, b: ["stability", k.scores, k.scores1, "--topk", "0"]),
    _case("stability-k-beyond-population", 2, ["--topk 100000000", "population"],
          lambda k, b: ["stability", k.scores, k.scores1, "--topk", "100000000"]),
    _case("run-k-zero", 2, ["--topk 0"], lambda k, b: ["run", "--model", M, "--topk", "0"]),
    _case("run-k-malformed", 2, ["--topk '10,x'"], lambda k, b: ["run", "--model", M, "--topk", "10,x"]),
    # ---- scale and probability
    _case("scale-negative", 2, ["--perturb-scale -1"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb-scale", "-1"]),
    _case("scale-nan", 2, ["--perturb-scale", "nan"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb-scale", "nan"]),
    _case("prob-above-one", 2, ["--perturb-prob 1.5", "[0, 1]"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "bit_flip", "--perturb-prob", "1.5"]),
    _case("prob-negative", 2, ["--perturb-prob -0.1", "[0, 1]"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "bit_flip", "--perturb-prob", "-0.1"]),
    _case("bit-index-out-of-range", 2, ["--bit 99", "0..31"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "bit_flip", "--bit", "99"]),
    _case("perturb-none-in-stage", 2, ["--perturb none"],
          lambda k, b: ["perturb", k.topk, "--model", M, D, "--perturb", "none"]),
    _case("run-prob-above-one", 2, ["--perturb-prob 2"],
          lambda k, b: ["run", "--model", M, D, "--calib-samples", "2", "--eval-samples", "2", "--seeds", "0",
                        "--perturb", "bit_flip", "--perturb-prob", "2", "--out-dir", "o"]),
    _case("run-scale-negative", 2, ["--perturb-scale -2"],
          lambda k, b: ["run", "--model", M, D, "--calib-samples", "2", "--eval-samples", "2", "--seeds", "0",
                        "--perturb-scale", "-2", "--out-dir", "o"]),
    # ---- --seeds
    _case("seeds-not-integers", 2, ["--seeds '0,a'", "0,1,2"], lambda k, b: ["run", "--model", M, "--seeds", "0,a"]),
    _case("seeds-empty", 2, ["--seeds ''"], lambda k, b: ["run", "--model", M, "--seeds", ""]),
    _case("seeds-duplicates", 2, ["--seeds '0,0'", "duplicates"], lambda k, b: ["run", "--model", M, "--seeds", "0,0"]),
    _case("seeds-blank-entry", 2, ["--seeds '0,,x'"], lambda k, b: ["run", "--model", M, "--seeds", "0,,x"]),
    # ---- globs that match nothing
    _case("include-matches-nothing", 2, ["nomatch.*", "--include"],
          lambda k, b: ["score", "--model", M, D, "--include", "nomatch.*"]),
    _case("exclude-everything", 2, ["--exclude"],
          lambda k, b: ["score", "--model", M, "--metric", "magnitude", "--exclude", "*"]),
    _case("shell-glob-matched-nothing-rank", 1, ["scores_seed*.safetensors", "matches"],
          lambda k, b: ["rank", "out/scores_seed*.safetensors"]),
    _case("shell-glob-matched-nothing-stability", 1, ["scores_seed*.safetensors", "matches"],
          lambda k, b: ["stability", "out/scores_seed*.safetensors", "--topk", "5"]),
    _case("shell-glob-matched-nothing-plot", 1, ["topk_*.h5", "matches"],
          lambda k, b: ["plot", "out/topk_*.h5", "-o", "figs"]),
    _case("plot-dir-without-artifacts", 2, ["nothing to plot"], lambda k, b: ["plot", b / "empty_dir", "-o", "figs"]),
    _case("stdin-dash-without-paths", 2, ["'-'", "stdin"], lambda k, b: ["rank", "-"]),
    # ---- files that are not artifacts, truncated, of the wrong schema
    _case("scores-is-text", 1, ["junk.txt", "not a safetensors file"], lambda k, b: ["rank", b / "junk.txt"]),
    _case("scores-empty-file", 1, ["zero.h5", "not a safetensors file"], lambda k, b: ["rank", b / "zero.h5"]),
    _case("scores-is-a-directory", 1, ["empty_dir", "is a directory"], lambda k, b: ["rank", b / "empty_dir"]),
    _case("scores-is-a-model-checkpoint", 1, ["model.safetensors", "no cwa schema"],
          lambda k, b: ["rank", Path(k.model) / "model.safetensors"]),
    _case("scores-truncated", 1, ["trunc.safetensors", "truncated"], lambda k, b: ["rank", b / "trunc.safetensors"]),
    _case("scores-is-a-selection", 1, ["topk.h5", "not a safetensors file"], lambda k, b: ["rank", k.topk]),
    _case("selection-is-scores", 1, ["scores.safetensors", "not a cwa HDF5 artifact"],
          lambda k, b: ["perturb", k.scores, "--model", M, D]),
    _case("selection-truncated", 1, ["trunc.h5", "SHA-256"], lambda k, b: ["perturb", b / "trunc.h5", "--model", M, D]),
    _case("selection-foreign-hdf5", 1, ["plain.h5", "not a cwa HDF5 artifact"],
          lambda k, b: ["perturb", b / "plain.h5", "--model", M, D]),
    _case("selection-is-results", 1, ["perturb.h5", "expected a selection/1", "perturbation/1"],
          lambda k, b: ["perturb", k.perturb, "--model", M, D]),
    _case("selection-missing", 1, ["gone.h5", "no such file"], lambda k, b: ["perturb", "gone.h5", "--model", M, D]),
    _case("ref-is-a-control", 2, ["random.h5", "expected a top-K selection"],
          lambda k, b: ["control", k.scores, "--ref", k.random]),
    _case("ref-is-scores", 1, ["scores.safetensors", "not a cwa HDF5 artifact"],
          lambda k, b: ["control", k.scores, "--ref", k.scores]),
    _case("ref-of-other-scores", 1, ["topk.h5", "other scores"], lambda k, b: ["control", k.scores1, "--ref", k.topk]),
    _case("ref-truncated", 1, ["trunc.h5", "SHA-256"], lambda k, b: ["control", k.scores, "--ref", b / "trunc.h5"]),
    _case("info-not-an-artifact", 1, ["junk.txt"], lambda k, b: ["info", b / "junk.txt"]),
    _case("info-truncated-h5", 1, ["trunc.h5", "SHA-256"], lambda k, b: ["info", b / "trunc.h5"]),
    _case("info-truncated-scores", 1, ["trunc.safetensors", "truncated"], lambda k, b: ["info", b / "trunc.safetensors"]),
    _case("info-foreign-hdf5", 1, ["plain.h5"], lambda k, b: ["info", b / "plain.h5"]),
    _case("stability-truncated", 1, ["trunc.safetensors", "truncated"],
          lambda k, b: ["stability", k.scores, b / "trunc.safetensors", "--topk", "5"]),
    _case("stability-wrong-schema", 2, ["perturb.h5", "perturbation/1"],
          lambda k, b: ["stability", k.topk, k.perturb]),
    _case("stability-mixed-kinds", 2, ["not both"], lambda k, b: ["stability", k.scores, k.topk, "--topk", "5"]),
    _case("plot-not-an-artifact", 1, ["junk.txt"], lambda k, b: ["plot", b / "junk.txt", "-o", "figs"]),
    _case("plot-truncated", 1, ["trunc.h5", "SHA-256"], lambda k, b: ["plot", b / "trunc.h5", "-o", "figs"]),
    _case("plot-output-is-a-file", 2, ["-o", "is a file"], lambda k, b: ["plot", k.topk, "-o", b / "junk.txt"]),
    _case("output-is-a-directory", 2, ["-o", "is a directory"], lambda k, b: ["rank", k.scores, "-o", b / "empty_dir"]),
    # ---- artifacts of another model (fingerprint mismatch)
    _case("rank-other-model", 1, ["scores.safetensors", "another model", "--model"],
          lambda k, b: ["rank", k.scores, "--model", k.other]),
    _case("perturb-other-model", 1, ["topk.h5", "another model"],
          lambda k, b: ["perturb", k.topk, "--model", k.other, D]),
    _case("control-other-model", 1, ["scores.safetensors", "another model"],
          lambda k, b: ["control", k.scores, "--ref", k.topk, "--kind", "magnitude_matched", "--model", k.other]),
    _case("stability-other-model", 1, ["different models"],
          lambda k, b: ["stability", k.scores, k.other_scores, "--topk", "5"]),
    # ---- stability given one seed, or no K
    _case("stability-one-seed", 2, ["at least two"], lambda k, b: ["stability", k.scores, "--topk", "5"]),
    _case("stability-one-selection", 2, ["at least two"], lambda k, b: ["stability", k.topk]),
    _case("stability-scores-without-k", 2, ["--topk"], lambda k, b: ["stability", k.scores, k.scores1]),
]


def _args(make, k, b):
    out = []
    for a in make(k, b):
        if a == M:
            out.append(str(k.model))
        elif a == D:
            out += k.data()
        else:
            out.append(str(a))
    return out


@pytest.mark.parametrize("make,code,needles", CASES)
def test_bad_input_is_one_clear_line(k, bad, make, code, needles, tmp_path):
    args = _args(make, k, bad)
    r = invoke(args, input="" if args[-1] == "-" else None)
    assert_clean_error(r, code, *needles)
    if args[0] != "run":  # cwa run: test_run_checks_every_value_before_computing
        assert not list(Path(tmp_path).rglob("*.safetensors")) and not list(Path(tmp_path).rglob("*.h5"))


def test_run_checks_every_value_before_computing(k, tmp_path):
    for flags in (["--perturb", "bit_flip", "--perturb-prob", "2"], ["--perturb-scale", "-2"], ["--bit", "x"]):
        out = tmp_path / flags[-1]
        r = invoke(["run", "--model", k.model, *k.data(), "--calib-samples", "2", "--eval-samples", "2",
                    "--seeds", "0", "--no-save-plots", *flags, "--out-dir", out])
        assert_clean_error(r, 2, flags[-2])
        assert not list(out.rglob("*.safetensors")), f"{flags}: scored before refusing"


def test_cwa_debug_shows_the_traceback(k, bad):
    r = invoke(["rank", str(bad / "junk.txt")], env={"CWA_DEBUG": "1"})
    from cwa.errors import ArtifactError

    assert isinstance(r.exception, ArtifactError) and "junk.txt" in str(r.exception)


def test_no_trust_remote_code_means_no_model_code_runs(k, tmp_path):
    """A checkpoint whose config and tokenizer point at custom code is refused, and the
    code is not imported, unless --trust-remote-code."""
    d = tmp_path / "custom"
    shutil.copytree(k.model, d)
    marker = tmp_path / "code-ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (d / "configuration_custom.py").write_text(
        code + "from transformers import GPT2Config\nclass CustomConfig(GPT2Config):\n    model_type = 'custom'\n"
    )
    (d / "modeling_custom.py").write_text(
        code + "from transformers import GPT2LMHeadModel\nfrom .configuration_custom import CustomConfig\n"
        "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                             "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    for cmd in (["eval", "--model", d, *k.data()], ["score", "--model", d, "--metric", "magnitude"]):
        r = invoke(cmd)
        assert_clean_error(r, 1, str(d), "--trust-remote-code")
        assert not marker.exists(), "model code ran without --trust-remote-code"


def test_pickled_checkpoint_is_never_unpickled(k, tmp_path):
    """A .bin checkpoint whose pickle would run code is refused cleanly; the code does not run."""
    import os

    import torch

    d = tmp_path / "pickled"
    shutil.copytree(k.model, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.wte.weight": Payload()}, d / "pytorch_model.bin")
    r = invoke(["eval", "--model", d, *k.data()])
    assert_clean_error(r, 2, str(d), "never unpickles")  # refused up front: --allow-pickle is the fix
    assert not marker.exists()


def test_the_library_never_unpickles():
    """No `pickle`, no `torch.load` without weights_only=True, no np.load with pickles."""
    import ast

    root = Path(__file__).resolve().parents[2] / "cwa"
    problems = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    problems.append(f"{f.name}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                kw = {a.arg: ast.unparse(a.value) for a in node.keywords}
                if fn.endswith("torch.load") and kw.get("weights_only") != "True":
                    problems.append(f"{f.name}:{node.lineno} torch.load without weights_only=True")
                if fn in ("np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                    problems.append(f"{f.name}:{node.lineno} np.load without allow_pickle=False")
                if "trust_remote_code" in kw and kw["trust_remote_code"] == "True":
                    problems.append(f"{f.name}:{node.lineno} trust_remote_code=True hard-coded")
    assert not problems, problems


def test_run_with_one_seed_skips_stability_with_a_note(k, tmp_path):
    out = tmp_path / "run1"
    r = invoke(["run", "--model", k.model, *k.data(), "--calib-samples", "2", "--eval-samples", "2",
                "--seeds", "0", "--stability-check", "--controls", "random_k", "--control-draws", "2",
                "--topk", "5", "--perturb", "zero", "--no-save-plots", "--out-dir", out])
    assert assert_ok(r) == str(out)
    assert "stability" in r.stderr and "note" in r.stderr
    assert not (out / "stability_results.json").exists()
    assert not list((out / "artifacts").glob("stability*"))


def test_console_script_errors_are_one_line(k, bad, tmp_path):
    """The real process: a parser error (bad integer) is a usage error naming the flag;
    a library error is one line with exit 1; neither prints a traceback."""
    procs = {
        "parser": (cwa_subprocess(["rank", k.scores, "--topk", "abc"], cwd=tmp_path), 2, ["--topk", "--help"]),
        "library": (cwa_subprocess(["info", bad / "trunc.h5"], cwd=tmp_path), 1, ["trunc.h5", "SHA-256"]),
        "no-such-command": (cwa_subprocess(["rnak"], cwd=tmp_path), 2, ["rnak"]),
    }
    for name, (p, code, needles) in procs.items():
        out, err = p.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.strip()]
        assert p.returncode == code, (name, p.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in err and out == "", (name, err, out)
        for n in needles:
            assert n in lines[0], (name, lines[0])


def _tensor_hashes(model) -> dict[str, str]:
    """SHA-256 of every whole parameter tensor's bytes."""
    import hashlib

    import torch

    return {n: hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_weights_are_restored_before_a_failure_surfaces(k, tmp_path, monkeypatch, exc):
    """Evaluation raises in the middle of a condition (the third: draw 1 of the control):
    by the time the exception reaches the caller every weight is bit-identical to the
    original, no artifact and no temporary file is left, and the baseline's memory-mapped
    log-probabilities are deleted."""
    import tempfile

    from cwa import evaluation as E
    from cwa.stages import DataOptions, ModelOptions, perturb_stage

    lm = ModelOptions(str(k.model)).load()
    before = _tensor_hashes(lm.model)
    real = E.evaluate
    seen = {"conditions": 0, "perturbed": False}

    def failing(model, windows, **kw):
        if kw.get("keep_baseline"):
            kw["budget_bytes"] = 0  # keep the baseline in a temporary file, to see it removed
        if kw.get("baseline") is not None:
            seen["conditions"] += 1
            if seen["conditions"] == 3:
                seen["perturbed"] = _tensor_hashes(model) != before
                real(model, windows, **kw)
                raise exc
        return real(model, windows, **kw)

    monkeypatch.setattr(E, "evaluate", failing)
    sys_tmp = tmp_path / "sys-tmp"
    sys_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
    out = tmp_path / "out" / "perturb.h5"
    with pytest.raises(type(exc)):
        perturb_stage(lm, DataOptions(data=str(k.text), seq_len=int(SEQ), eval_samples=2), [k.topk, k.random],
                      method="gauss_noise", scale=0.5, output=out)
    assert seen["perturbed"], "the failure was not injected while the weights were perturbed"
    assert _tensor_hashes(lm.model) == before, "weights not restored when evaluation failed"
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    assert list(sys_tmp.iterdir()) == [], "baseline temporary file left behind"
