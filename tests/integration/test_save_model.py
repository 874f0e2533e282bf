"""`cwa perturb --save-model DIR --condition NAME`: the condition's weights as a standard
Hugging Face checkpoint that `cwa eval` reproduces exactly, cross-referenced with the
results; refusals before any work."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import cwa
from cwa.cli import app
from cwa.export import CONDITION_FILE, read_condition
from cwa.models import checkpoint_fingerprint
from cwa.stages import DataOptions, perturb_stage

runner = CliRunner()
EVAL = DataOptions(eval_samples=2)


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for n, t in model.state_dict().items():
        h.update(n.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded model, a top-5 by magnitude and two random-5 draws, saved."""
    d = tmp_path_factory.mktemp("save_model")
    lm = cwa.load_model(device="cpu")
    sc = cwa.score(lm, metric="magnitude")
    top = cwa.rank(sc, topk=5)
    rnd = cwa.control(sc, kind="random_k", ref=top, draws=2, seed=0)
    return lm, top.save(d / "top.h5"), rnd.save(d / "rnd.h5")


def _eval(folder, tmp_path, *extra) -> dict:
    out = tmp_path / f"eval_{folder.name}.json"
    r = runner.invoke(app, ["eval", "--model", str(folder), "--eval-samples", "2", "-o", str(out), *extra])
    assert r.exit_code == 0, r.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("method,condition", [("zero", "topk"), ("sign_flip", "random_k:1")])
def test_saved_condition_is_a_checkpoint_that_reproduces_its_nll_exactly(embedded, tmp_path, method, condition):
    lm, top, rnd = embedded
    before = _state_hash(lm.model)
    saved = tmp_path / "saved"
    r = perturb_stage(lm, EVAL, [top, rnd], method=method, output=tmp_path / "res.h5",
                      json_path=tmp_path / "res.json", save_model=saved, condition=condition)
    assert _state_hash(lm.model) == before, "the model in memory was not restored"
    res = cwa.read_results(r.path)
    assert json.loads((tmp_path / "res.json").read_text())["saved_models"] == res.doc["saved_models"]
    i = {"topk": 0, "random_k:1": 2}[condition]
    cond = res.conditions[i]

    # `cwa eval --model DIR` evaluates the same windows and gets the condition's NLL, exactly
    ev = _eval(saved, tmp_path)
    assert ev["nll"] == cond["nll"] and ev["nll"] != res.baseline["nll"]
    assert ev["eval_windows"] == res.doc["eval_windows"] and ev["data_fingerprint"] == res.attrs["data_fingerprint"]

    # fingerprints recorded in each other's metadata
    (rec,) = res.doc["saved_models"]
    meta = read_condition(saved)
    assert rec["model_fingerprint"] == ev["model_fingerprint"] == meta["model_fingerprint"] == checkpoint_fingerprint(saved)
    assert meta["results_fingerprint"] == res.fingerprint and meta["results"] == str(r.path)
    assert meta["condition"] == rec["condition"] == condition and meta["condition_index"] == rec["condition_index"] == i
    assert meta["condition_fingerprint"] == rec["condition_fingerprint"]
    assert meta["record"] == json.loads(json.dumps(cond)) and meta["source_model"]["fingerprint"] == lm.fingerprint
    sel = cwa.read_selection(top if condition == "topk" else rnd)
    assert meta["selection"]["fingerprint"] == sel.fingerprint
    assert meta["selection"]["scores_fingerprint"] == sel.provenance["scores_fingerprint"]

    # the weights: changed exactly at the condition's entries, as the method says, in the same dtype
    orig = {n: p.detach() for n, p in lm.model.named_parameters()}
    got = _tensors(saved)
    draw = sel.draws[0 if condition == "topk" else 1]
    assert {n: t.dtype for n, t in got.items()} == {n: orig[n].dtype for n in got}
    for p_i in range(len(sel.params)):
        name = sel.params[p_i]
        want = orig[name].clone().reshape(-1)
        fi = torch.from_numpy(draw.flat_index[draw.param_index == p_i])
        want[fi] = 0.0 if method == "zero" else -want[fi]
        assert torch.equal(got[name].reshape(-1).view(torch.int32), want.view(torch.int32)), name
    untouched = set(got) - set(sel.params)
    assert all(torch.equal(got[n], orig[n]) for n in untouched)

    # a standard checkpoint: the tokenizer loads and encodes alike, the config names the dtype
    from transformers import AutoTokenizer

    text = "for x in range(10): print(x)"
    assert AutoTokenizer.from_pretrained(saved).encode(text) == lm.tokenizer.encode(text)
    assert json.loads((saved / "config.json").read_text()).get("dtype") == "float32"


