"""Stability across seeds/metrics, checked against independent references: Python sets for
Jaccard, a plain-loop rank correlation for Spearman, a stable sort of the concatenated
scores for the top-K, and Monte Carlo for the random baseline."""

from __future__ import annotations

import json
import math
import random
from itertools import combinations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cwa import artifacts as A
from cwa import stability_analysis as S
from cwa.errors import ArtifactError, UsageError
from cwa.ranking import Draw, Selection
from cwa.stages import stability_stage

SHAPES = {"h.0.attn.w": (6, 10), "h.1.mlp.w": (8, 5), "wte": (30,)}
SPEC_KEYS = {
    "k",
    "labels",
    "jaccard",
    "mean_jaccard",
    "random_jaccard",
    "spearman",
    "jaccard_vs_k",
    "per_tensor_overlap",
}


# --------------------------------------------------------------------------- builders


def write_scores(path, tensors, *, metric="grad_x_weight", seed=0, model="model-A"):
    meta = {
        "cwa.metric": metric,
        "cwa.seed": str(seed),
        "cwa.model_fingerprint": model,
        "cwa.fingerprint": f"{metric}-{seed}-{path.name}",
    }
    return A.write_scores(path, tensors, meta)


def random_tensors(seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in SHAPES.items():
        t = torch.randn(s, generator=g)
        out[n] = torch.round(t * 4) / 4 if ties else t  # quarter steps: many ties
    return out


def write_selection(
    path, entries, *, params, k, metric="m", seed=0, model="model-A", mode="global"
):
    """entries: list of (param name, flat index), in rank order."""
    pidx = [params.index(n) for n, _ in entries]
    draw = Draw(pidx, [f for _, f in entries], np.linspace(1, 0, len(entries)))
    sel = Selection(
        "topk", k, mode, metric, "abs", seed, 1, list(params), [draw], {"n_population": 1000}
    )
    prov = {"model_fingerprint": model, "scores_seed": str(seed), "metric": metric}
    return A.write_selection(path, sel, fingerprint=f"sel-{path.name}", provenance=prov)


# --------------------------------------------------------------------------- references


def ref_topk(tensors, k, rank_by="abs"):
    """Top-K as (name, flat) keys in rank order: stable descending sort of the concatenation."""
    keys, vals = [], []
    for n, t in tensors.items():
        flat = t.reshape(-1).double()
        for i, v in enumerate(flat.tolist()):
            keys.append((n, i))
            vals.append(abs(v) if rank_by == "abs" else v)
    order = sorted(range(len(vals)), key=lambda i: -vals[i])  # sorted() is stable
    return [keys[i] for i in order[:k]]


def ref_topk_per_layer(tensors, k):
    out = []
    for n, t in tensors.items():
        out += ref_topk({n: t}, min(k, t.numel()))
    return out


def ref_jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def ref_ranks(x):
    """Average ranks by counting (no sorting)."""
    return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]


def ref_spearman(x, y):
    rx, ry = ref_ranks(x), ref_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den


def value(tensors, key):
    n, i = key
    return abs(float(tensors[n].reshape(-1)[i]))


# --------------------------------------------------------------------------- pure functions


def test_spearman_matches_plain_loop_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 6, 40).astype(float)  # heavy ties
        y = x + rng.integers(0, 4, 40)
        assert S.spearman(x, y) == pytest.approx(ref_spearman(list(x), list(y)), abs=1e-12)
    x = rng.normal(size=50)
    assert S.spearman(x, x) == pytest.approx(1.0, abs=1e-12)
    assert S.spearman(x, -x) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(S.spearman(x, np.ones(50)))  # constant side: undefined


def test_rankdata_averages_ties():
    assert S.rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_random_jaccard_formula_and_monte_carlo():
    assert S.random_jaccard(100, 1000) == pytest.approx(100 / 1900)
    assert S.random_jaccard_per_layer(10, [1000]) == pytest.approx(10 / 1990)
    rng = random.Random(0)
    n, k = 400, 40
    sims = [ref_jaccard(rng.sample(range(n), k), rng.sample(range(n), k)) for _ in range(3000)]
    assert np.mean(sims) == pytest.approx(k / (2 * n - k), rel=0.05)


def test_k_grid_is_log_spaced_around_k_and_clipped():
    g = S.k_grid(100, 10**6)
    assert g[0] == 10 and g[-1] == 1000 and 100 in g and len(g) == 9
    assert S.k_grid(100, 300)[-1] == 300
    assert S.k_grid(3, 10**6)[0] == 1


# --------------------------------------------------------------------------- selections


