"""Every metric against an independent reference on tiny models built from a config.

References never call cwa: per-window `torch.autograd.grad` of `F.cross_entropy`, manual
forward hooks with a hand transposition for GPT-2's Conv1D, one-hot matrices for
embeddings, exact Hessian rows by double backward, and the Gauss-Newton diagonal by
enumerating every label of the tiny vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cwa.errors import UsageError
from cwa.metrics import METRICS, MetricOptions, compute_scores, select_params

VOCAB = 50
N_WINDOWS = 5
SEQ_LEN = 10
WINDOW_INDICES = [7, 3, 12, 0, 9]  # global indices of the calibration windows


def build_model(arch: str, tied: bool, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    common = dict(
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    if arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32, **common)
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                pad_token_id=0,
                **common,
            )
        )
    # Larger-than-init weights so that gradients and curvatures are far from zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model.to(dtype).eval()


MODEL_KEYS = [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)]
_CACHE: dict = {}


def model_for(arch, tied, dtype=torch.float32):
    key = (arch, tied, dtype)
    if key not in _CACHE:
        _CACHE[key] = build_model(arch, tied, dtype)
    return _CACHE[key]


def make_ids(n=N_WINDOWS, t=SEQ_LEN, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max()
    diff = (a - b).abs().max()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close_tensors(got: dict, ref: dict, tol=1e-5):
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].dtype == torch.float32 and got[name].device.type == "cpu"
        assert got[name].shape == ref[name].shape, name
        assert rel_err(got[name], ref[name]) <= tol, (name, rel_err(got[name], ref[name]))


# ---------------------------------------------------------------- independent references


def ref_window_loss(model, row):
    logits = model(input_ids=row[None]).logits[0]
    return F.cross_entropy(logits[:-1].double(), row[1:])


def ref_window_grads(model, params, ids):
    plist = list(params.values())
    for p in plist:
        p.requires_grad_(True)
    out = []
    for row in ids:
        gs = torch.autograd.grad(ref_window_loss(model, row), plist, allow_unused=True)
        out.append(
            [
                torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                for p, g in zip(plist, gs, strict=True)
            ]
        )
    return out


def ref_grad_x_weight(model, params, ids):
    per = ref_window_grads(model, params, ids)
    return {
        n: (p.detach().double() * sum(g[k] for g in per) / len(per)).abs()
        for k, (n, p) in enumerate(params.items())
    }


def ref_grad_squared(model, params, ids):
    per = ref_window_grads(model, params, ids)
    return {n: sum(g[k] ** 2 for g in per) / len(per) for k, n in enumerate(params)}


def ref_act_mag(model, params, ids, arch, tied):
    """Wanda with RMS from manual hooks; the layer of each weight is named by hand."""
    from transformers.pytorch_utils import Conv1D

    inputs: dict[str, list] = {}
    hooks = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, o, mname=mname: inputs.setdefault(mname, []).append(
                        a[0].detach().double()
                    )
                )
            )
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    emb_name = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    out = {}
    for name, p in params.items():
        w = p.detach().double().abs()
        if name == emb_name and tied:  # head role
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs["lm_head"]])
            out[name] = w * x.pow(2).mean(0).sqrt()[None, :]
        elif name in (emb_name, "transformer.wpe.weight"):
            idx = ids if name == emb_name else torch.arange(ids.shape[1]).expand_as(ids)
            onehot = F.one_hot(idx.reshape(-1), p.shape[0]).double()  # the embedding's input
            out[name] = w * onehot.pow(2).mean(0).sqrt()[:, None]
        else:
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name[: -len(".weight")]]])
            rms = x.pow(2).mean(0).sqrt()
            if arch == "gpt2" and name != "lm_head.weight":  # Conv1D stores [in, out]
                out[name] = (w.T * rms[None, :]).T
            else:
                out[name] = w * rms[None, :]
    return out


def ref_hessian_rows(model, params, ids, coords):
    """Exact rows H[i, :] of the Hessian of L (mean window loss) for flat coordinates
    (param index, flat index): the gradient of one gradient entry (= H e_i)."""
    plist = list(params.values())
    loss = sum(ref_window_loss(model, row) for row in ids) / ids.shape[0]
    grads = torch.autograd.grad(loss, plist, create_graph=True)
    rows = []
    for k, j in coords:
        row = torch.autograd.grad(
            grads[k].reshape(-1)[j], plist, retain_graph=True, allow_unused=True
        )
        rows.append(
            [torch.zeros_like(p) if r is None else r for p, r in zip(plist, row, strict=True)]
        )
    return rows


def ref_gauss_newton_diag(model, params, ids):
    """(1/N) Σ_n (1/T) Σ_t Σ_v p_t(v) (∂ℓ_t(v)/∂w)², every label v of the vocabulary."""
    plist = list(params.values())
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in plist]
    for row in ids:
        logp = torch.log_softmax(model(input_ids=row[None]).logits[0, :-1].double(), -1)
        t, v = logp.shape
        probs = logp.detach().exp().reshape(-1)
        eye = torch.eye(t * v, dtype=logp.dtype).reshape(t * v, t, v)
        jac = torch.autograd.grad(logp, plist, grad_outputs=eye, is_grads_batched=True)
        for a, jg in zip(acc, jac, strict=True):
            a += torch.einsum("k,k...->...", probs, jg.double() ** 2) / (t * len(ids))
    return {n: a for n, a in zip(params, acc, strict=True)}


# ---------------------------------------------------------------- deterministic metrics


@pytest.mark.parametrize("arch,tied", MODEL_KEYS)
def test_deterministic_metrics_match_plain_loop(arch, tied):
    model = model_for(arch, tied)
    params = select_params(model)
    ids = make_ids()
    model.train()  # compute_scores must switch dropout off (GPT-2 has p=0.1)
    got = {
        m: compute_scores(model, params, ids, WINDOW_INDICES, m, MetricOptions(), batch_size=2)
        for m in ("magnitude", "grad_x_weight", "grad_squared", "act_mag")
    }
    assert model.training  # mode restored
    model.eval()
    assert_close_tensors(got["magnitude"][0], {n: p.detach().abs() for n, p in params.items()})
    assert_close_tensors(got["grad_x_weight"][0], ref_grad_x_weight(model, params, ids))
    assert_close_tensors(got["grad_squared"][0], ref_grad_squared(model, params, ids))
    assert_close_tensors(got["act_mag"][0], ref_act_mag(model, params, ids, arch, tied))
    assert all(notes == [] for _, notes in got.values())


def test_grad_squared_is_not_square_of_mean():
    model = model_for("gpt2", True)
    params = select_params(model)
    ids = make_ids()
    gs, _ = compute_scores(model, params, ids, None, "grad_squared")
    per = ref_window_grads(model, params, ids)
    name = "transformer.h.0.mlp.c_fc.weight"
    k = list(params).index(name)
    square_of_mean = (sum(g[k] for g in per) / len(per)) ** 2
    assert rel_err(gs[name], square_of_mean) > 0.1


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _ToyConv1DModel(torch.nn.Module):
    """ids -> Embedding(3, 2) -> Conv1D(nx=2, nf=3) -> logits over 3 tokens."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = torch.nn.Embedding(3, 2)
        self.proj = Conv1D(3, 2)
        self.norm_weight = torch.nn.Parameter(torch.ones(3))
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]))
            self.proj.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]))  # [in, out]
            self.proj.bias.zero_()

    def forward(self, input_ids, use_cache=False):
        return _Out(self.proj(self.emb(input_ids)) * self.norm_weight)