def test_a_cached_result_still_saves_and_records_every_export(embedded, tmp_path):
    lm, top, rnd = embedded
    out = tmp_path / "res.h5"
    perturb_stage(lm, EVAL, [top, rnd], method="zero", output=out, save_model=tmp_path / "a", condition="topk")
    again = perturb_stage(lm, EVAL, [top, rnd], method="zero", output=out, save_model=tmp_path / "b",
                          condition="random_k:0")
    assert again.cached
    doc = cwa.read_results(out).doc
    assert [s["condition"] for s in doc["saved_models"]] == ["topk", "random_k:0"]
    assert [s["model_fingerprint"] for s in doc["saved_models"]] == [
        checkpoint_fingerprint(tmp_path / "a"), checkpoint_fingerprint(tmp_path / "b")]
    assert _eval(tmp_path / "b", tmp_path)["nll"] == cwa.read_results(out).conditions[1]["nll"]


@pytest.mark.parametrize("dtype,method", [("bfloat16", "sign_flip"), ("float32", "gauss_noise"),
                                          ("float32", "bit_flip")])
def test_the_dtype_and_the_noise_are_the_evaluated_ones(tmp_path, dtype, method):
    """Saved in the dtype the condition ran in; gauss_noise / bit_flip regenerate the
    condition's own noise stream, so the saved weights are the evaluated ones."""
    from tests.integration.conftest import build_tiny

    model = build_tiny(tmp_path / "m", "gpt2", dtype=getattr(torch, dtype))
    lm = cwa.load_model(str(model), dtype=dtype, device="cpu")
    sc = cwa.score(lm, metric="magnitude")
    top = cwa.rank(sc, topk=20)
    rnd = cwa.control(sc, kind="random_k", ref=top, draws=2, seed=0)
    res = perturb_stage(lm, EVAL, [top, rnd], method=method, prob=0.5, bit="mantissa_msb", seed=3, save_model=tmp_path / "s",
                        condition="random_k:1", output=None).value
    assert {t.dtype for t in _tensors(tmp_path / "s").values()} == {getattr(torch, dtype)}
    assert _eval(tmp_path / "s", tmp_path, "--dtype", dtype)["nll"] == res.conditions[2]["nll"]


@pytest.fixture()
def tiny_case(tmp_path, tiny_gpt2):
    """A copy of the tiny GPT-2 and a top-3 + two random-3 selections of it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    lm = cwa.load_model(str(model), device="cpu")
    sc = cwa.score(lm, metric="magnitude")
    top = cwa.rank(sc, topk=3)
    top.save(tmp_path / "top.h5")
    cwa.control(sc, kind="random_k", ref=top, draws=2, seed=0).save(tmp_path / "rnd.h5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    return tmp_path, model


@pytest.mark.parametrize("args,needle", [
    (["--save-model", "{t}/new", "--condition", "random_k"], "--condition random_k: not a condition of this run; "
     "choose one of topk, random_k:0..1"),
    (["--save-model", "{t}/new"], "this run has 3 conditions; pick one with --condition (topk, random_k:0..1)"),
    (["--condition", "topk"], "give --save-model DIR too"),
    (["--save-model", "{t}/full", "--condition", "topk"], "exists and is not empty"),
    (["--save-model", "{t}/afile", "--condition", "topk"], "exists and is not a directory"),
    (["--save-model", "{t}/model/sub", "--condition", "topk"], "inside the input model"),
    (["--save-model", "{t}/new", "--condition", "topk", "-o", "{t}/new/res.h5"], "would hold the output"),
])
def test_refusals_are_one_line_before_any_work(tiny_case, args, needle):
    t, model = tiny_case
    listing = sorted(str(p) for p in t.rglob("*"))
    argv = ["perturb", str(t / "top.h5"), str(t / "rnd.h5"), "--model", str(model), "--perturb", "zero",
            "--eval-samples", "1"] + [a.format(t=t) for a in args]
    if "-o" not in args:
        argv += ["-o", str(t / "res.h5")]
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(str(p) for p in t.rglob("*")) == listing
    assert not (t / CONDITION_FILE).exists()
