"""Scores at 8 B weights are 32 GB per seed: `cwa score` and `cwa run` compute what they
will write before any work and refuse, with the fix, when the target lacks the space."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from cwa import artifacts as A
from tests.integration.reliability_util import SEQ, assert_clean_error, assert_ok, invoke

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def text(tmp_path):
    from tests.integration.conftest import make_text

    p = tmp_path / "t.txt"
    p.write_text(make_text(2000, 5))
    return p


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda d: Usage(1 << 40, (1 << 40) - free, free))


def test_the_estimate_covers_the_file_it_writes(tiny_gpt2, text, tmp_path):
    from cwa.stages import DataOptions, ModelOptions, score_stage, scores_bytes

    lm = ModelOptions(model=str(tiny_gpt2), device="cpu").load()
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.safetensors"
        score_stage(lm, DataOptions(data=str(text), calib_samples=2, seq_len=int(SEQ)), metric="grad_x_weight",
                    score_dtype=dtype, output=out)
        need, size = scores_bytes(lm, None, None, dtype), out.stat().st_size
        assert size <= need <= size * 1.01 + (1 << 17), (dtype, need, size)


def test_score_refuses_before_any_work_when_space_is_short(tiny_gpt2, text, tmp_path, monkeypatch):
    _free(monkeypatch, 1000)
    out = tmp_path / "s.safetensors"
    r = invoke(["score", "--model", tiny_gpt2, "--data", text, "--seq-len", SEQ, "--calib-samples", "2", "-o", out])
    line = assert_clean_error(r, 1, "needs", "--score-dtype bfloat16", "free")
    assert str(out) in line and not out.exists() and list(tmp_path.iterdir()) == [text]


def test_run_counts_every_seed_still_to_score(tiny_gpt2, text, tmp_path, monkeypatch):
    from cwa.stages import ModelOptions, scores_bytes

    one = scores_bytes(ModelOptions(model=str(tiny_gpt2), device="cpu").load())
    _free(monkeypatch, 2 * one)  # room for two seeds of scores, not three
    args = ["run", "--model", tiny_gpt2, "--data", text, "--seq-len", SEQ, "--calib-samples", "2",
            "--eval-samples", "2", "--control-draws", "2", "--topk", "5", "--no-save-plots"]
    out = tmp_path / "run"
    assert_clean_error(invoke([*args, "--seeds", "0,1,2", "--out-dir", out]), 1, "3 seeds of scores", "fewer --seeds")
    assert not any((out / "artifacts").glob("*.safetensors"))
    assert_ok(invoke([*args, "--seeds", "0,1", "--out-dir", out]))
    # the two seeds on disk are not counted again: one more seed fits
    assert_ok(invoke([*args, "--seeds", "0,1,2", "--out-dir", out]))
    assert A.open_scores(out / "artifacts" / "scores_seed2.safetensors").seed == 2
