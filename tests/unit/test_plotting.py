"""Figures come from artifacts alone: a copied artifact directory (its recorded paths no
longer valid) yields every SPEC figure as a real, readable PNG."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cwa import artifacts as A
from cwa.errors import UsageError
from cwa.plots import param_group, plot_artifacts
from cwa.ranking import Draw, Selection
from cwa.stages import rank_stage, stability_stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC = "grad_x_weight"


def _shapes():
    s = {"transformer.wte.weight": (40, 8)}
    for b in range(3):
        s[f"transformer.h.{b}.attn.c_attn.weight"] = (8, 24)
        s[f"transformer.h.{b}.mlp.c_fc.weight"] = (8, 32)
    s["lm_head.weight"] = (40, 8)
    return s


def _perturbation_doc(seed: int, ks: list[int]) -> dict:
    rng = np.random.default_rng(seed)
    conds = []
    for k in ks:
        base = dict(seed=seed, k=k, method="sign_flip", scale=1.0, mode="global", restored=True)
        top = "inf" if (seed == 1 and k == ks[-1]) else 0.05 * k  # a non-finite result
        conds.append(
            {
                "name": "topk",
                "draw": 0,
                "selection": 0,
                "delta_nll": top,
                "kl_from_baseline": 0.04 * k,
                **base,
            }
        )
        for d in range(6):
            v = float(rng.normal(1e-4 * k, 5e-5))
            conds.append(
                {
                    "name": "random_k",
                    "draw": d,
                    "selection": 1,
                    "delta_nll": v,
                    "kl_from_baseline": abs(v),
                    **base,
                }
            )
        conds.append(
            {
                "name": "bottom_k",
                "draw": 0,
                "selection": 2,
                "delta_nll": "nan",
                "kl_from_baseline": 0.0,
                **base,
            }
        )
    return {
        "baseline": {
            "nll": 3.0,
            "perplexity": math.exp(3.0),
            "token_accuracy": 0.4,
            "bits_per_byte": 1.2,
            "n_tokens": 512,
        },
        "conditions": conds,
        "summary": {
            "topk": {"delta_nll": 0.5, "ci95": [0.4, 0.6]},
            "random_k": {
                "mean": 1e-3,
                "std": 1e-4,
                "ci95": [0.0, 2e-3],
                "topk_p_value": 1 / 7,
                "topk_z": 30.0,
            },
        },
        "selections": [
            "/nonexistent/topk.h5",
            "/nonexistent/random_k.h5",
            "/nonexistent/bottom_k.h5",
        ],
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `cwa run`-like artifacts directory: 2 seeds, K in {10, 20}, a control selection,
    perturbation results per seed, a stability artifact."""
    root = tmp_path_factory.mktemp("run")
    art = root / "artifacts"
    art.mkdir()
    g = torch.Generator().manual_seed(0)
    scores = []
    for seed in range(2):
        t = {n: torch.randn(s, generator=g).abs() ** 2 for n, s in _shapes().items()}
        meta = {
            "cwa.metric": METRIC,
            "cwa.seed": str(seed),
            "cwa.model_fingerprint": "model",
            "cwa.fingerprint": f"scores-{seed}",
        }
        scores.append(A.write_scores(art / f"scores_seed{seed}.safetensors", t, meta))
        for k in (10, 20):
            rank_stage(scores[-1], topk=k, output=art / f"topk_seed{seed}_k{k}.h5")
    params = list(_shapes())
    ctl = Selection(
        "random_k",
        10,
        "global",
        METRIC,
        "abs",
        0,
        1,
        params,
        [Draw([0, 1], [3, 4], [0.1, 0.2])],
        {},
    )
    A.write_selection(art / "random_k_seed0.h5", ctl, fingerprint="ctl", provenance={})
    for seed in range(2):
        A.write_h5(
            art / f"perturb_seed{seed}.h5",
            A.PERTURBATION_SCHEMA,
            {"fingerprint": f"pert-{seed}"},
            {},
            doc=_perturbation_doc(seed, [10, 20]),
        )
    stability_stage(scores, topk=10, output=art / "stability_k10.h5")
    # the figures must not depend on the recorded paths: copy, then remove the original
    copy = tmp_path_factory.mktemp("copied") / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(root)
    return copy


def _check_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert 400 <= h <= 2000 and 600 <= w <= 2000, (path.name, img.shape)
    assert float(np.std(img[..., :3])) > 0.02  # not blank


def test_every_figure_from_a_copied_artifact_directory(run_dir, tmp_path):
    out = tmp_path / "plots"
    written = plot_artifacts([run_dir / "artifacts"], out)
    names = {p.name for p in written}
    want = {
        f"{METRIC}_k{k}_{kind}.png"
        for k in (10, 20)
        for kind in (
            "sensitivity_distribution",
            "layer_comparison",
            "sensitivity_heatmap",
            "perturbation_effects",
        )
    }
    want |= {f"{METRIC}_k10_stability_analysis.png", f"{METRIC}_dose_response.png"}
    assert names == want
    assert sorted(p.name for p in out.iterdir()) == sorted(want)  # no stray temporary files
    for p in written:
        _check_png(p)


def test_partial_inputs_plot_what_they_can(run_dir, tmp_path):
    art = run_dir / "artifacts"
    got = plot_artifacts([art / "stability_k10.h5"], tmp_path / "a")
    assert [p.name for p in got] == [f"{METRIC}_k10_stability_analysis.png"]
    got = plot_artifacts([art / "perturb_seed0.h5"], tmp_path / "b")
    assert {p.name for p in got} == {
        "unknown_k10_perturbation_effects.png",
        "unknown_k20_perturbation_effects.png",
        "unknown_dose_response.png",
    }  # no selection says which metric: named "unknown", still drawn
    with pytest.raises(UsageError, match="nothing to plot"):
        plot_artifacts([art / "scores_seed0.safetensors"], tmp_path / "c")


def test_cli_prints_figure_paths(run_dir, tmp_path):
    from cwa.cli import app

    art = run_dir / "artifacts"
    out = tmp_path / "figs"
    res = CliRunner().invoke(
        app,
        ["plot", "-", "-o", str(out)],
        input=f"{art / 'stability_k10.h5'}\n{art / 'topk_seed0_k10.h5'}\n",
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all((out / p.split("/")[-1]).exists() for p in lines)


@pytest.mark.parametrize(
    "name, want",
    [
        ("transformer.h.3.attn.c_attn.weight", (3, "attn.c_attn")),
        ("model.layers.0.mlp.up_proj.weight", (0, "mlp.up_proj")),
        ("gpt_neox.layers.11.attention.query_key_value.weight", (11, "attention.query_key_value")),
        ("transformer.wte.weight", (None, "wte")),
        ("lm_head.weight", (None, "lm_head")),
        ("transformer.ln_f.bias", (None, "ln_f.bias")),
    ],
)
def test_param_group(name, want):
    assert param_group(name) == want