def test_jaccard_from_selections_matches_python_sets(tmp_path):
    params = list(SHAPES)
    rng = random.Random(3)
    universe = [(n, i) for n in params for i in range(20)]
    sets = [rng.sample(universe, 25) for _ in range(3)]
    paths = [
        write_selection(tmp_path / f"sel{s}.h5", sets[s], params=params, k=25, seed=s)
        for s in range(3)
    ]
    r = stability_stage(paths, topk=None, output=tmp_path / "st.h5", json_path=tmp_path / "st.json")
    doc = json.loads((tmp_path / "st.json").read_text())
    assert set(doc) >= SPEC_KEYS
    assert doc["labels"] == [0, 1, 2] and doc["kind"] == "seeds" and doc["k"] == 25
    jac = np.array(doc["jaccard"])
    for i, j in combinations(range(3), 2):
        assert jac[i, j] == pytest.approx(ref_jaccard(sets[i], sets[j]))
    assert np.allclose(jac, jac.T) and np.all(np.diag(jac) == 1.0)
    pairs = [ref_jaccard(sets[i], sets[j]) for i, j in combinations(range(3), 2)]
    assert doc["mean_jaccard"] == pytest.approx(np.mean(pairs))
    assert doc["random_jaccard"] == pytest.approx(25 / (2 * 1000 - 25))
    assert doc["spearman"] is None and doc["jaccard_vs_k"] is None
    for n in params:
        pt = doc["per_tensor_overlap"][n]
        counts = [sum(1 for p, _ in s if p == n) for s in sets]
        assert pt["counts"] == counts
        sub = [{e for e in s if e[0] == n} for s in sets]
        assert pt["shared"] == len(sub[0] & sub[1] & sub[2])
        js = [len(a & b) / len(a | b) for a, b in combinations(sub, 2) if a | b]
        assert pt["jaccard"] == pytest.approx(np.mean(js))
    assert r.extra["mean_jaccard"] == pytest.approx(np.mean(pairs))
    art = A.read_h5(r.path, A.STABILITY_SCHEMA)
    assert np.allclose(art.arrays["jaccard"], jac)


def test_selections_of_different_k_are_refused(tmp_path):
    params = list(SHAPES)
    a = write_selection(tmp_path / "a.h5", [("wte", 1)], params=params, k=1)
    b = write_selection(tmp_path / "b.h5", [("wte", 1), ("wte", 2)], params=params, k=2, seed=1)
    with pytest.raises(UsageError, match="differ in K"):
        stability_stage([a, b], topk=None, output=tmp_path / "st.h5")


# --------------------------------------------------------------------------- scores


@pytest.fixture()
def seed_scores(tmp_path):
    tensors = [random_tensors(s, ties=True) for s in range(3)]
    paths = [write_scores(tmp_path / f"s{s}.safetensors", tensors[s], seed=s) for s in range(3)]
    return tensors, paths


def test_scores_jaccard_spearman_and_vs_k_against_references(tmp_path, seed_scores):
    tensors, paths = seed_scores
    k = 12
    r = stability_stage(paths, topk=k, output=tmp_path / "st.h5", json_path=tmp_path / "st.json")
    doc = json.loads((tmp_path / "st.json").read_text())
    assert set(doc) >= SPEC_KEYS and doc["labels"] == [0, 1, 2] and doc["input"] == "scores"
    top = [ref_topk(t, k) for t in tensors]
    jac = np.array(doc["jaccard"])
    rho = np.array(doc["spearman"])
    for i, j in combinations(range(3), 2):
        assert jac[i, j] == pytest.approx(ref_jaccard(top[i], top[j]))
        union = sorted(set(top[i]) | set(top[j]))
        want = ref_spearman(
            [value(tensors[i], e) for e in union], [value(tensors[j], e) for e in union]
        )
        assert rho[i, j] == pytest.approx(want, abs=1e-9)
        assert rho[j, i] == rho[i, j] and doc["spearman_n"][i][j] == len(union)
    assert np.all(np.diag(rho) == 1.0)
    n = sum(math.prod(s) for s in SHAPES.values())
    assert doc["n_population"] == n
    assert doc["random_jaccard"] == pytest.approx(k / (2 * n - k))
    assert str(k) in doc["jaccard_vs_k"] and doc["jaccard_vs_k"][str(k)] == doc["mean_jaccard"]
    for kk, got in doc["jaccard_vs_k"].items():
        tops = [ref_topk(t, int(kk)) for t in tensors]
        want = np.mean([ref_jaccard(tops[i], tops[j]) for i, j in combinations(range(3), 2)])
        assert got == pytest.approx(want), kk
    # per-tensor counts agree with the reference top-K
    for name in SHAPES:
        assert doc["per_tensor_overlap"][name]["counts"] == [
            sum(1 for p, _ in t if p == name) for t in top
        ]
    # a second call is a cache hit with the same fingerprint
    again = stability_stage(paths, topk=k, output=tmp_path / "st.h5")
    assert again.cached and again.fingerprint == r.fingerprint


def test_per_layer_mode_matches_per_tensor_reference(tmp_path, seed_scores):
    tensors, paths = seed_scores
    k = 4
    r = stability_stage(paths, topk=k, mode="per_layer", output=tmp_path / "pl.h5")
    doc = A.read_h5(r.path).doc
    top = [ref_topk_per_layer(t, k) for t in tensors]
    for i, j in combinations(range(3), 2):
        assert doc["jaccard"][i][j] == pytest.approx(ref_jaccard(top[i], top[j]))
    sizes = [math.prod(s) for s in SHAPES.values()]
    inter = sum(k * k / s for s in sizes)
    assert doc["random_jaccard"] == pytest.approx(inter / (2 * k * len(sizes) - inter))
    for kk, got in doc["jaccard_vs_k"].items():
        tops = [ref_topk_per_layer(t, int(kk)) for t in tensors]
        want = np.mean([ref_jaccard(tops[i], tops[j]) for i, j in combinations(range(3), 2)])
        assert got == pytest.approx(want), kk


