"""The Python API (`import cwa`): the quick-start block runs as written, results
round-trip through their artifacts, the API and the CLI are one code path (same
fingerprints, same numbers), and the stages never branch on a method's name."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cwa
from cwa import artifacts as A
from cwa.errors import ArtifactError, UsageError
from tests.integration.reliability_util import SEQ, assert_ok, invoke

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tiny_gpt2, tmp_path_factory):
    from tests.integration.conftest import make_text

    d = tmp_path_factory.mktemp("api")
    text = d / "t.txt"
    text.write_text(make_text(3000, 7))
    lm = cwa.load_model(tiny_gpt2, device="cpu")
    kw = {"data": text, "seq_len": int(SEQ)}
    scores = cwa.score(lm, metric="grad_x_weight", calib_samples=4, seed=3, **kw)
    return {"lm": lm, "text": text, "kw": kw, "scores": scores, "model": tiny_gpt2, "dir": d}


def test_the_quickstart_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("api_quickstart", REPO / "examples" / "api_quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = mod.main(tmp_path / "out")
    assert isinstance(got["scores"], cwa.Scores) and isinstance(got["top"], cwa.Selection)
    assert isinstance(got["results"], cwa.Results) and isinstance(got["stability"], cwa.Stability)
    assert (tmp_path / "out" / "perturbation_effects.png").stat().st_size > 1000
    assert (got["run"] / "experiment_manifest.json").exists()
    df = got["results"].to_pandas()
    assert list(df["name"]) == ["topk"] + ["random_k"] * 5
    assert list(got["top"].to_pandas().columns) == ["rank", "param", "layer", "coords", "flat_index", "score", "value"]


def test_api_and_cli_are_one_code_path(env, tmp_path):
    """The in-memory scores equal the CLI's artifact: fingerprint and every tensor."""
    out = tmp_path / "s.safetensors"
    assert_ok(invoke(["score", "--model", env["model"], "--data", env["text"], "--seq-len", SEQ,
                      "--calib-samples", "4", "--seed", "3", "-o", out]))
    cli = A.open_scores(out)
    mem = env["scores"]
    assert cli.fingerprint == mem.fingerprint and cli.names == mem.names
    for n in mem.names:
        assert torch.equal(cli.get(n), mem.get(n)), n
    top_cli = tmp_path / "t.h5"
    assert_ok(invoke(["rank", out, "--topk", "7", "-o", top_cli]))
    a, b = A.read_selection(top_cli), cwa.rank(mem, topk=7)
    assert a.fingerprint == b.fingerprint
    assert (a.draws[0].flat_index == b.draws[0].flat_index).all() and a.doc == b.doc


def test_every_result_round_trips_through_its_artifact(env, tmp_path):
    sc = env["scores"]
    back = cwa.open_scores(sc.save(str(tmp_path / "s.safetensors")))  # a plain str path
    assert back.fingerprint == sc.fingerprint and back.seed == 3
    assert {k: v for k, v in back.meta.items() if k in sc.meta and k != "cwa.created"} == {
        k: v for k, v in sc.meta.items() if k != "cwa.created"}
    assert all(torch.equal(back[n], sc[n]) for n in sc.names)

    top = cwa.rank(sc, topk=9)
    t2 = cwa.read_selection(top.save(tmp_path / "top.h5"))
    assert (t2.fingerprint, t2.seed, t2.provenance, t2.doc, t2.info) == (top.fingerprint, 3, top.provenance, top.doc, top.info)
    assert set(t2.arrays) == set(top.arrays)
    assert (t2.to_pandas(lm=env["lm"]) == top.to_pandas()).all().all()  # values from the model in memory

    rnd = cwa.control(sc, kind="random_k", ref=top, draws=2, seed=1)
    res = cwa.perturb(env["lm"], [top, rnd], method="zero", eval_samples=2, **env["kw"])
    r2 = cwa.read_results(res.save(tmp_path / "p.h5", json_path=tmp_path / "p.json"))
    assert r2.fingerprint == res.fingerprint and A.json_safe(r2.doc) == A.json_safe(res.doc)
    assert len(r2.to_pandas()) == 3

    sc2 = cwa.score(env["lm"], metric="grad_x_weight", calib_samples=4, seed=4, **env["kw"])
    st = cwa.stability([sc, sc2], topk=9)
    s2 = cwa.read_stability(st.save(tmp_path / "st.h5"))
    assert s2.fingerprint == st.fingerprint and s2.mean_jaccard == st.mean_jaccard
    assert list(st.to_pandas().columns)[:3] == ["a", "b", "jaccard"]