def test_act_mag_hand_computed_conv1d():
    model = _ToyConv1DModel()
    ids = torch.tensor([[0, 1, 2, 1]])
    params = select_params(model, include=["*weight"])
    scores, notes = compute_scores(model, params, ids, [0], "act_mag")
    # Inputs to proj: rows (1,0), (0,2), (3,-1), (0,2):
    # RMS_0 = sqrt((1+0+9+0)/4) = sqrt(2.5), RMS_1 = sqrt((0+4+1+4)/4) = 1.5, on the rows of W[in, out].
    r = 2.5**0.5
    expected = torch.tensor([[1 * r, 2 * r, 3 * r], [4 * 1.5, 5 * 1.5, 6 * 1.5]])
    assert torch.allclose(scores["proj.weight"], expected, rtol=1e-6)
    # Embedding: index frequencies 1/4, 2/4, 1/4 -> RMS on rows.
    f = torch.tensor([0.25, 0.5, 0.25]).sqrt()[:, None]
    assert torch.allclose(scores["emb.weight"], model.emb.weight.detach().abs() * f, rtol=1e-6)
    # The 1-D weight that the user included has no layer input: excluded with one note.
    assert "norm_weight" not in scores
    assert len(notes) == 1 and "norm_weight" in notes[0]


# ---------------------------------------------------------------- second order


