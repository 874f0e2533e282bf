"""Evaluation against an independent plain loop with torch.nn.functional.cross_entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from cwa.data import Windows, byte_lengths
from cwa.evaluation import evaluate


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_gpt2, tiny_llama):
    path = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(tok), (5, 12), generator=g)
    ids[:, 0] = tok.bos_token_id
    return model, tok, Windows(ids, list(range(5)), "test", True, 5, byte_lengths(tok))


def reference(model, windows, tok):
    nll, correct, nbytes, per = 0.0, 0, 0, []
    bl = byte_lengths(tok)
    for w in windows.ids:
        with torch.no_grad():
            logits = model(w[None]).logits[0].float()
        tgt = w[1:]
        loss = F.cross_entropy(logits[:-1], tgt, reduction="none")
        per.append(loss.mean().item())
        nll += loss.double().sum().item()
        correct += (logits[:-1].argmax(-1) == tgt).sum().item()
        nbytes += sum(len(tok.convert_ids_to_tokens(int(t))) for t in tgt)
        assert nbytes == sum(int(bl[t]) for tt in windows.ids[: len(per)] for t in tt[1:])
    n = windows.ids.numel() - windows.ids.shape[0]
    return nll / n, correct / n, nll / math.log(2) / nbytes, np.array(per)


def test_metrics_equal_a_plain_loop(setup):
    model, tok, w = setup
    res = evaluate(model, w, batch_size=2)
    nll, acc, bpb, per = reference(model, w, tok)
    m = res.metrics
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert m["token_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert m["bits_per_byte"] == pytest.approx(bpb, rel=1e-5)
    assert m["n_tokens"] == 5 * 11
    np.testing.assert_allclose(res.per_window_nll, per, rtol=1e-5)


def test_kl_and_agreement_against_manual(setup):
    model, tok, w = setup
    base = evaluate(model, w, batch_size=3, keep_baseline=True)
    same = evaluate(model, w, batch_size=3, baseline=base.baseline)
    assert same.metrics["kl_from_baseline"] == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["top1_agreement"] == 1.0
    with torch.no_grad():
        ref_logp = torch.log_softmax(model(w.ids).logits[:, :-1].float(), -1)
        p = next(iter(model.parameters()))
        saved = p.detach().clone()
        p.add_(0.05 * torch.randn_like(p))
        new_logp = torch.log_softmax(model(w.ids).logits[:, :-1].float(), -1)
        pert = evaluate(model, w, batch_size=2, baseline=base.baseline)
        p.copy_(saved)
    kl = (ref_logp.exp() * (ref_logp - new_logp)).sum(-1).mean().item()
    agree = (ref_logp.argmax(-1) == new_logp.argmax(-1)).float().mean().item()
    assert kl > 0
    assert pert.metrics["kl_from_baseline"] == pytest.approx(kl, rel=1e-4)
    assert pert.metrics["top1_agreement"] == pytest.approx(agree)


def test_memory_mapped_baseline_equals_in_memory(setup):
    model, tok, w = setup
    a = evaluate(model, w, keep_baseline=True)
    b = evaluate(model, w, keep_baseline=True, budget_bytes=0)
    assert isinstance(b.baseline.logp, np.memmap)
    np.testing.assert_array_equal(np.asarray(a.baseline.logp), np.asarray(b.baseline.logp))
    path = b.baseline._tmpfile
    b.baseline.close()
    import os

    assert not os.path.exists(path)


def test_non_finite_weights_give_non_finite_metrics_not_a_crash(setup):
    model, tok, w = setup
    p = model.get_output_embeddings().weight
    saved = p.detach().clone()
    with torch.no_grad():
        p[0, 0] = float("nan")
    try:
        res = evaluate(model, w)
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert math.isnan(res.metrics["nll"])
