"""Downstream tasks through lm-evaluation-harness (`--eval-tasks`, `cwa.tasks`).

A local multiple-choice task (a YAML and a small JSONL written here, loaded through
lm-eval's `include_path`; never the network) runs through `cwa perturb` on the embedded
model. The reference is a plain loop: for each document, the choice whose continuation
has the highest summed log-likelihood under the model, computed directly. The targets are
chosen so that the expected accuracy is not an accident: the reference's best choice for
half of the documents and its worst for the other half, so lm-eval's accuracy is exactly
0.5 only if it ranks the choices of every document as the loop does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
from typer.testing import CliRunner

from cwa import artifacts as A
from cwa.cli import app

runner = CliRunner()
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm_eval not installed (pip install 'cwa[tasks]')"
)

DOCS = [
    ("The keyword that defines a function is", ["def", "class", "import", "while"]),
    ("To leave a loop early, use the statement", ["break", "return", "pass", "yield"]),
    ("A for loop iterates over the items of an", ["iterable", "integer", "exception", "operator"]),
    ("An empty list in a boolean context is", ["False", "True", "None", "zero"]),
    ("An exception is raised with the statement", ["raise", "try", "with", "assert"]),
    ("The length of a sequence is returned by the built-in", ["len", "abs", "sum", "map"]),
    ("Context managers are entered with the statement", ["with", "for", "del", "global"]),
    ("A name declared global in a function is", ["global", "local", "free", "nonlocal"]),
]
LIMIT = 6  # of the 8 documents, lm-eval evaluates the first 6
YAML = """task: mytask
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def loglikelihoods(model, tok, question: str, choices: list[str]) -> list[float]:
    """Summed log p(" " + choice | question), token by token, straight from the model."""
    ctx = tok.encode(question, add_special_tokens=False)
    out = []
    with torch.no_grad():
        for c in choices:
            cont = tok.encode(" " + c, add_special_tokens=False)
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def reference(model, tok, answers: list[int]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice) of the first LIMIT documents."""
    acc, norm = [], []
    for (q, choices), gold in zip(DOCS[:LIMIT], answers, strict=False):
        ll = loglikelihoods(model, tok, q, choices)
        acc.append(float(max(range(4), key=lambda i: ll[i]) == gold))
        norm.append(float(max(range(4), key=lambda i: ll[i] / len(choices[i])) == gold))
    n = len(acc)
    p = sum(acc) / n
    stderr = math.sqrt(sum((a - p) ** 2 for a in acc) / (n - 1)) / math.sqrt(n)
    return {"acc": p, "acc_norm": sum(norm) / n, "acc_stderr": stderr}


def ok(args, **kw):
    r = runner.invoke(app, args, **kw)
    assert r.exit_code == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def lm():
    import cwa

    return cwa.load_model()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lm):
    """tasks/mytask.yaml + tasks/mytask.jsonl; the answers are the unperturbed model's best
    choice (even documents) or worst (odd), so the expected accuracy is exactly 0.5."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    d = root / "tasks"
    d.mkdir()
    answers = []
    for i, (q, choices) in enumerate(DOCS):
        ll = loglikelihoods(lm.model, lm.tokenizer, q, choices)
        answers.append(max(range(4), key=lambda j: ll[j]) if i % 2 == 0 else min(range(4), key=lambda j: ll[j]))
    jsonl = d / "mytask.jsonl"
    jsonl.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                             for (q, c), a in zip(DOCS, answers, strict=True)))
    (d / "mytask.yaml").write_text(YAML.format(jsonl=jsonl, cache=root / "hf_datasets_cache"))
    return d, answers


@pytest.fixture(scope="module")
def selections(tmp_path_factory):
    d = tmp_path_factory.mktemp("task_sels")
    sc = ok(["score", "--calib-samples", "4", "-o", str(d / "s.safetensors")]).stdout.strip()  # grad_x_weight
    top = ok(["rank", sc, "--topk", "1000", "-o", str(d / "top.h5")]).stdout.strip()
    rnd = ok(["control", sc, "--kind", "random_k", "--ref", top, "--control-draws", "2", "-o", str(d / "rnd.h5")])
    return top, rnd.stdout.strip()


def task_args(task_dir_path):
    return ["--eval-tasks", "mytask", "--eval-tasks-path", str(task_dir_path), "--eval-tasks-limit", str(LIMIT)]


SMALL = ["--eval-samples", "2", "--seq-len", "64"]