@pytest.mark.parametrize(
    "arch,tied,include",
    [
        ("gpt2", True, None),  # every weight matrix: checks the scale and the 1/P
        ("gpt2", False, ["lm_head.weight"]),  # a diagonal-dominant block: checks the z ⊙ (Hz)
    ],
)
def test_hutchinson_unbiased_for_exact_hessian_diagonal(arch, tied, include):
    model = model_for(arch, tied, torch.float64)
    params = select_params(model, include=include)
    ids = make_ids(n=4, t=8)
    probes = 48
    est, _ = compute_scores(
        model,
        params,
        ids,
        None,
        "hutchinson_diag",
        MetricOptions(seed=3, hutchinson_samples=probes),
        batch_size=3,
    )
    gen = torch.Generator().manual_seed(0)
    sizes = [p.numel() for p in params.values()]
    coords = []
    for _ in range(40):
        k = int(torch.randint(len(sizes), (1,), generator=gen))
        coords.append((k, int(torch.randint(sizes[k], (1,), generator=gen))))
    rows = ref_hessian_rows(model, params, ids, coords)
    names = list(params)
    zs = []
    for (k, j), row in zip(coords, rows, strict=True):
        h_ii = float(row[k].reshape(-1)[j])
        off = sum(float((r.double() ** 2).sum()) for r in row) - h_ii**2
        e = float(est[names[k]].reshape(-1)[j])
        if off < 1e-20:  # a coordinate the loss does not see
            assert abs(e - h_ii) < 1e-10
            continue
        # One probe's error z_i Σ_{j≠i} H_ij z_j has variance Σ_{j≠i} H_ij².
        zs.append((e - h_ii) / (off / probes) ** 0.5)
    zs = torch.tensor(zs)
    assert len(zs) >= 30
    # Standardized errors of an unbiased estimator with the right variance: |z| ~ |N(0,1)|
    # (E|z| = 0.80). Missing 1/P, the Hessian of the sum instead of the mean, or Hz without
    # the z ⊙ (on the diagonal-dominant block) each push these far out.
    assert 0.45 < float(zs.abs().mean()) < 1.25, zs
    assert float(zs.abs().max()) < 4.5, zs


def test_hessian_diag_converges_to_gauss_newton_diagonal():
    model = model_for("llama", False, torch.float64)
    params = select_params(model)
    ids = make_ids(n=3, t=7)
    ref = ref_gauss_newton_diag(model, params, ids)
    flat_ref = torch.cat([r.reshape(-1) for r in ref.values()])

    def err(s):
        est, _ = compute_scores(
            model,
            params,
            ids,
            None,
            "hessian_diag",
            MetricOptions(seed=1, mc_samples=s),
            batch_size=3,
        )
        assert all((e >= 0).all() for e in est.values())
        flat = torch.cat([e.reshape(-1).double() for e in est.values()])
        return float((flat - flat_ref).norm() / flat_ref.norm()), est

    e_small, _ = err(2)
    e_large, est = err(160)
    assert e_large < 0.15, (e_small, e_large)
    assert e_large < e_small / 3, (e_small, e_large)
    # Same windows, true labels and no T factor: a different quantity.
    gs, _ = compute_scores(model, params, ids, None, "grad_squared")
    flat_gs = torch.cat([g.reshape(-1).double() for g in gs.values()])
    assert float((flat_gs - flat_ref).norm() / flat_ref.norm()) > 0.5


