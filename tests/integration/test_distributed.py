"""Scoring past one process (torchrun, 2 ranks, gloo on the CPU) and the big-model options
(`--grad-checkpointing`, `--device-map`), each against the plain single-process result.

The 2-rank runs launch real processes: `torchrun --standalone --nproc-per-node 2 -m cwa
score ...` for the command path, and this file itself as a torchrun worker (the
`__main__` block below) that scores every metric in one process group, so the suite pays
for two launches, not one per metric. The worker shards strided, the command contiguously:
both must equal the single-process scores to float summation order (≤ 1e-4 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cwa import distributed
from cwa.metrics import METRICS, MetricOptions, compute_scores, select_params

# Few windows, an odd count (shards of 4 and 3) and a batch size that divides neither.
N_CALIB, SEQ_LEN, BATCH = 7, 16, 2
OPTS = {"seed": 3, "mc_samples": 2, "hutchinson_samples": 3}
RTOL = 1e-4


def _data(lm, data_dir):
    from cwa.stages import DataOptions

    return DataOptions(data=str(data_dir), calib_samples=N_CALIB, seq_len=SEQ_LEN, batch_size=BATCH)


def _score_all(model_dir, data_dir, out_dir, dist=None, metrics=None):
    """score_stage for every metric with one loaded model; {metric: StageResult}."""
    from cwa.stages import ModelOptions, score_stage

    lm = ModelOptions(model=str(model_dir), device="cpu").load(second_order=True)
    out = {}
    for m in metrics or sorted(METRICS.names()):
        out[m] = score_stage(
            lm, _data(lm, data_dir), metric=m, output=Path(out_dir) / f"{m}.safetensors",
            force=False, dist=dist, **OPTS,
        )
    return out


class _DrawLog:
    """Records every probe and label draw of `cwa.rng` (rademacher, uniform) as
    {key: SHA-256 of the values}, key = the call's purpose, indices, shape and offset."""

    def __init__(self):
        self.draws: dict[str, str] = {}

    def __enter__(self):
        import hashlib

        from cwa import rng

        self.saved = rng.rademacher, rng.uniform

        def wrap(fn, label):
            def draw(seed, purpose, *index, shape, offset=0, **kw):
                out = fn(seed, purpose, *index, shape=shape, offset=offset, **kw)
                key = f"{label}:{seed}:{purpose}:{index}:{tuple(out.shape)}:{offset}:{out.dtype}"
                self.draws[key] = hashlib.sha256(out.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                return out
            return draw

        rng.rademacher, rng.uniform = wrap(self.saved[0], "rademacher"), wrap(self.saved[1], "uniform")
        return self

    def __exit__(self, *exc):
        from cwa import rng

        rng.rademacher, rng.uniform = self.saved


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_same_scores(path, ref_path):
    from cwa import artifacts as A

    got, ref = A.open_scores(path), A.open_scores(ref_path)
    assert got.names == ref.names
    assert got.fingerprint == ref.fingerprint  # interchangeable with a single-process run
    assert got.meta["cwa.windows"] == ref.meta["cwa.windows"]
    for n in ref.names:
        err = _rel_err(got.get(n), ref.get(n))
        assert err <= RTOL, f"{ref.metric} {n}: relative error {err:.2e}"


def _torchrun(args, tmp_path, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CWA_DEBUG": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.integration.conftest import build_tiny, make_text

    root = tmp_path_factory.mktemp("dist")
    model = build_tiny(root / "model", "gpt2", tied=True)
    data = root / "docs"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i:02d}.txt").write_text(make_text(200, 300 + i))
    single = root / "single"
    with _DrawLog() as log:
        _score_all(model, data, single)
    (root / "single_draws.json").write_text(json.dumps(log.draws))
    return root, model, data, single


def test_two_ranks_gloo_every_metric_equals_single_process(setup, tmp_path):
    root, model, data, single = setup
    out = tmp_path / "ranks"
    r = _torchrun([__file__, str(model), str(data), str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    for m in sorted(METRICS.names()):
        _assert_same_scores(out / f"{m}.safetensors", single / f"{m}.safetensors")
        # rank 0 wrote, rank 1 returned the same path without writing
        assert reports[0]["first"][m] == reports[1]["first"][m] == str(out / f"{m}.safetensors")
    # the second pass over the same outputs is a cache hit on both ranks (rank 0 decides)
    assert all(rep["cached"] for rep in reports)
    # probes and labels: every draw a rank made is bit-identical to the single process's
    # draw of the same key (purpose, indices, shape, offset), and the ranks together made
    # exactly the single process's draws (labels: each window's on the rank that owns it)
    single_draws = json.loads((root / "single_draws.json").read_text())
    ranks = [rep["draws"] for rep in reports]
    assert any(k.startswith("rademacher") for k in single_draws)
    assert any(":label:" in k for k in single_draws)
    for draws in ranks:
        assert draws and all(single_draws.get(k) == v for k, v in draws.items())
    assert set(ranks[0]) | set(ranks[1]) == set(single_draws)
    labels = [{k for k in d if ":label:" in k} for d in ranks]
    assert labels[0] and labels[1] and not labels[0] & labels[1]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no stray temp file


def test_torchrun_cwa_score_prints_one_path_and_matches(setup, tmp_path):
    root, model, data, single = setup
    out = tmp_path / "h.safetensors"
    args = ["-m", "cwa", "score", "--model", str(model), "--data", str(data), "--metric", "hutchinson_diag",
            "--calib-samples", str(N_CALIB), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH),
            "--seed", str(OPTS["seed"]), "--hutchinson-samples", str(OPTS["hutchinson_samples"]),
            "--device", "cpu", "-o", str(out)]
    r = _torchrun(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == [str(out)]  # rank 0 only
    _assert_same_scores(out, single / "hutchinson_diag.safetensors")
    from cwa import artifacts as A

    assert A.open_scores(out).meta["cwa.world_size"] == "2"


# ---------------------------------------------------------------- sharding, in process


def test_shards_cover_every_window_once():
    for n in (0, 1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            for strategy in distributed.STRATEGIES:
                parts = [list(distributed.shard_positions(n, r, world, strategy)) for r in range(world)]
                assert sorted(sum(parts, [])) == list(range(n))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_dist_is_inert():
    d = distributed.Dist()
    assert not d.enabled and d.is_main and list(d.shard(5)) == list(range(5))
    t = torch.ones(3)
    d.all_reduce(t)
    assert torch.equal(t, torch.ones(3)) and d.broadcast_flag(True) is True
    with distributed.session("cpu") as s:  # no torchrun environment: nothing is opened
        assert not s.enabled and not torch.distributed.is_initialized()


# ---------------------------------------------------------------- big-model options


def _tiny_model(tmp_path, **kw):
    from transformers import AutoModelForCausalLM

    from tests.integration.conftest import build_tiny

    path = build_tiny(tmp_path / "m", "llama", tied=False, **kw)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _saved_bytes(model, ids, metric):
    """Bytes of the tensors autograd saves for the backward pass of one scoring run."""
    seen = {"n": 0}

    def pack(t):
        seen["n"] += t.numel() * t.element_size()
        return t

    params = select_params(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_scores(model, params, ids, None, metric, MetricOptions(hutchinson_samples=1))
    return seen["n"]


@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag"])
def test_grad_checkpointing_same_scores_less_saved(tmp_path, metric):
    model = _tiny_model(tmp_path)
    params = select_params(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    opts = MetricOptions(seed=1, mc_samples=2, hutchinson_samples=2)
    plain, _ = compute_scores(model, params, ids, None, metric, opts, batch_size=2)
    ckpt, _ = compute_scores(model, params, ids, None, metric, opts, batch_size=2, grad_checkpointing=True)
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), n  # the recomputation is exact (no dropout)
    # the wrappers are gone afterwards, and they did keep fewer activations
    assert not any("forward" in vars(m) for m in model.modules())
    if metric == "grad_x_weight":
        base = _saved_bytes(model, ids, metric)
        from cwa.metrics import checkpointed_blocks

        with checkpointed_blocks(model):
            less = _saved_bytes(model, ids, metric)
        assert less < base


def test_grad_checkpointing_on_a_model_without_blocks_is_a_usage_error():
    from cwa.errors import UsageError
    from cwa.metrics import checkpointed_blocks

    with pytest.raises(UsageError, match="no transformer blocks"), checkpointed_blocks(torch.nn.Linear(2, 2)):
        pass


def test_bf16_model_float32_accumulators(tmp_path):
    model = _tiny_model(tmp_path).to(torch.bfloat16)
    params = select_params(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for metric in ("grad_x_weight", "grad_squared", "hutchinson_diag"):
        scorer = METRICS.get(metric)(MetricOptions(hutchinson_samples=1))
        scorer.begin(model, params)
        assert all(a.dtype in (torch.float32, torch.float64) for a in scorer.acc.values())
        scores, _ = compute_scores(model, params, ids, None, metric, MetricOptions(hutchinson_samples=1),
                                   grad_checkpointing=True)
        assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in scores.values())


def test_device_map_scores_like_a_plain_load(tmp_path):
    """`--device-map auto` (on a CPU-only machine accelerate keeps everything on the CPU)
    and a model dispatched block by block with accelerate's hooks, as on several GPUs
    (inputs moved to each block's device, outputs back to the input's): the scores are
    those of a plain load."""
    accelerate = pytest.importorskip("accelerate")
    from cwa.models import load_model
    from tests.integration.conftest import build_tiny

    path = build_tiny(tmp_path / "m", "gpt2", tied=True)
    plain = load_model(str(path), device="cpu", second_order=True).model
    auto = load_model(str(path), device="cpu", device_map="auto", second_order=True).model
    hooked = load_model(str(path), device="cpu", second_order=True).model
    blocks = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0",
              "transformer.h.1", "transformer.ln_f", "lm_head"]
    hooked = accelerate.dispatch_model(hooked, device_map=dict.fromkeys(blocks, "cpu"),
                                       main_device="cpu", force_hooks=True)
    assert hasattr(hooked.transformer.h[0], "_hf_hook")
    ids = torch.randint(0, plain.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    opts = MetricOptions(hutchinson_samples=1, mc_samples=1)
    for metric in ("grad_x_weight", "grad_squared", "hessian_diag", "hutchinson_diag", "act_mag"):
        a, _ = compute_scores(plain, select_params(plain), ids, list(range(3)), metric, opts, batch_size=2)
        for other in (auto, hooked):
            b, _ = compute_scores(other, select_params(other), ids, list(range(3)), metric, opts, batch_size=2)
            assert a.keys() == b.keys()
            for n in a:
                assert _rel_err(b[n], a[n]) <= 1e-5, (metric, n)


def test_offloaded_parameters_are_refused(tmp_path):
    from cwa.errors import UsageError

    model = _tiny_model(tmp_path)
    params = select_params(model)
    name = next(iter(params))
    params[name] = torch.nn.Parameter(torch.empty(params[name].shape, device="meta"))
    model.get_submodule(name.rsplit(".", 1)[0]).weight = params[name]
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(UsageError, match="offloaded"):
        compute_scores(model, params, ids, None, "grad_x_weight")


# ---------------------------------------------------------------- torchrun worker


def _worker(model_dir: str, data_dir: str, out_dir: str) -> None:
    """Run under torchrun: every metric, strided shards; then again (cache hits)."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    with distributed.session("cpu", strategy="strided") as dist, _DrawLog() as log:
        assert dist.enabled and dist.world_size == 2 and dist.backend == "gloo"
        first = _score_all(model_dir, data_dir, out, dist=dist)
        draws = dict(log.draws)
        assert not any(r.cached for r in first.values())
        again = _score_all(model_dir, data_dir, out, dist=dist, metrics=["hutchinson_diag", "act_mag"])
        report = {
            "first": {m: str(r.path) for m, r in first.items()},
            "cached": all(r.cached for r in again.values()),
            "draws": draws,
        }
        (out / f"rank{dist.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":  # pragma: no cover - runs inside torchrun
    _worker(*sys.argv[1:4])
