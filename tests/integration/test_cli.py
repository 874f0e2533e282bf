"""The command line: help text, the stdout contract, one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cwa.cli import app

COMMANDS = ["score", "rank", "control", "perturb", "stability", "superweights", "plot", "eval", "info", "run",
            "compare"]


def test_the_command_list_is_every_registered_command():
    assert sorted(c.name for c in app.registered_commands) == sorted(COMMANDS)
runner = CliRunner()


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_examples(cmd):
    r = runner.invoke(app, [cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Examples" in r.stdout and "cwa " + cmd in r.stdout


def test_top_level_help_is_fast_and_does_not_import_torch():
    code = "import sys; from cwa.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    r = subprocess.run([sys.executable, "-m", "cwa", "--help"], capture_output=True, text=True, check=True)
    assert "score" in r.stdout and "run" in r.stdout


def test_eval_on_a_tiny_model_prints_only_the_path(tiny_gpt2, tmp_path):
    data = tmp_path / "d.txt"
    from tests.integration.conftest import make_text

    data.write_text(make_text(3000, 7))
    out = tmp_path / "e.json"
    args = ["eval", "--model", str(tiny_gpt2), "--data", str(data), "--seq-len", "16", "--eval-samples", "3", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    doc = json.loads(out.read_text())
    for k in ("nll", "perplexity", "token_accuracy", "bits_per_byte", "n_tokens"):
        assert k in doc
    assert doc["n_tokens"] == 3 * 15
    # a second run is a cache hit and prints the same path
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and r2.stdout.strip() == str(out)


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["score", "--metric", "grad_x_weigth"], 2, "Did you mean: grad_x_weight"),
        (["rank", "missing.safetensors", "--topk", "5"], 1, "no such file"),
        (["eval", "--model", "/nonexistent/model/dir/xyz", "--eval-samples", "1"], 1, "cannot load"),
        (["eval", "--dtype", "float8"], 2, "--dtype"),
        (["eval", "--device", "tpu"], 2, "--device"),
    ],
)
def test_errors_are_one_line_with_exit_code(args, code, needle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