# ---------------------------------------------------------------- batching and seeds


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", False)])
def test_batch_size_and_seed(arch, tied):
    model = model_for(arch, tied)
    params = select_params(model)
    ids = make_ids()
    opts = MetricOptions(seed=11, mc_samples=2, hutchinson_samples=3)
    for metric in METRICS.names():
        runs = {
            b: compute_scores(model, params, ids, WINDOW_INDICES, metric, opts, batch_size=b)[0]
            for b in (1, 3, N_WINDOWS)
        }
        for b in (3, N_WINDOWS):
            assert_close_tensors(runs[b], runs[1])
    for metric in ("hessian_diag", "hutchinson_diag"):
        a = compute_scores(model, params, ids, WINDOW_INDICES, metric, opts, batch_size=2)[0]
        b = compute_scores(model, params, ids, WINDOW_INDICES, metric, opts, batch_size=2)[0]
        assert all(torch.equal(a[n], b[n]) for n in a)  # bit for bit
        other = MetricOptions(seed=12, mc_samples=2, hutchinson_samples=3)
        c = compute_scores(model, params, ids, WINDOW_INDICES, metric, other, batch_size=2)[0]
        assert any(rel_err(c[n], a[n]) > 1e-3 for n in a)
    # Labels are tied to the window's global index, not its position in the batch.
    shifted = [i + 100 for i in WINDOW_INDICES]
    a = compute_scores(model, params, ids, WINDOW_INDICES, "hessian_diag", opts)[0]
    c = compute_scores(model, params, ids, shifted, "hessian_diag", opts)[0]
    assert any(rel_err(c[n], a[n]) > 1e-3 for n in a)


@pytest.mark.parametrize("metric", sorted(METRICS.names()))
def test_sharded_accumulators_sum_to_single_run(metric):
    """The interface a distributed run relies on: two shards of windows, accumulators
    summed (a simulated all-reduce), equal the single-process scores."""
    model = model_for("gpt2", False)
    params = select_params(model)
    ids = make_ids()
    opts = MetricOptions(seed=4, mc_samples=2, hutchinson_samples=2)
    single, _ = compute_scores(model, params, ids, WINDOW_INDICES, metric, opts)
    windows = torch.tensor(WINDOW_INDICES)
    shard0 = METRICS.get(metric)(opts)
    shard0.begin(model, params)
    shard0.accumulate(ids[:2], windows[:2], N_WINDOWS)
    shard0.close()
    shard1 = METRICS.get(metric)(opts)
    shard1.begin(model, params)
    shard1.accumulate(ids[2:], windows[2:], N_WINDOWS)
    shard1.close()
    other = iter(list(shard0.acc.values()))
    shard1.reduce(lambda t: t.add_(next(other)))
    assert_close_tensors(shard1.finish(), single)


def test_grad_x_weight_scores_are_built_in_its_accumulators():
    """|w·g| is made in the accumulator's own memory (no second float32 copy of every
    scored weight at the peak), with the plain loop's values."""
    model = model_for("gpt2", False)
    params = select_params(model)
    ids = make_ids()
    scorer = METRICS.get("grad_x_weight")(MetricOptions())
    scorer.begin(model, params)
    scorer.accumulate(ids, torch.tensor(WINDOW_INDICES), N_WINDOWS)
    where = {n: a.data_ptr() for n, a in scorer.acc.items()}
    scores = scorer.finish()
    scorer.close()
    assert {n: s.data_ptr() for n, s in scores.items()} == where
    assert_close_tensors(scores, ref_grad_x_weight(model, params, ids))


def test_progress_flags_and_grads_restored():
    model = model_for("gpt2", False)
    params = select_params(model, include=["*.c_fc.weight"])
    model.transformer.ln_f.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    compute_scores(
        model,
        params,
        make_ids(),
        None,
        "hutchinson_diag",
        MetricOptions(hutchinson_samples=1),
        batch_size=2,
        progress=seen.append,
    )
    assert seen == [2, 4, 5]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    model.transformer.ln_f.weight.requires_grad_(True)


# ---------------------------------------------------------------- OBD, selection, dtype


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", False)])
def test_hutchinson_frees_first_backward_gradients_and_equals_plain_hvp(arch, tied, monkeypatch):
    """The first backward's gradients are freed before the HVPs (issue 13: not kept through
    the P probes), and the scores still equal a plain double backward with the same
    probes, z ⊙ autograd.grad(g, θ, grad_outputs=z), averaged over windows and probes."""
    from cwa.losses import window_losses
    from cwa.metrics import hutchinson_diag as hd

    model = model_for(arch, tied, torch.float64)
    params = select_params(model)
    ids = make_ids(n=3, t=8)
    kept = []
    real = hd.HutchinsonDiag._grads

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        kept.extend(g for g in out if g is not None and g.requires_grad)
        return out

    monkeypatch.setattr(hd.HutchinsonDiag, "_grads", spy)
    probes = 3
    est, _ = compute_scores(model, params, ids, None, "hutchinson_diag",
                            MetricOptions(seed=7, hutchinson_samples=probes), batch_size=2)
    assert kept and all(g.untyped_storage().size() == 0 for g in kept)

    plist = list(params.values())
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in (ids[:2], ids[2:]):
        grads = torch.autograd.grad(window_losses(model, b).sum() / len(ids), plist, create_graph=True)
        for k in range(probes):
            zs = [hd.rademacher(7, k, i, p).to(p.dtype) for i, p in enumerate(plist)]
            hv = torch.autograd.grad(grads, plist, grad_outputs=zs, retain_graph=True)
            for (n, _), z, h in zip(params.items(), zs, hv, strict=True):
                ref[n] += z * h / probes
    assert_close_tensors(est, ref)


