"""`cwa superweights`: the detector finds a planted super weight in a tiny Llama, reads
GPT-2's transposed Conv1D layout right on the embedded model, and proves each candidate
against random single weights with the perturb stage's own numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cwa
from cwa.cli import app
from cwa.stages import DataOptions

runner = CliRunner()
LAYER, ROW, COL = 1, 11, 37  # the planted super weight: W_down[ROW, COL] of block LAYER
SMALL = ["--eval-samples", "2", "--control-draws", "5"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 3-block Llama whose block-1 MLP has a massive input channel COL (its gate and up
    rows scaled 300x) multiplied by a large down-projection weight W[ROW, COL] = 5."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.integration.conftest import make_tokenizer

    path = tmp_path_factory.mktemp("planted_llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m = AutoModelForCausalLM.from_config(cfg)
    mlp = m.model.layers[LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[COL] *= 300
        mlp.up_proj.weight[COL] *= 300
        mlp.down_proj.weight[ROW, COL] = 5.0
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _nll_reference(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL over every target of every window, a plain loop."""
    total, n = 0.0, 0
    with torch.no_grad():
        for w in ids:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            total += float(-logp[:-1].gather(1, w[1:, None]).sum())
            n += len(w) - 1
    return total / n


def test_planted_super_weight_is_found_exactly_and_proven(planted, tmp_path):
    out = tmp_path / "sw.h5"
    args = ["superweights", "--model", str(planted), *SMALL, "-o", str(out), "--json", str(tmp_path / "sw.json")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    cands = cwa.read_selection(tmp_path / "sw_candidates.h5")
    ctl = cwa.read_selection(tmp_path / "sw_controls.h5")
    res = cwa.read_results(out)
    assert json.loads((tmp_path / "sw.json").read_text()) == json.loads(json.dumps(res.doc))

    # exactly the planted coordinate: one candidate, in block 1, W[ROW, COL] (Linear: flat ROW*d_ff + COL)
    assert cands.kind == "superweight" and cands.n_draws == 1
    (c,) = res.doc["superweights"]["candidates"]
    assert (c["layer"], c["row"], c["col"], c["passed"]) == (LAYER, ROW, COL, True)
    assert cands.params[cands.draws[0].param_index[0]] == f"model.layers.{LAYER}.mlp.down_proj.weight"
    assert int(cands.draws[0].flat_index[0]) == ROW * 128 + COL and c["value"] == 5.0
    others = [s for s in res.doc["superweights"]["layers"] if s["layer"] != LAYER]
    assert all(not s["passed"] and s["ratio"] < 100 for s in others)

    # the controls: 5 single weights of the down-projections
    assert ctl.kind == "random_k" and ctl.n_draws == 5 and all(len(d.flat_index) == 1 for d in ctl.draws)
    assert ctl.params == cands.params

    # the proof: the NLL of the zeroed model against a plain-loop reference, the p-value by its formula
    lm = cwa.load_model(str(planted), device="cpu")
    ev = DataOptions(eval_samples=2).split(lm, seed=0, calib=False, evaluation=True).evaluation
    conds = res.conditions
    assert [x["name"] for x in conds] == ["superweight"] + ["random_k"] * 5
    w = lm.model.model.layers[LAYER].mlp.down_proj.weight
    base = _nll_reference(lm.model, ev.ids)
    with torch.no_grad():
        w[ROW, COL] = 0.0
    zeroed = _nll_reference(lm.model, ev.ids)
    with torch.no_grad():
        w[ROW, COL] = 5.0
    assert res.baseline["nll"] == pytest.approx(base, rel=1e-5)
    assert conds[0]["nll"] == pytest.approx(zeroed, rel=1e-5)
    (proof,) = res.doc["superweights"]["proof"]
    ctl_d = [x["delta_nll"] for x in conds[1:]]
    ctl_kl = [x["kl_from_baseline"] for x in conds[1:]]
    # random weights: removing the planted spike changes the NLL (here it falls: the planted
    # weight is no trained one) and the predictions far more than any random single weight
    assert abs(proof["delta_nll"]) > 10 * max(abs(v) for v in ctl_d)
    assert proof["kl_from_baseline"] > 100 * max(ctl_kl)
    assert proof["p_value"] == (1 + sum(v >= proof["delta_nll"] for v in ctl_d)) / 6
    assert proof["kl_p_value"] == 1 / 6

    # the same numbers as `cwa perturb CANDIDATES CONTROLS --perturb zero`
    p = runner.invoke(app, ["perturb", str(tmp_path / "sw_candidates.h5"), str(tmp_path / "sw_controls.h5"),
                            "--model", str(planted), "--perturb", "zero", "--eval-samples", "2",
                            "-o", str(tmp_path / "p.h5")])
    assert p.exit_code == 0, p.stderr
    assert [x["nll"] for x in cwa.read_results(tmp_path / "p.h5").conditions] == [x["nll"] for x in conds]

    before = [(f.name, f.stat().st_mtime_ns) for f in sorted(tmp_path.glob("sw*.h5"))]
    again = runner.invoke(app, args)  # a cache hit: no artifact is rewritten
    assert again.exit_code == 0 and again.stdout.strip() == str(out)
    assert [(f.name, f.stat().st_mtime_ns) for f in sorted(tmp_path.glob("sw*.h5"))] == before and len(before) == 3


def test_embedded_model_conv1d_layout_and_fallback():
    """GPT-2's c_proj is a Conv1D stored (in, out): every layer's candidate is checked
    against hooks read here, and its stored flat index holds W[row, col]."""
    lm = cwa.load_model(device="cpu")
    sw = cwa.superweights(lm, all_layers=True, eval_samples=2, control_draws=2)
    model = lm.model
    seen = {}
    hooks = [model.transformer.h[i].mlp.c_proj.register_forward_hook(
        lambda m, a, y, i=i: seen.__setitem__(i, (a[0][0].double(), y[0].double()))) for i in range(4)]
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer.encode(cwa.super_weights.DEFAULT_PROMPT, add_special_tokens=False)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    rows = sw.table
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        x, y = seen[r["layer"]]
        proj = model.transformer.h[r["layer"]].mlp.c_proj
        t_out, row = np.unravel_index(int(y.abs().argmax()), y.shape)
        col = int(x.abs().argmax()) % x.shape[1]
        assert (r["row"], r["col"]) == (row, col)
        w = proj.weight.double()  # (in, out): W[row, col] of the Linear view is weight[col, row]
        assert torch.allclose(x @ w + proj.bias.double(), y, atol=1e-4)
        assert r["value"] == float(proj.weight[col, row])
        assert float(proj.weight.reshape(-1)[r["flat_index"]]) == r["value"]
        assert r["share"] == pytest.approx(float(x[t_out, col] * w[col, row] / y[t_out, row]), rel=1e-4)
        assert r["ratio"] == pytest.approx(float(y.abs().max()) / float(np.median(y.abs().numpy())), rel=1e-5)
    # no spike reaches 100x its median here: without --all-layers only the largest ratio is tested
    best = max(sw.layers, key=lambda s: s["ratio"])
    assert best["ratio"] < 100 and not any(s["passed"] for s in sw.layers)
    one = cwa.super_weights.pick([cwa.super_weights.LayerSpike(**s) for s in sw.layers], 100.0, None, False)
    assert [sw.layers[i]["layer"] for i in one] == [best["layer"]]


@pytest.mark.parametrize("args,needle", [
    (["--spike-ratio", "0"], "--spike-ratio 0"),
    (["--spike-threshold", "-1"], "--spike-threshold -1"),
    (["--control-draws", "0"], "--control-draws 0"),
    (["--module", "mlp.nothing"], "no MLP down-projection"),
])
def test_bad_options_are_one_line_usage_errors(args, needle, tmp_path):
    r = runner.invoke(app, ["superweights", *args, "--eval-samples", "1", "-o", str(tmp_path / "x.h5")])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_help_has_examples():
    r = runner.invoke(app, ["superweights", "--help"])
    assert r.exit_code == 0 and "Examples" in r.stdout and "cwa superweights" in r.stdout


def test_act_mag_top1_agrees_on_the_planted_model(planted):
    """The comparison the README reports: with a real massive activation, act_mag's top-1
    (|W|·RMS of its input over calibration data) is the detector's candidate too."""
    lm = cwa.load_model(str(planted), device="cpu")
    top = cwa.rank(cwa.score(lm, metric="act_mag", calib_samples=4, seed=0), topk=1)
    assert top.params[top.draws[0].param_index[0]] == f"model.layers.{LAYER}.mlp.down_proj.weight"
    assert int(top.draws[0].flat_index[0]) == ROW * 128 + COL
