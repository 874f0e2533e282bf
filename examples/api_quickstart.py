"""The Python API in one page, on the embedded model (under a minute on 2 CPU cores).

    python examples/api_quickstart.py [OUT_DIR]

Writes its artifacts and figures under OUT_DIR (default: ./api-quickstart-out).
The test suite runs this file (tests/integration/test_api.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cwa


def main(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    lm = cwa.load_model()  # embedded default; or a hub id / dir / .gguf
    scores = cwa.score(lm, metric="grad_x_weight", calib_samples=8, seed=0)  # -> cwa.Scores
    top = cwa.rank(scores, topk=100, mode="global")  # -> cwa.Selection
    rnd = cwa.control(scores, kind="random_k", ref=top, draws=5, seed=0)  # -> cwa.Selection
    res = cwa.perturb(lm, [top, rnd], method="sign_flip", eval_samples=8)  # -> cwa.Results
    print("top-K  ΔNLL:", round(res.summary["topk"]["delta_nll"], 4))
    print("random ΔNLL:", round(res.summary["random_k"]["mean"], 4), "p =", res.summary["random_k"]["topk_p_value"])
    print(res.to_pandas()[["name", "draw", "nll", "delta_nll"]])
    print(top.to_pandas().head())
    scores2 = cwa.score(lm, metric="grad_x_weight", calib_samples=8, seed=1)
    st = cwa.stability([scores, scores2], topk=100)  # -> cwa.Stability
    print("Jaccard seed 0 vs 1:", round(st.mean_jaccard, 3), "(chance", round(st.random_jaccard, 5), ")")
    fig = cwa.plots.perturbation_effects(res)  # a matplotlib Figure; saving is separate
    cwa.plots.save(fig, out / "perturbation_effects.png")
    run_dir = cwa.run(cwa.RunConfig(metric="magnitude", topk=[50, 100], seeds=[0], control_draws=3,
                                     data=cwa.DataOptions(calib_samples=4, eval_samples=4),
                                     out_dir=out / "run", save_plots=False))
    print("cwa run wrote", run_dir)
    scores.save(out / "s.safetensors")
    top.save(out / "top.h5")
    back, top_back = cwa.open_scores(out / "s.safetensors"), cwa.read_selection(out / "top.h5")
    assert back.fingerprint == scores.fingerprint and top_back.fingerprint == top.fingerprint
    return {"scores": scores, "top": top, "random": rnd, "results": res, "stability": st, "run": run_dir}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("api-quickstart-out"))
