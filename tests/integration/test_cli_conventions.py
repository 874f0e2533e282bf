"""Command-line conventions: exit codes after signals, a closed stdout pipe, shell
completion, `--version`, `--quiet`, help at 80 columns, options that a method does not
use, exact `--controls` names, `cwa info` on models and JSON reports, and the manifest's
pip freeze without pip."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from cwa.cli import app
from tests.integration.reliability_util import REPO, assert_clean_error, assert_ok, invoke

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
ENV.pop("CWA_DEBUG", None)


def _closed_stdout(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m cwa ARGS` whose stdout is a pipe nobody reads: the read end is closed
    before the child starts, so its first write meets a closed pipe (what `| head -1`
    does, without depending on who is faster)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "cwa", *map(str, args)], stdout=w, stderr=subprocess.PIPE,
                              text=True, env=ENV, timeout=timeout)
    finally:
        os.close(w)


# -- signals: 128 + the signal's number -------------------------------------------------

PARKED = r"""
import os, sys, time
import cwa.commands.common as common

def park(what):  # `cwa info -` waiting for paths on stdin, until the test's signal
    open(os.environ["CWA_TEST_MARKER"], "w").close()
    time.sleep(600)
    sys.exit("parked child was never signalled")

common._stdin_paths = park
from cwa.cli import main
main(["info", "-"])
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_exits_with_128_plus_its_number(tmp_path, sig, code):
    marker = tmp_path / "parked"
    env = {**ENV, "CWA_TEST_MARKER": str(marker)}
    p = subprocess.Popen([sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                          + PARKED], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 120, "child never parked"
            time.sleep(0.02)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == code, (p.returncode, err)
    assert err.splitlines() == ["error: interrupted; no partial artifact was left"], err
    assert out == ""


def test_exit_code_of_a_stop():
    from cwa.stop import exit_code

    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


# -- a closed stdout pipe: exit 0, nothing on stderr ------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["--version"]], ids=" ".join)
def test_closed_pipe_exits_zero_quietly(args):
    r = _closed_stdout(args)
    assert (r.returncode, r.stderr) == (0, ""), r


def test_closed_pipe_keeps_an_error_code(tmp_path):
    r = _closed_stdout(["info", tmp_path / "missing.h5"])
    assert r.returncode == 1, r
    assert r.stderr.splitlines() == [f"error: {tmp_path / 'missing.h5'}: no such file"], r.stderr


def test_info_of_two_reports_into_a_closed_pipe(reports):
    r = _closed_stdout(["info", reports["topk"], reports["perturb_json"]])
    assert (r.returncode, r.stderr) == (0, ""), r


# -- completion, --version, import cost -------------------------------------------------


def test_shell_completion_is_offered_and_completes_commands():
    r = invoke(["--help"])
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout
    from typer.testing import CliRunner

    env = {"_CWA_COMPLETE": "complete_bash", "COMP_WORDS": "cwa ru", "COMP_CWORD": "1"}
    got = CliRunner().invoke(app, [], env=env, prog_name="cwa")
    assert got.stdout.split() == ["run"], got.stdout
    env = {"_CWA_COMPLETE": "complete_bash", "COMP_WORDS": "cwa run --perturb-s", "COMP_CWORD": "2"}
    got = CliRunner().invoke(app, [], env=env, prog_name="cwa")
    assert got.stdout.split() == ["--perturb-scale"], got.stdout


def test_completion_does_not_import_torch():
    """Every TAB press runs `cwa`: it must stay as light as `cwa --help`."""
    code = ("import atexit, sys; sys.argv[0] = 'cwa'\n"
            "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr))\n"
            "from cwa.cli import main; main()")
    env = {**ENV, "_CWA_COMPLETE": "complete_bash", "COMP_WORDS": "cwa sc", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["score"], r
    assert r.stderr.strip() == "False", r.stderr


def test_version():
    r = invoke(["--version"])
    try:
        want = md.version("cwa")
    except md.PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        import cwa

        want = cwa.__version__
    assert r.exit_code == 0 and r.stdout == f"cwa {want}\n", r.stdout


# -- --quiet ---------------------------------------------------------------------------


def _eval_args(tiny_gpt2, tmp_path) -> list[str]:
    from tests.integration.conftest import make_text

    data = tmp_path / "d.txt"
    data.write_text(make_text(3000, 7))
    return ["eval", "--model", tiny_gpt2, "--data", data, "--seq-len", "16", "--eval-samples", "3",
            "--batch-size", "1", "--verbose"]


def test_quiet_silences_progress_and_info_lines_but_not_errors(tiny_gpt2, tmp_path):
    env = {"CWA_PROGRESS_INTERVAL": "1e-9"}  # a progress line at every step
    args = _eval_args(tiny_gpt2, tmp_path)
    loud = invoke([*args, "-o", tmp_path / "a.json"], env=env)
    assert assert_ok(loud) == str(tmp_path / "a.json")
    assert "eval: 1/3 windows" in loud.stderr and "wrote " in loud.stderr, loud.stderr
    for q in ("-q", "--quiet"):
        out = tmp_path / f"b{q}.json"
        r = invoke([q, *args, "-o", out], env=env)
        assert assert_ok(r) == str(out)
        assert r.stderr == "", r.stderr
    err = invoke(["-q", "eval", "--dtype", "float8"])
    assert_clean_error(err, 2, "--dtype")


def test_quiet_progress_is_still_a_stop_point():
    from cwa import console, stop

    console.set_quiet(True)
    try:
        stop.request(signal.SIGTERM)
        with pytest.raises(stop.Terminated), console.progress("eval", 3) as advance:
            advance(1)
    finally:
        console.set_quiet(False)
        stop.reset()


# -- help at 80 columns ----------------------------------------------------------------


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.list_commands(None)}


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_at_80_columns_shows_every_option_and_default_whole(name):
    cmd = _commands()[name]
    r = invoke([name, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.stdout
    text = r.stdout
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide
    flat = " ".join(text.split())
    for p in cmd.params:
        if p.param_type_name != "option":
            continue
        for opt in [*p.opts, *p.secondary_opts]:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), f"{name}: {opt} not whole"
        d = p.default
        if p.show_default and not p.is_flag and d not in (None, [], ()) and not callable(d):
            assert f"[default: {d}]" in flat, f"{name}: default of {p.opts[0]} ({d}) not shown whole"


def _command_tokens(paragraph: str) -> list[str]:
    """The words of one example, without continuation backslashes, comment lines and a
    trailing comment."""
    lines = [x for x in paragraph.split("\n") if not x.strip().startswith("#")]
    words = [w for w in " ".join(lines).split() if w != "\\"]
    return words[: words.index("#")] if "#" in words else words


def test_examples_in_help_are_the_docstring_commands():
    """Each example is one command, kept whole: joining its continuation lines gives back
    the docstring's command."""
    import inspect

    from cwa import cli

    for name, cmd in _commands().items():
        doc = inspect.getdoc(cmd.callback) or ""
        if "\nExamples:\n" not in doc:
            continue
        want = [_command_tokens(p) for p in re.split(r"\n\s*\n", doc.split("\nExamples:\n")[1]) if p.strip()]
        r = invoke([name, "--help"], env={"COLUMNS": "80"})
        body = re.split(r"\n(?:Options|Arguments):", r.stdout.split("Examples:")[1])[0]
        got = [_command_tokens(p) for p in re.split(r"\n\s*\n", body) if p.strip()]
        assert got == want, name
    assert cli._short_help(cli.run_cmd) == "Run the complete analysis and print the output directory."


def test_top_level_help_lists_every_command_whole():
    r = invoke(["--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    listing = r.stdout.split("Commands:")[1]
    assert "..." not in listing and "…" not in listing
    for name in _commands():
        assert re.search(rf"^  {name} ", listing, re.M), name


# -- options a method does not use; exact control names -----------------------------------


@pytest.mark.parametrize(
    "cmd, flags, needle",
    [
        (["perturb", "x.h5"], ["--perturb", "zero", "--perturb-prob", "0.5"], "--perturb-prob 0.5"),
        (["perturb", "x.h5"], ["--perturb-prob", "1.0"], "--perturb-prob 1.0"),  # explicit, at its default
        (["perturb", "x.h5"], ["--perturb", "gauss_noise", "--bit", "sign"], "--bit sign"),
        (["perturb", "x.h5"], ["--perturb", "zero", "--perturb-scale", "2"], "--perturb-scale 2.0"),
        (["perturb", "x.h5"], ["--perturb", "bit_flip", "--perturb-scale", "1"], "--perturb-scale 1.0"),
        (["run"], ["--perturb", "sign_flip", "--bit", "exponent_msb"], "--bit exponent_msb"),
        (["run"], ["--perturb", "none", "--perturb-prob", "0.5"], "--perturb-prob 0.5"),
        (["run"], ["--controls", "random,bottom"], "'random' is not a control. Did you mean: random_k?"),
        (["run"], ["--controls", "random_k,bottom"], "'bottom' is not a control"),
        (["run"], ["--controls", "random_k,,bottom_k"], "an empty name"),
        (["run"], ["--controls", "None"], "Did you mean: none?"),
        (["run"], ["--controls", "random_k,random_k"], "duplicates"),
    ],
)
def test_misused_options_are_usage_errors(tmp_path, cmd, flags, needle):
    r = invoke([*cmd, *flags, *(["--out-dir", tmp_path / "o"] if cmd == ["run"] else [])])
    assert_clean_error(r, 2, needle)
    assert not (tmp_path / "o").exists()


def test_options_a_method_uses_are_accepted(tmp_path):
    """Past the checks: perturb reaches its input (missing: exit 1), run its K check."""
    for flags in (["--perturb", "bit_flip", "--perturb-prob", "0.5", "--bit", "sign"],
                  ["--perturb", "gauss_noise", "--perturb-scale", "0.2"], ["--perturb", "zero"]):
        assert_clean_error(invoke(["perturb", tmp_path / "x.h5", *flags]), 1, "no such file")
    r = invoke(["run", "--controls", "random_k, bottom_k", "--perturb", "bit_flip", "--perturb-prob", "0.5",
                "--topk", "0", "--out-dir", tmp_path / "o"])
    assert_clean_error(r, 2, "--topk 0")


def test_unset_perturbation_options_get_their_defaults(monkeypatch, tmp_path):
    import cwa.pipeline

    seen = []
    monkeypatch.setattr(cwa.pipeline, "run", lambda cfg, argv=None: seen.append(cfg) or tmp_path)
    assert_ok(invoke(["run"]))
    assert_ok(invoke(["run", "--perturb", "bit_flip", "--perturb-prob", "0.25", "--bit", "3", "--controls", "none"]))
    a, b = seen
    assert (a.perturb_prob, a.bit, a.controls) == (1.0, "exponent_msb", ["random_k", "bottom_k"])
    assert (b.perturb_prob, b.bit, b.controls) == (0.25, "3", [])


def test_check_controls_takes_only_listed_names():
    from cwa.checks import check_controls
    from cwa.controls import CONTROLS
    from cwa.errors import UsageError

    assert check_controls("none") == []
    assert check_controls(",".join(CONTROLS.names())) == CONTROLS.names()
    for alias in ("random", "bottom", "", "RANDOM_K"):
        with pytest.raises(UsageError):
            check_controls(alias)


# -- pip freeze without pip ------------------------------------------------------------------


def test_pip_freeze_comes_from_importlib_metadata_without_a_subprocess(monkeypatch):
    from cwa import pipeline

    def no_subprocess(*a, **kw):
        raise AssertionError("pip freeze must not start a process")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    lines = pipeline._versions()["pip_freeze"]
    reqs = [line.split("  # ")[0] for line in lines]
    assert f"torch=={md.version('torch')}" in reqs
    assert f"typer=={md.version('typer')}" in reqs
    keys = [re.sub(r"[-_.]+", "-", r.split("==")[0]).lower() for r in reqs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9][\w.-]*==\S+", r) for r in reqs), reqs
    assert all(re.fullmatch(r".+  # \S.*", line) for line in lines if "#" in line)


# -- cwa info: models --------------------------------------------------------------------------


def _table(stdout: str) -> dict[str, list[str]]:
    """param -> [shape, numel, stored, scored] from `cwa info MODEL`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["param", "shape"]) + 2
    rows = {}
    for line in lines[start:]:
        if not re.match(r"  \S", line) or ": " in line:
            break
        cells = line.split()
        rows[cells[0]] = cells[1:] + [""] * (5 - len(cells))
    return rows


def _expect_listing(stdout: str, model_dir_or_lm, stored: str) -> None:
    from cwa.models import load_model

    lm = model_dir_or_lm if hasattr(model_dir_or_lm, "model") else load_model(str(model_dir_or_lm), device="cpu")
    rows = _table(stdout)
    params = dict(lm.model.named_parameters())
    assert list(rows) == list(params)
    for name, p in params.items():
        shape, numel, dtype, scored = rows[name][:4]
        assert shape == ("x".join(map(str, p.shape)) or "scalar") and int(numel) == p.numel(), name
        assert dtype == stored, (name, dtype)
        assert scored == ("yes" if p.ndim >= 2 else ""), name
    assert f"fingerprint: {lm.fingerprint}" in stdout


def test_info_lists_the_embedded_model_without_loading_its_weights(monkeypatch):
    import transformers

    from cwa.models import load_model

    lm = load_model(None, device="cpu")

    def refuse(*a, **kw):
        raise AssertionError("cwa info loaded the weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    r = invoke(["info", "embedded"])
    out = assert_ok(r)
    assert out.splitlines()[0] == "embedded  schema=model"
    _expect_listing(r.stdout, lm, "float32")
    assert "tied: lm_head.weight share transformer.wte.weight" in r.stdout


def test_info_lists_a_model_directory_with_its_stored_dtype(tmp_path):
    import torch

    from tests.integration.conftest import build_tiny

    d = build_tiny(tmp_path / "llama_bf16", "llama", tied=False, dtype=torch.bfloat16)
    r = invoke(["info", d])
    assert_ok(r)
    from cwa.models import load_model

    _expect_listing(r.stdout, load_model(str(d), device="cpu", dtype="float32"), "bfloat16")
    assert "stored dtypes: bfloat16 x" in r.stdout


def test_info_lists_a_gguf_file(tiny_llama, tmp_path):
    pytest.importorskip("gguf")
    from cwa.models import load_model
    from tests.integration.gguf_util import hf_llama_to_gguf

    g = hf_llama_to_gguf(tiny_llama, tmp_path / "tiny.gguf")
    r = invoke(["info", g])
    assert_ok(r)
    assert "source: gguf" in r.stdout
    _expect_listing(r.stdout, load_model(str(g), device="cpu", dtype="float32"), "float32")
    assert list(_table(r.stdout)) == list(_table(invoke(["info", tiny_llama]).stdout))


def test_info_reads_a_hub_model_from_the_cache_only(tiny_gpt2, hub_cache):
    from cwa.models import load_model
    from tests.integration.test_model_identity import COMMIT, make_hub_repo

    make_hub_repo(hub_cache, "org/tiny", Path(tiny_gpt2), refs=("main", "v1"))
    r = invoke(["info", "org/tiny", "--revision", "v1"])
    assert_ok(r)
    assert "source: hub cache" in r.stdout and f"commit: {COMMIT}" in r.stdout
    _expect_listing(r.stdout, load_model("org/tiny", device="cpu"), "float32")
    assert_clean_error(invoke(["info", "org/tiny", "--revision", "v2"]), 2, "--revision v2", "cached: main, v1")
    assert_clean_error(invoke(["info", "org/absent"]), 1, "org/absent", "local cache", "hf download org/absent")


def _hand_made_adapter(base: Path, out: Path, weights: str = "adapter_model.safetensors") -> Path:
    """A LoRA adapter directory as peft writes it (config and factor tensors), made without peft."""
    import torch
    from safetensors.torch import save_file

    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 2, "lora_alpha": 4,
         "target_modules": ["c_attn"], "fan_in_fan_out": True}))
    t = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.randn(2, 32),
         "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.randn(96, 2)}
    save_file(t, out / "adapter_model.safetensors")
    if weights != "adapter_model.safetensors":
        (out / "adapter_model.safetensors").rename(out / weights)
    return out


def test_info_describes_a_peft_adapter_as_what_model_loads(tmp_path, monkeypatch):
    """`cwa info ADAPTER_DIR` (accepted by --model everywhere) lists the base's parameters,
    names the base, and gives the fingerprint artifacts record for base plus adapter; it
    needs no peft and opens no pickle."""
    import torch

    from cwa import models as M
    from tests.integration.conftest import build_tiny

    base = build_tiny(tmp_path / "base", "gpt2")
    adapter = _hand_made_adapter(base, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "peft", None)  # not needed to describe it
    r = invoke(["info", adapter])
    out = assert_ok(r)
    assert out.splitlines()[0] == f"{adapter}  schema=model"
    assert "source: PEFT adapter on local directory" in out and f"base model: {base} ({base})" in out
    assert _table(out) == _table(invoke(["info", base]).stdout)  # the base's names, shapes, dtypes
    want = M.adapter_fingerprint(adapter, M.checkpoint_fingerprint(base), adapter / "adapter_model.safetensors")
    assert f"fingerprint: {want}" in out and want != M.checkpoint_fingerprint(base)
    assert "adapter: loaded, its update is merged" in out

    pk = _hand_made_adapter(base, tmp_path / "pk", weights="adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    out = assert_ok(invoke(["info", pk]))
    assert f"fingerprint: {M.adapter_fingerprint(pk, M.checkpoint_fingerprint(base), pk / 'adapter_model.bin')}" in out

    acfg = json.loads((adapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(acfg))
    assert_clean_error(invoke(["info", adapter]), 1, "its base model", "gone")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    r = invoke(["info", adapter])
    assert_clean_error(r, 1, "names no base model")
    assert "--model" not in r.stderr  # cwa info names its target, not an option it was not given


def test_info_describes_a_cached_hub_adapter_repository(tmp_path, hub_cache):
    from cwa import models as M
    from tests.integration.conftest import build_tiny
    from tests.integration.test_model_identity import COMMIT, make_hub_repo

    base = build_tiny(tmp_path / "base", "gpt2")
    local = _hand_made_adapter(base, tmp_path / "adapter")
    make_hub_repo(hub_cache, "org/lora", local)
    out = assert_ok(invoke(["info", "org/lora"]))
    assert "source: PEFT adapter on local directory" in out and f"commit: {COMMIT}" in out
    assert "base commit" not in out and _table(out) == _table(invoke(["info", base]).stdout)
    snap = M.hub_snapshot("org/lora", None)[1]
    want = M.adapter_fingerprint(snap, M.checkpoint_fingerprint(base), snap / "adapter_model.safetensors")
    assert f"fingerprint: {want}" in out and f"fingerprint: {want}" in assert_ok(invoke(["info", local]))


def test_info_fingerprint_of_an_adapter_is_the_loaded_one(tmp_path):
    pytest.importorskip("peft", reason="PEFT adapters need the 'peft' package (cwa[peft])")
    from cwa import models as M
    from tests.integration.conftest import build_tiny
    from tests.integration.test_hf_conventions import _adapter

    base = build_tiny(tmp_path / "base", "gpt2")
    adapter = _adapter(base, tmp_path / "adapter")
    out = assert_ok(invoke(["info", adapter]))
    assert f"fingerprint: {M.load_model(str(adapter), device='cpu', lazy=True).fingerprint}" in out


def test_info_refuses_what_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(invoke(["info", tmp_path / "empty"]), 1, "no config.json")
    assert_clean_error(invoke(["info", "embedded", "--revision", "main"]), 2, "--revision main", "hub ids only")
    assert_clean_error(invoke(["info", tmp_path / "gone.h5"]), 1, "gone.h5: no such file")
    from cwa.models import embedded_dir

    weights = embedded_dir() / "model.safetensors"
    assert_clean_error(invoke(["info", weights]), 1, "model's weights", f"cwa info {embedded_dir()}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".cwa-run").write_text("")
    (run_dir / "config.json").write_text("{}")
    assert_clean_error(invoke(["info", run_dir]), 2, "a cwa run output directory")


# -- cwa info: JSON reports of the embedded model -------------------------------------------


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """`cwa eval` and `cwa perturb --json` on the embedded model (tiny settings)."""
    d = tmp_path_factory.mktemp("reports")
    p = {k: d / v for k, v in [("eval", "eval.json"), ("scores", "s.safetensors"), ("topk", "t.h5"),
                                ("random", "r.h5"), ("perturb", "p.h5"), ("perturb_json", "pr.json")]}
    assert_ok(invoke(["eval", "--eval-samples", "2", "-o", p["eval"]]))
    assert_ok(invoke(["score", "--metric", "magnitude", "-o", p["scores"]]))
    assert_ok(invoke(["rank", p["scores"], "--topk", "5", "-o", p["topk"]]))
    assert_ok(invoke(["control", p["scores"], "--ref", p["topk"], "--control-draws", "2", "-o", p["random"]]))
    assert_ok(invoke(["perturb", p["topk"], p["random"], "--perturb", "zero", "--eval-samples", "2",
                      "--json", p["perturb_json"], "-o", p["perturb"]]))
    return p


def test_info_of_an_eval_report(reports):
    doc = json.loads(reports["eval"].read_text())
    r = invoke(["info", reports["eval"]])
    assert_ok(r)
    assert r.stdout.splitlines()[0] == f"{reports['eval']}  schema=eval (JSON)"
    assert f"model_fingerprint: {doc['model_fingerprint']}" in r.stdout
    assert re.search(rf"^  nll\s+{doc['nll']:.4g}$", r.stdout, re.M), r.stdout
    assert re.search(rf"^  n_tokens\s+{doc['n_tokens']}$", r.stdout, re.M)
    assert f"eval_windows: 2 windows {doc['eval_windows']}" in r.stdout


def test_info_of_perturbation_results_json(reports):
    doc = json.loads(reports["perturb_json"].read_text())
    r = invoke(["info", reports["perturb_json"]])
    assert_ok(r)
    assert "schema=perturbation results (JSON)" in r.stdout.splitlines()[0]
    rows = [line.split() for line in r.stdout.splitlines() if re.match(r"  (topk|random_k) ", line)]
    assert [(x[0], int(x[2])) for x in rows] == [(c["name"], c["draw"]) for c in doc["conditions"]]
    assert "method: zero" in r.stdout and f"{len(doc['conditions'])} conditions" in r.stdout
    assert f"summary random_k: mean {doc['summary']['random_k']['mean']:.4g}" in r.stdout


def test_info_of_a_broken_json_report(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text("{not json")
    assert_clean_error(invoke(["info", tmp_path / "a.json"]), 1, "a.json", "not an object")
    assert_clean_error(invoke(["info", tmp_path / "b.json"]), 1, "b.json", "not a readable JSON report")
