"""Refusals that must lose nothing (issue 11): every case asserts the exit code, exactly one
stderr line naming the value, nothing on stdout, and — the part the older matrix in
test_reliability.py does not check — that no file was written or changed anywhere under
the kit, the model, the data and the working directory.

Families: an output that is (a link to) an input or another output; an output that is not
a regular file or cannot be one; `--out-dir` that is not cwa's; seeds, draws, bits and
probabilities checked before any work; selections and scores that do not belong to the
model; stability of one artifact against itself.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cwa import artifacts as A
from tests.integration.reliability_util import (
    assert_ok,
    assert_refused,
    invoke,
    tree_state,
)

BIG = str(2**64)


@pytest.fixture(scope="module")
def extra(k):
    """Hand-made inputs for this module, built once (hashes sealed, so only the content lies)."""
    import h5py

    d = k.root / "refusals"
    if d.exists():
        return d
    d.mkdir()
    os.link(k.scores, d / "scores_hardlink.safetensors")
    (d / "scores_symlink.safetensors").symlink_to(k.scores)
    (d / "a_dir").mkdir()
    (d / "a_file.txt").write_text("a file, not a directory\n")
    os.mkfifo(d / "fifo")
    shutil.copy(k.scores, d / "scores_copy.safetensors")
    # a selection whose single draw is empty
    (d / "empty_draw.h5").write_bytes(k.topk.read_bytes())
    with h5py.File(d / "empty_draw.h5", "r+") as f:
        for key in ("param_index", "flat_index", "score"):
            data = f[f"draws/0/{key}"][()][:0]
            del f[f"draws/0/{key}"]
            f[f"draws/0/{key}"] = data
    A._seal_userblock(d / "empty_draw.h5")
    # a selection that names a parameter the model lacks (shapes recorded for it)
    (d / "foreign_param.h5").write_bytes(k.topk.read_bytes())
    with h5py.File(d / "foreign_param.h5", "r+") as f:
        params = [p.decode() if isinstance(p, bytes) else p for p in f["params"][()]]
        prov = json.loads(f.attrs["provenance"])
        prov["shapes"]["transformer.h.9.mlp.c_fc.weight"] = prov["shapes"][params[0]]
        params[0] = "transformer.h.9.mlp.c_fc.weight"
        del f["params"]
        f["params"] = [p.encode() for p in params]
        f.attrs["provenance"] = json.dumps(prov)
    A._seal_userblock(d / "foreign_param.h5")
    # scores that name a parameter the model lacks
    sc = A.open_scores(k.scores)
    tensors = {("lm_head.extra.weight" if i == 0 else n): sc.get(n) for i, n in enumerate(sc.names)}
    A.write_scores(d / "foreign_scores.safetensors", tensors, dict(sc.meta))
    return d


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _case(id_, code, needles, make):
    return pytest.param(make, code, needles, id=id_)


EV = ["--eval-samples", "2"]

CASES = [
    # ---- an output is an input (the same path, a hard link, a symlink)
    _case("rank-o-is-its-scores", 2, ["-o", "is an input"], lambda k, e: ["rank", k.scores, "-o", k.scores]),
    _case("rank-o-is-a-hardlink-of-scores", 2, ["scores_hardlink", "is an input"],
          lambda k, e: ["rank", k.scores, "-o", e / "scores_hardlink.safetensors"]),
    _case("rank-o-is-a-symlink-to-scores", 2, ["scores_symlink"],
          lambda k, e: ["rank", k.scores, "-o", e / "scores_symlink.safetensors"]),
    _case("rank-csv-is-its-scores", 2, ["--csv", "is an input"],
          lambda k, e: ["rank", k.scores, "--csv", k.scores, "-o", "x.h5"]),
    _case("rank-stats-is-its-scores", 2, ["--stats", "is an input"],
          lambda k, e: ["rank", k.scores, "--stats", k.scores, "-o", "x.h5"]),
    _case("rank-csv-is-its-output", 2, ["--csv", "also the -o output"],
          lambda k, e: ["rank", k.scores, "-o", "same.h5", "--csv", "same.h5"]),
    _case("control-o-is-its-ref", 2, ["-o", "is an input"],
          lambda k, e: ["control", k.scores, "--ref", k.topk, "--kind", "random_k", "-o", k.topk]),
    _case("control-o-is-its-scores", 2, ["-o", "is an input"],
          lambda k, e: ["control", k.scores, "--ref", k.topk, "--kind", "bottom_k", "-o", k.scores]),
    _case("perturb-o-is-its-selection", 2, ["-o", "is an input"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "-o", k.topk]),
    _case("perturb-json-is-its-selection", 2, ["--json", "is an input"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--json", k.topk]),
    _case("perturb-o-is-its-data", 2, ["-o", "calib.txt"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "-o", k.text]),
    _case("perturb-json-is-a-model-file", 2, ["--json", "config.json", "is an input"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--json", k.model / "config.json"]),
    _case("stability-o-is-an-input", 2, ["-o", "is an input"],
          lambda k, e: ["stability", k.scores, k.scores1, "--topk", "5", "-o", k.scores1]),
    _case("stability-json-is-an-input", 2, ["--json", "is an input"],
          lambda k, e: ["stability", k.scores, k.scores1, "--topk", "5", "--json", k.scores]),
    _case("score-o-is-the-model-weights", 2, ["model.safetensors"],
          lambda k, e: ["score", "--model", k.model, "--metric", "magnitude", "-o", k.model / "model.safetensors"]),
    _case("score-o-is-its-data", 2, ["-o", "calib.txt"],
          lambda k, e: ["score", "--model", k.model, *k.data(), "-o", k.text]),
    _case("eval-o-is-the-model-config", 2, ["config.json", "is an input"],
          lambda k, e: ["eval", "--model", k.model, *k.data(), *EV, "-o", k.model / "config.json"]),
    # ---- an output that is not (and cannot become) a regular file
    _case("rank-o-is-a-directory", 2, ["a_dir"], lambda k, e: ["rank", k.scores, "-o", e / "a_dir"]),
    _case("rank-csv-is-a-directory", 2, ["--csv", "a_dir"],
          lambda k, e: ["rank", k.scores, "-o", "x.h5", "--csv", e / "a_dir"]),
    _case("rank-stats-is-a-directory", 2, ["--stats", "a_dir"],
          lambda k, e: ["rank", k.scores, "-o", "x.h5", "--stats", e / "a_dir"]),
    _case("rank-o-under-a-file", 2, ["a_file.txt"],
          lambda k, e: ["rank", k.scores, "-o", e / "a_file.txt" / "x.h5"]),
    _case("rank-o-is-a-fifo", 2, ["fifo"], lambda k, e: ["rank", k.scores, "-o", e / "fifo"]),
    _case("rank-o-is-a-device", 2, ["/dev/null"], lambda k, e: ["rank", k.scores, "-o", "/dev/null"]),
    _case("perturb-json-is-a-directory", 2, ["--json", "a_dir"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--json", e / "a_dir"]),
    _case("stability-json-is-a-directory", 2, ["--json", "a_dir"],
          lambda k, e: ["stability", k.scores, k.scores1, "--topk", "5", "--json", e / "a_dir"]),
    _case("eval-o-is-a-directory", 2, ["a_dir"],
          lambda k, e: ["eval", "--model", k.model, *k.data(), *EV, "-o", e / "a_dir"]),
    _case("run-out-dir-is-a-model-directory", 2, ["--out-dir", "cwa did not write"],
          lambda k, e: ["run", "--model", k.model, *k.data(), "--out-dir", k.model]),
    _case("run-out-dir-is-a-file", 2, ["--out-dir", "is a file"],
          lambda k, e: ["run", "--model", k.model, *k.data(), "--out-dir", k.text]),
    # ---- values checked before any work
    _case("score-seed-beyond-64-bits", 2, ["--seed", "64 bits"],
          lambda k, e: ["score", "--model", k.model, *k.data(), "--seed", BIG]),
    _case("control-seed-beyond-64-bits", 2, ["--seed", "64 bits"],
          lambda k, e: ["control", k.scores, "--ref", k.topk, "--kind", "random_k", "--seed", BIG]),
    _case("perturb-seed-beyond-64-bits", 2, ["--seed", "64 bits"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--seed", BIG]),
    _case("run-seeds-beyond-64-bits", 2, ["--seeds", "64 bits"],
          lambda k, e: ["run", "--model", k.model, *k.data(), "--seeds", f"0,{BIG}", "--out-dir", "o"]),
    _case("run-bf16-bit-index-out-of-range", 2, ["--bit 20", "bfloat16"],
          lambda k, e: ["run", "--model", k.model, *k.data(), "--dtype", "bfloat16", "--perturb", "bit_flip",
                        "--bit", "20", "--out-dir", "o"]),
    _case("perturb-bf16-bit-index-out-of-range", 2, ["--bit 16", "bfloat16"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--dtype", "bfloat16",
                        "--perturb", "bit_flip", "--bit", "16"]),
    _case("control-draws-beyond-bound", 2, ["--control-draws 1000000"],
          lambda k, e: ["control", k.scores, "--ref", k.topk, "--kind", "random_k", "--control-draws", "1000000"]),
    _case("run-control-draws-beyond-bound", 2, ["--control-draws 1000000"],
          lambda k, e: ["run", "--model", k.model, *k.data(), "--control-draws", "1000000", "--out-dir", "o"]),
    _case("perturb-prob-nan", 2, ["--perturb-prob nan"],
          lambda k, e: ["perturb", k.topk, "--model", k.model, *k.data(), *EV, "--perturb", "bit_flip",
                        "--perturb-prob", "nan"]),
    # ---- artifacts that do not belong to the model, or to the command
    _case("perturb-empty-draw", 1, ["empty_draw.h5", "selects no weights"],
          lambda k, e: ["perturb", e / "empty_draw.h5", "--model", k.model, *k.data(), *EV]),
    _case("perturb-selection-names-a-foreign-parameter", 1, ["foreign_param.h5", "transformer.h.9.mlp.c_fc.weight"],
          lambda k, e: ["perturb", e / "foreign_param.h5", "--model", k.model, *k.data(), *EV]),
    _case("rank-csv-scores-name-a-foreign-parameter", 1, ["foreign_scores", "lm_head.extra.weight"],
          lambda k, e: ["rank", e / "foreign_scores.safetensors", "--topk", "5", "--model", k.model,
                        "--csv", "t.csv", "-o", "t.h5"]),
    _case("perturb-selection-of-another-model", 1, ["topk.h5", "another model"],
          lambda k, e: ["perturb", k.topk, "--model", k.other, *k.data(), *EV]),
    _case("stability-same-artifact-twice", 2, ["same artifact"],
          lambda k, e: ["stability", k.scores, k.scores, "--topk", "5", "-o", "st.h5"]),
    _case("stability-artifact-and-its-copy", 2, ["same artifact"],
          lambda k, e: ["stability", k.scores, e / "scores_copy.safetensors", "--topk", "5", "-o", "st.h5"]),
    _case("stability-selection-twice", 2, ["same artifact"],
          lambda k, e: ["stability", k.topk, k.topk, "-o", "st.h5"]),
]


@pytest.mark.parametrize(("make", "code", "needles"), CASES)
def test_refusal_loses_nothing(k, extra, tmp_path, make, code, needles):
    roots = (k.root, k.model, tmp_path)
    before = tree_state(*roots)
    assert_refused(invoke(make(k, extra)), code, *needles, before=before, roots=roots)


def test_matrix_size():
    assert len(CASES) >= 40


def test_a_reused_out_dir_drops_what_the_new_run_no_longer_makes(k, tmp_path):
    """`--seeds 0,1` then `--seeds 0`: seed 1's artifacts, the stability files and their
    plots are gone, and the manifest lists only what is there."""
    out = tmp_path / "reuse"
    base = ["run", "--model", k.model, *k.data(), "--calib-samples", "4", "--eval-samples", "2",
            "--control-draws", "2", "--out-dir", out]
    assert_ok(invoke([*base, "--seeds", "0,1"]))
    assert (out / "artifacts" / "scores_seed1.safetensors").exists()
    assert (out / "stability_results.json").exists()
    (out / "notes.txt").write_text("mine")  # a user's file in a cwa directory is kept
    assert_ok(invoke([*base, "--seeds", "0"]))
    left = sorted(p.name for p in (out / "artifacts").iterdir())
    assert not [n for n in left if "seed1" in n or n.startswith("stability")], left
    assert not (out / "stability_results.json").exists()
    assert not list((out / "plots").glob("*stability*"))
    man = json.loads((out / "experiment_manifest.json").read_text())
    assert set(man["artifacts"]) == {f"artifacts/{n}" for n in left}
    assert all((out / p).exists() for p in man["plots"])
    assert "artifacts/scores_seed1.safetensors" in man["runs"][-1]["removed_stale"]
    assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_or_new_out_dir_is_accepted(k, tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "new"):
        assert_ok(invoke(["run", "--model", k.model, *k.data(), "--calib-samples", "4", "--perturb", "none",
                          "--controls", "none", "--seeds", "0", "--no-save-plots", "--out-dir", d]))
        assert (d / ".cwa-run").is_file()