@needs_lm_eval
def test_local_task_runs_through_cwa_perturb(tmp_path, task_dir, selections, lm):
    from cwa.perturbation import perturbed

    d, answers = task_dir
    top, rnd = selections
    out, js = tmp_path / "res.h5", tmp_path / "pr.json"
    args = ["perturb", top, rnd, *SMALL, *task_args(d), "--json", str(js), "-o", str(out)]
    r = ok(args)
    assert r.stdout.strip() == str(out)  # lm-eval prints nothing on stdout
    assert "lm-eval tasks" in r.stderr and "mytask acc" in r.stderr and "random_k (2 draws)" in r.stderr

    res = A.read_results(out)
    assert json.loads(js.read_text())["baseline"]["tasks"] == res.baseline["tasks"]
    ref = reference(lm.model, lm.tokenizer, answers)
    base = res.baseline["tasks"]["mytask"]
    assert ref["acc"] == 0.5 and base["acc"] == ref["acc"]
    assert base["acc_norm"] == pytest.approx(ref["acc_norm"], abs=1e-12)
    assert base["acc_stderr"] == pytest.approx(ref["acc_stderr"], rel=1e-9)
    assert set(base) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}

    conds = res.conditions
    assert [c["name"] for c in conds] == ["topk", "random_k", "random_k"]
    for c in conds:
        assert set(c["tasks"]["mytask"]) == set(base) and c["restored"]
    # the top-K condition against the same loop with the same weights sign-flipped in place
    sel = A.read_selection(top)
    named = dict(lm.model.named_parameters())
    with perturbed([named[n] for n in sel.params], sel.draws[0], "sign_flip", scale=1.0, prob=1.0,
                   bit="exponent_msb", seed=0, draw_index=0):
        ref_top = reference(lm.model, lm.tokenizer, answers)
    assert conds[0]["tasks"]["mytask"]["acc"] == ref_top["acc"] != ref["acc"]  # flipping these 1000 weights costs answers
    assert conds[0]["tasks"]["mytask"]["acc_norm"] == pytest.approx(ref_top["acc_norm"], abs=1e-12)

    te = res.doc["task_eval"]
    assert te["tasks"] == ["mytask"] and te["limit"] == LIMIT and te["lm_eval_version"]
    assert te["n_samples"]["mytask"] == {"original": len(DOCS), "effective": LIMIT}
    assert set(te["files"]) == {"mytask.yaml", "mytask.jsonl"}
    s = res.summary
    assert s["topk"]["tasks"]["mytask"]["acc"]["delta"] == pytest.approx(ref_top["acc"] - 0.5)
    assert s["random_k"]["tasks"]["mytask"]["acc"]["n_draws"] == 2
    rows = res.tasks
    assert len(rows) == 4 * 2 and rows[0] == {"condition": "baseline", "seed": None, "draw": None, "k": None,
                                              "task": "mytask", "metric": "acc", "value": 0.5,
                                              "stderr": base["acc_stderr"]}
    assert "tasks.mytask.acc" in res.to_pandas().columns

    # the same command again: a cache hit, the same file; another task file: recomputed
    mtime = out.stat().st_mtime_ns
    r2 = ok([*args, "-v"])
    assert r2.stdout.strip() == str(out) and "cache hit" in r2.stderr and out.stat().st_mtime_ns == mtime
    with open(d / "mytask.jsonl", "a") as f:  # a ninth document, beyond the limit: same numbers
        f.write(json.dumps({"question": "None is a", "choices": ["singleton", "list", "tuple", "dict"],
                            "answer": 0}) + "\n")
    r3 = ok([*args, "-v"])
    assert "cache hit" not in r3.stderr
    res3 = A.read_results(out)
    assert res3.fingerprint != res.fingerprint and res3.baseline["tasks"] == res.baseline["tasks"]