def test_obd_is_half_c_w_squared():
    model = model_for("llama", True)
    params = select_params(model)
    ids = make_ids()
    ref = ref_grad_squared(model, params, ids)
    obd, _ = compute_scores(model, params, ids, None, "grad_squared", MetricOptions(obd=True))
    assert_close_tensors(
        obd, {n: 0.5 * ref[n] * p.detach().double() ** 2 for n, p in params.items()}
    )
    opts = MetricOptions(seed=2, hutchinson_samples=2)
    c, _ = compute_scores(model, params, ids, None, "hutchinson_diag", opts)
    o, _ = compute_scores(
        model,
        params,
        ids,
        None,
        "hutchinson_diag",
        MetricOptions(seed=2, hutchinson_samples=2, obd=True),
    )
    assert_close_tensors(o, {n: 0.5 * c[n] * p.detach() ** 2 for n, p in params.items()})
    for metric in ("magnitude", "grad_x_weight", "act_mag", "wanda"):
        with pytest.raises(UsageError, match="obd"):
            compute_scores(model, params, ids, None, metric, MetricOptions(obd=True))


def test_select_params_globs():
    model = model_for("gpt2", True)
    default = select_params(model)
    assert list(default) == [n for n, p in model.named_parameters() if p.ndim >= 2]
    assert "lm_head.weight" not in default  # the tied head is listed once, as wte
    attn = select_params(model, include=["*.c_attn.weight"])
    assert list(attn) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight",
    ]
    no_h1 = select_params(model, exclude=["transformer.h.1.*", "*wpe*"])
    assert list(no_h1) == [
        n for n in default if not n.startswith("transformer.h.1.") and "wpe" not in n
    ]
    norms = select_params(model, include=["*.ln_f.*"])
    assert list(norms) == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert list(select_params(model, include=["lm_head.weight"])) == ["transformer.wte.weight"]
    with pytest.raises(UsageError, match="nothing_matches"):
        select_params(model, include=["nothing_matches*"])
    with pytest.raises(UsageError, match=r"\*"):
        select_params(model, exclude=["*"])
    with pytest.raises(UsageError, match="Did you mean"):
        compute_scores(model, default, make_ids(), None, "grad_sqared")


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("llama", False)])
def test_bf16_scores_are_float32_and_close(arch, tied):
    fp32 = model_for(arch, tied)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids = make_ids()
    p32, p16 = select_params(fp32), select_params(bf16)
    opts = MetricOptions(mc_samples=1, hutchinson_samples=2)
    # bf16 keeps 8 mantissa bits: |w| within one rounding, activations after two layers
    # within a few percent, gradients (squared for grad_squared) within ~15% here.
    tolerance = {"magnitude": 0.005, "act_mag": 0.03, "grad_x_weight": 0.2, "grad_squared": 0.2}
    for metric in METRICS.names():
        scorer = METRICS.get(metric)(opts)
        scorer.begin(bf16, p16)  # accumulators are float32 or wider whatever the model dtype
        assert all(a.dtype in (torch.float32, torch.float64) for a in scorer.acc.values()), metric
        scorer.close()
        s16, _ = compute_scores(bf16, p16, ids, WINDOW_INDICES, metric, opts, batch_size=3)
        assert list(s16) == list(p16)
        assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in s16.values()), (
            metric
        )
        if metric in tolerance:
            s32, _ = compute_scores(fp32, p32, ids, WINDOW_INDICES, metric, opts, batch_size=3)
            for n in s32:
                assert rel_err(s16[n], s32[n]) < tolerance[metric], (
                    metric,
                    n,
                    rel_err(s16[n], s32[n]),
                )