def test_string_paths_work_on_every_call(env, tmp_path, monkeypatch):
    """`rank_stage(..., output="nb/top.h5")` crashed on the second call ('str' object has
    no attribute 'exists'): every path argument takes a str."""
    from cwa.stages import rank_stage

    monkeypatch.chdir(tmp_path)
    p = str(env["scores"].save("s.safetensors"))
    first = rank_stage(p, topk=5, output="top.h5", csv="top.csv", stats="stats.json")
    again = rank_stage(p, topk=5, output="top.h5", csv="top.csv", stats="stats.json")
    assert not first.cached and again.cached and again.value.fingerprint == first.value.fingerprint
    assert cwa.rank(p, topk=5).fingerprint == first.fingerprint


def test_run_config_takes_plain_values_and_is_not_changed(tmp_path):
    cfg = cwa.RunConfig(metric="abs", topk=5, seeds=0, controls="bottom_k", perturb="zero",
                        data=cwa.DataOptions(calib_samples=2, eval_samples=2, seq_len=16),
                        out_dir=str(tmp_path / "r"), save_plots=False)
    assert cfg.topk == [5] and cfg.seeds == [0] and cfg.controls == ["bottom_k"]
    out = cwa.run(cfg)
    assert cfg.metric == "abs", "run() changed its config"
    assert (out / "artifacts" / "topk_seed0.h5").exists()
    with pytest.raises(UsageError, match="--topk"):
        cwa.RunConfig(topk=[5, 5])


def test_errors_are_cwa_error_types_with_the_cli_wording(env, tmp_path):
    with pytest.raises(UsageError, match=r"^--topk 0: must be a positive integer"):
        cwa.rank(env["scores"], topk=0)
    with pytest.raises(UsageError, match="Unknown metric 'grad_x_wieght'.*grad_x_weight"):
        cwa.score(env["lm"], metric="grad_x_wieght")
    with pytest.raises(UsageError, match="--control-draws 0"):
        cwa.control(env["scores"], ref=cwa.rank(env["scores"], topk=3), draws=0)
    # an option the method does not use is refused, as on the command line (issue 15)
    top3 = cwa.rank(env["scores"], topk=3)
    with pytest.raises(UsageError, match="--perturb-prob 0.5: only --perturb bit_flip uses it"):
        cwa.perturb(env["lm"], [top3], method="zero", prob=0.5, eval_samples=2)
    with pytest.raises(UsageError, match="--bit sign"):
        cwa.perturb(env["lm"], [top3], method="sign_flip", bit="sign", eval_samples=2)
    other = cwa.load_model(device="cpu")  # the embedded model: another fingerprint
    with pytest.raises(ArtifactError, match="another model"):
        cwa.perturb(other, [cwa.rank(env["scores"], topk=3)], eval_samples=2)


def test_import_cwa_is_light_and_lists_the_api():
    code = ("import sys, cwa; assert 'torch' not in sys.modules, 'torch imported';"
            "print(' '.join(sorted(n for n in cwa.__all__ if not n.startswith('_'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    doc = (REPO / "docs" / "api.md").read_text()
    missing = [n for n in r.stdout.split() if f"`{n}" not in doc and f"cwa.{n}" not in doc and n not in ("errors", "checks")]
    assert not missing, f"public names not in docs/api.md: {missing}"


def _method_names() -> set[str]:
    from cwa.controls import CONTROLS
    from cwa.metrics import METRICS
    from cwa.perturbation import PERTURBATIONS

    names = set()
    for reg in (METRICS, PERTURBATIONS, CONTROLS):
        names |= set(reg.names()) | set(reg._aliases)
    return names


@pytest.mark.parametrize("module", ["stages.py", "pipeline.py"])
def test_no_stage_branches_on_a_method_name(module):
    """Stages and the pipeline read a method's facts from its registry entry: no
    comparison (==, !=, in) against a metric, perturbation or control name."""
    names = _method_names()
    tree = ast.parse((REPO / "cwa" / module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                consts = c.elts if isinstance(c, ast.Tuple | ast.List | ast.Set) else [c]
                found += [(node.lineno, k.value) for k in consts
                          if isinstance(k, ast.Constant) and k.value in names]
    assert not found, f"{module} branches on method names: {found}"


def test_the_notebook_runs_cell_by_cell(tmp_path, monkeypatch):
    """examples/notebook.ipynb: every code cell, in order, in one namespace (as a kernel
    would); the figure cells return matplotlib Figures."""
    import json

    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    nb = json.loads((REPO / "examples" / "notebook.ipynb").read_text())
    ns: dict = {}
    figures = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        *body, last = ast.parse(src).body
        exec(compile(ast.Module(body=body, type_ignores=[]), "<cell>", "exec"), ns)
        if isinstance(last, ast.Expr):
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
            figures += isinstance(value, Figure)
        else:
            exec(compile(ast.Module(body=[last], type_ignores=[]), "<cell>", "exec"), ns)
    assert figures == 3