def test_identical_scores_agree_perfectly(tmp_path):
    t = {n: v.abs() for n, v in random_tensors(7).items()}  # magnitude-like, seed-independent
    paths = [
        write_scores(tmp_path / f"m{s}.safetensors", t, metric="magnitude", seed=s)
        for s in range(3)
    ]
    doc = A.read_h5(stability_stage(paths, topk=10, output=tmp_path / "st.h5").path).doc
    assert np.all(np.array(doc["jaccard"]) == 1.0) and doc["mean_jaccard"] == 1.0
    assert np.allclose(np.array(doc["spearman"]), 1.0)
    assert all(v == 1.0 for v in doc["jaccard_vs_k"].values())
    assert all(v["jaccard"] in (1.0, None) for v in doc["per_tensor_overlap"].values())


def test_reversed_ranking_has_spearman_minus_one(tmp_path):
    t = {n: v.abs() + 0.01 for n, v in random_tensors(2).items()}
    hi = max(float(v.max()) for v in t.values()) + 1.0
    rev = {n: hi - v for n, v in t.items()}  # positive, order reversed
    a = write_scores(tmp_path / "a.safetensors", t, seed=0)
    b = write_scores(tmp_path / "b.safetensors", rev, seed=1)
    doc = A.read_h5(stability_stage([a, b], topk=10, output=tmp_path / "st.h5").path).doc
    assert doc["spearman"][0][1] == pytest.approx(-1.0)
    assert doc["jaccard"][0][1] == 0.0


def test_labels_are_metrics_when_metrics_differ_and_stems_on_collision(tmp_path):
    t = random_tensors(0)
    a = write_scores(tmp_path / "a.safetensors", t, metric="magnitude")
    b = write_scores(tmp_path / "b.safetensors", t, metric="act_mag")
    doc = A.read_h5(stability_stage([a, b], topk=5, output=tmp_path / "m.h5").path).doc
    assert doc["labels"] == ["magnitude", "act_mag"] and doc["kind"] == "metrics"
    c = write_scores(tmp_path / "c.safetensors", t, metric="magnitude")  # same metric and seed as a
    doc = A.read_h5(stability_stage([a, c], topk=5, output=tmp_path / "f.h5").path).doc
    assert doc["labels"] == ["a", "c"] and doc["kind"] == "files"


def test_one_input_is_a_usage_error(tmp_path):
    a = write_scores(tmp_path / "a.safetensors", random_tensors(0))
    with pytest.raises(UsageError, match="at least two seeds or metrics"):
        stability_stage([a], topk=5, output=tmp_path / "st.h5")
    b = write_scores(tmp_path / "b.safetensors", random_tensors(1), seed=1)
    with pytest.raises(UsageError, match="needs --topk"):
        stability_stage([a, b], topk=None, output=tmp_path / "st.h5")


def test_the_same_artifact_twice_is_a_usage_error(tmp_path):
    """A A (or a copy of A) would report perfect agreement; two seeds of one seed-free
    metric share a fingerprint and are still compared."""
    import shutil

    a = write_scores(tmp_path / "a.safetensors", random_tensors(0))
    shutil.copy(a, tmp_path / "copy.safetensors")
    for pair in ([a, a], [a, tmp_path / "copy.safetensors"]):
        with pytest.raises(UsageError, match="same artifact"):
            stability_stage(pair, topk=5, output=tmp_path / "st.h5")
    assert not (tmp_path / "st.h5").exists()


def test_mixed_models_and_mixed_kinds_are_refused(tmp_path):
    a = write_scores(tmp_path / "a.safetensors", random_tensors(0), model="model-A")
    b = write_scores(tmp_path / "b.safetensors", random_tensors(1), seed=1, model="model-B")
    with pytest.raises(ArtifactError, match="different models"):
        stability_stage([a, b], topk=5, output=tmp_path / "st.h5")
    sel = write_selection(tmp_path / "s.h5", [("wte", 0)], params=list(SHAPES), k=1)
    with pytest.raises(UsageError, match="not both"):
        stability_stage([a, sel], topk=5, output=tmp_path / "st.h5")


def test_cli_prints_only_the_artifact_path(tmp_path, seed_scores):
    from cwa.cli import app

    _, paths = seed_scores
    out = tmp_path / "cli.h5"
    res = CliRunner().invoke(
        app,
        [
            "stability",
            *map(str, paths),
            "--topk",
            "5",
            "-o",
            str(out),
            "--json",
            str(tmp_path / "j.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out)
    assert json.loads((tmp_path / "j.json").read_text())["k"] == 5
    res = CliRunner().invoke(app, ["stability", str(paths[0]), "--topk", "5"])
    assert res.exit_code == 2