@needs_lm_eval
def test_tasks_see_the_perturbed_model_itself_and_it_is_restored(task_dir, selections, lm, monkeypatch):
    """The harness evaluates the loaded model object (no copy) with the selected weights
    flipped in place, and every tensor is bit-identical afterwards."""
    import lm_eval.evaluator

    import cwa

    d, _ = task_dir
    top, _ = selections
    sel = A.read_selection(top)
    named = dict(lm.model.named_parameters())
    p0 = named[sel.params[int(sel.draws[0].param_index[0])]]
    i0 = int(sel.draws[0].flat_index[0])
    w0 = float(p0.detach().view(-1)[i0])
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    seen = []
    real = lm_eval.evaluator.evaluate

    def spy(**kw):
        seen.append((kw["lm"].model is lm.model, float(p0.detach().view(-1)[i0])))
        return real(**kw)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", spy)
    res = cwa.perturb(lm, [top], method="sign_flip", eval_samples=2, seq_len=64, eval_tasks="mytask",
                      eval_tasks_path=d, eval_tasks_limit=LIMIT)
    assert seen == [(True, w0), (True, -w0)]  # baseline, then the top-K condition
    assert res.baseline["tasks"]["mytask"]["acc"] == 0.5
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@needs_lm_eval
def test_run_passes_the_task_options_through(tmp_path, task_dir):
    d, _ = task_dir
    out = tmp_path / "run"
    ok(["run", "--metric", "magnitude", "--topk", "20", "--controls", "none", "--seeds", "0", "--no-save-plots",
        *SMALL, *task_args(d), "--out-dir", str(out)])
    doc = json.loads((out / "perturbation_results.json").read_text())
    assert doc["baseline"]["tasks"]["mytask"]["acc"] == 0.5
    assert "acc" in doc["conditions"][0]["tasks"]["mytask"] and doc["task_eval"]["limit"] == LIMIT
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eval_tasks"] == ["mytask"] and cfg["eval_tasks_limit"] == LIMIT


def one_line_error(args, code, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    return lines[0]


def test_eval_tasks_without_lm_eval_names_the_extra(monkeypatch, selections):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    top, _ = selections
    one_line_error(["perturb", top, *SMALL, "--eval-tasks", "hellaswag"], 2, "pip install 'cwa[tasks]'")


@needs_lm_eval
def test_task_option_errors_are_one_line(tmp_path, task_dir, selections):
    d, _ = task_dir
    top, _ = selections
    one_line_error(["perturb", top, *SMALL, "--eval-tasks", "mytask", "--eval-tasks-path", str(tmp_path / "nope")],
                   2, "--eval-tasks-path")
    (tmp_path / "f.yaml").write_text("task: x\n")
    one_line_error(["perturb", top, *SMALL, "--eval-tasks", "mytask", "--eval-tasks-path", str(tmp_path / "f.yaml")],
                   2, "is not a directory")
    one_line_error(["perturb", top, *SMALL, *task_args(d)[:4], "--eval-tasks-limit", "0"], 2, "--eval-tasks-limit 0")
    one_line_error(["perturb", top, *SMALL, "--eval-tasks-path", str(d)], 2, "needs --eval-tasks")
    one_line_error(["run", "--perturb", "none", *task_args(d), "--out-dir", str(tmp_path / "o")], 2, "--perturb none")


@needs_lm_eval
def test_unknown_task_names_list_close_matches(tmp_path, task_dir, selections, monkeypatch):
    """Looked up in the local tasks, then in the registry with them added; here the registry
    is a second small directory (lm-eval's own takes ~20 s of CPU to index: see the slow test)."""
    from lm_eval.tasks import TaskManager

    import cwa.tasks

    d, _ = task_dir
    top, _ = selections
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    (builtin / "other.yaml").write_text((d / "mytask.yaml").read_text().replace("task: mytask", "task: mytask_v2"))
    local_only = cwa.tasks._manager
    monkeypatch.setattr(cwa.tasks, "_manager", lambda spec, defaults: TaskManager(
        include_path=[str(d), str(builtin)], include_defaults=False) if defaults else local_only(spec, False))
    line = one_line_error(["perturb", top, *SMALL, "--eval-tasks", "mytsk", "--eval-tasks-path", str(d),
                           "-o", str(tmp_path / "r.h5")], 2, "--eval-tasks mytsk: no such lm-eval task")
    assert "Did you mean: mytask, mytask_v2?" in line and str(d) in line
    assert not (tmp_path / "r.h5").exists()
    r = ok(["perturb", top, *SMALL, "--eval-tasks", "mytask_v2", "--eval-tasks-path", str(d), "--eval-tasks-limit", "2",
            "-o", str(tmp_path / "r.h5")])  # a task of the registry, not of the local directory
    assert "mytask_v2" in A.read_results(tmp_path / "r.h5").baseline["tasks"] and "mytask_v2 acc" in r.stderr


@needs_lm_eval
@pytest.mark.slow
def test_unknown_name_in_lm_evals_own_registry(selections):
    top, _ = selections
    one_line_error(["perturb", top, *SMALL, "--eval-tasks", "hellaswg"], 2, "Did you mean: hellaswag")
