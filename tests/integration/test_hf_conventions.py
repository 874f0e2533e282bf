"""Hugging Face conventions (issue 15): a cached hub model loads without a request and an
uncached one fails at once when the hub cannot be reached; load errors name their real
cause; `--dtype auto` is the checkpoint's dtype; PEFT adapter directories load merged into
their base; `hf:NAME:CONFIG:SPLIT` with slices, `save_to_disk` directories, `.jsonl.gz` /
`.json.gz` files and `--text-field`; the libraries' own progress bars stay off stderr.

Nothing here touches the network: hub caches are laid out in tmp directories, and "no
network" is an unreachable `HF_ENDPOINT` (http://127.0.0.1:9, connection refused).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cwa import models as M
from cwa.cli import app
from cwa.data import parse_hf_spec, prepare_data, read_documents
from cwa.errors import CwaError, UsageError
from tests.integration import conftest as C
from tests.integration.test_model_identity import COMMIT, make_hub_repo

runner = CliRunner()
ROOT = Path(__file__).parents[2]
UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own hash memo; verbosity reset (a --verbose invocation sets it process-wide)."""
    from cwa.console import set_verbose

    monkeypatch.setenv("CWA_CACHE_DIR", str(tmp_path / "cwa-cache"))
    yield
    set_verbose(False)


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


def _text_file(path: Path, n_words: int = 2000, seed: int = 3) -> Path:
    path.write_text(C.make_text(n_words, seed))
    return path


def _no_network_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=UNREACHABLE, PYTHONPATH=str(ROOT), CWA_DEBUG="0")
    return env


# --------------------------------------------------------------------------- 1. hub: cache first, fail fast

_SCENARIOS = textwrap.dedent("""
    import json, socket, sys, time
    requests = []  # every connection attempt, whatever HTTP client the hub library uses
    connect = socket.socket.connect
    def counting(self, address):
        requests.append(f"{address[0]}:{address[1]}")
        return connect(self, address)
    socket.socket.connect = counting
    from cwa import models as M
    from cwa.data import read_documents
    from cwa.errors import CwaError
    import transformers  # imported before the clock starts
    try:
        import datasets
    except ImportError:
        datasets = None
    out = {}
    t = time.perf_counter()
    lm = M.load_model("org/tiny", device="cpu")
    out["cached"] = {"s": time.perf_counter() - t, "requests": list(requests), "commit": lm.commit,
                     "n": sum(p.numel() for p in lm.model.parameters())}
    calls = [("model", lambda: M.load_model("org/absent", device="cpu"))]
    if datasets is not None:
        calls.append(("data", lambda: read_documents("hf:org/absent-data")))
    for key, call in calls:
        requests.clear()
        t = time.perf_counter()
        try:
            call()
            out[key] = {"error": None}
        except CwaError as e:
            out[key] = {"s": time.perf_counter() - t, "error": str(e), "requests": list(requests)}
    print(json.dumps(out))
""")


def test_no_network_cached_hub_model_loads_without_a_request_and_uncached_fails_fast(tiny_gpt2, tmp_path):
    """Without HF_HUB_OFFLINE and without a network: the cached model loads with no request
    at all (it used to retry HEAD requests for 50 s-3 min), an uncached model or dataset
    fails without retries, in well under a second, with one line."""
    home = tmp_path / "hf"
    make_hub_repo(home / "hub", "org/tiny", tiny_gpt2)
    r = subprocess.run([sys.executable, "-c", _SCENARIOS], env=_no_network_env(home), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cached"]["requests"] == [] and out["cached"]["commit"] == COMMIT and out["cached"]["n"] > 0
    for key in [k for k in ("model", "data") if k in out]:
        got = out[key]
        assert got["error"] and "\n" not in got["error"], got
        assert "cannot be reached" in got["error"] and UNREACHABLE in got["error"], got
        # the HEAD, and huggingface_hub's own once-per-process fetch of its "agent harnesses"
        # registry while it builds request headers; never a retry
        assert set(got["requests"]) == {"127.0.0.1:9"} and len(got["requests"]) <= 2, got
        assert got["s"] < 5, got  # one refused connection, no retries (they took 30 s-3 min)
    assert "hf download org/absent" in out["model"]["error"]
    assert "Retrying" not in r.stderr and "127.0.0.1" not in r.stderr, r.stderr


def test_no_network_uncached_hub_model_on_the_cli_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cwa", "eval", "--model", "org/absent", "--device", "cpu"],
                       env=_no_network_env(tmp_path / "hf"), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "org/absent" in lines[0] and "cannot be reached" in lines[0], r.stderr
    assert r.stdout == ""


def test_complete_snapshot_is_read_as_a_local_directory(tiny_gpt2, hub_cache, monkeypatch):
    """Offline or not, a snapshot with config, tokenizer and weights is read from its folder
    (no hub call at all); one without its weights is not complete."""
    import huggingface_hub.constants as hc
    import transformers.utils.hub as th

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # "online", but nothing may be asked
    monkeypatch.setattr(M, "hub_check", lambda *a, **k: pytest.fail("the hub was asked about a cached model"))
    monkeypatch.setattr(th, "hf_hub_download", lambda *a, **k: pytest.fail("hf_hub_download was called"))
    repo = make_hub_repo(hub_cache, "org/tiny", tiny_gpt2)
    snap = repo / "snapshots" / COMMIT
    assert M.snapshot_complete(snap)
    lm = M.load_model("org/tiny", device="cpu")
    assert lm.source == "hub" and lm.commit == COMMIT and lm.loaded
    (snap / "model.safetensors").unlink()
    assert not M.snapshot_complete(snap)


# --------------------------------------------------------------------------- 2. load errors say their cause


def test_bad_device_map_is_a_usage_error_without_the_offline_hint(tiny_gpt2, hub_cache):
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2)
    with pytest.raises(UsageError) as e:
        M.load_model("org/tiny", device="cpu", device_map="everywhere", lazy=True)
    msg = str(e.value)
    assert "--device-map 'everywhere'" in msg and "auto" in msg and "offline" not in msg and "\n" not in msg


def test_missing_accelerate_is_named_not_blamed_on_the_network(tiny_gpt2, hub_cache, monkeypatch):
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate -> ImportError
    r = runner.invoke(app, ["score", "--model", "org/tiny", "--device", "cpu", "--device-map", "auto",
                            "--metric", "magnitude"])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "accelerate" in lines[0] and "offline" not in lines[0], r.stderr


def test_other_hub_load_errors_name_their_cause_not_the_cache(tiny_gpt2, hub_cache, tmp_path):
    broken = Path(shutil.copytree(tiny_gpt2, tmp_path / "broken"))
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "no_such_architecture"
    (broken / "config.json").write_text(json.dumps(cfg))
    make_hub_repo(hub_cache, "org/broken", broken)
    with pytest.raises(CwaError) as e:
        M.load_model("org/broken", device="cpu", lazy=True)
    msg = str(e.value)
    assert "no_such_architecture" in msg and "offline" not in msg and "huggingface-cli" not in msg
    # a file the cache lacks, offline, still gets the hint (with today's `hf` command)
    partial = Path(shutil.copytree(tiny_gpt2, tmp_path / "partial"))
    (partial / "model.safetensors").unlink()
    make_hub_repo(hub_cache, "org/partial", partial)
    with pytest.raises(CwaError) as e:
        M.load_model("org/partial", device="cpu")
    assert "not available offline" in str(e.value) and "hf download org/partial" in str(e.value)


# --------------------------------------------------------------------------- 3. --dtype auto


def _checkpoint(tmp_path, name, dtype, drop_config_dtype=False) -> Path:
    d = C.build_tiny(tmp_path / name, "gpt2", dtype=dtype)
    if drop_config_dtype:
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "stored,drop,expected",
    [
        (torch.float32, False, "float32"),
        (torch.bfloat16, False, "bfloat16"),  # transformers' auto: the checkpoint's dtype, on CPU too
        (torch.bfloat16, True, "bfloat16"),  # no dtype in config.json: the weights' dtype
        (torch.float16, False, "float32"),  # the one CPU exception, documented
    ],
)
def test_dtype_auto_is_the_checkpoints_dtype(tmp_path, stored, drop, expected):
    from transformers import AutoModelForCausalLM

    d = _checkpoint(tmp_path, "m", stored, drop)
    lm = M.load_model(str(d), device="cpu")
    assert lm.dtype == expected
    assert {p.dtype for p in lm.model.parameters()} == {getattr(torch, expected)}
    assert M.planned_dtype(str(d), None, "auto", "cpu") == expected  # `cwa run`'s early check agrees
    if stored != torch.float16:  # the same as transformers' own dtype="auto"
        ref = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
        assert str(ref.dtype).removeprefix("torch.") == expected
    assert M.resolve_dtype("auto", "cuda", "float16")[0] == "float16"  # only the CPU upcasts
    assert M.load_model(str(d), device="cpu", dtype="float32", lazy=True).fingerprint == lm.fingerprint


def test_bf16_on_a_cpu_without_bf16_instructions_is_noted(tmp_path, monkeypatch):
    """Said once, as the work starts (a refusal after loading stays one line: test_refusals)."""
    d = _checkpoint(tmp_path, "m", torch.bfloat16, False)
    data = _text_file(tmp_path / "d.txt")
    real = M.cpu_has_bf16
    for has, noted in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(M, "cpu_has_bf16", lambda has=has: has)
        for dtype in ("auto", "float32"):  # never for float32
            r = runner.invoke(app, ["eval", "--model", str(d), "--eval-data", str(data), "--seq-len", "16",
                                    "--eval-samples", "2", "--device", "cpu", "--dtype", dtype, "--force"])
            assert r.exit_code == 0, r.stderr
            want = noted and dtype == "auto"
            assert r.stderr.count("note: bfloat16 on a CPU without bfloat16 instructions") == want, (has, dtype, r.stderr)
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"
    assert real(x86) is False
    assert real(x86.replace("avx512f", "avx512f avx512_bf16")) is True
    assert real(x86.replace("avx512f", "amx_bf16 amx_tile")) is True
    assert real("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n") is True  # Arm
    assert real("") is None


def test_stage_fingerprints_include_the_load_dtype(tmp_path, monkeypatch):
    """The same model in another dtype gives other numbers: never a cache hit of the other
    (artifacts of old `auto` runs are not reused under the new meaning)."""
    monkeypatch.chdir(tmp_path)
    d = _checkpoint(tmp_path, "m", torch.float32)
    data = _text_file(tmp_path / "d.txt")
    base = ["eval", "--model", str(d), "--eval-data", str(data), "--seq-len", "16", "--eval-samples", "2",
            "--device", "cpu"]
    paths = {}
    for dt in ("float32", "bfloat16", "auto"):
        r = runner.invoke(app, [*base, "--dtype", dt])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        paths[dt] = Path(r.stdout.strip())
    assert paths["float32"] != paths["bfloat16"] and paths["auto"] == paths["float32"]
    a, b = (json.loads(paths[k].read_text()) for k in ("float32", "bfloat16"))
    assert a["model_fingerprint"] == b["model_fingerprint"] and (a["dtype"], b["dtype"]) == ("float32", "bfloat16")


# --------------------------------------------------------------------------- 4. PEFT adapters

def _adapter(base: Path, out: Path, scale_b: float = 1.0) -> Path:
    pytest.importorskip("peft", reason="PEFT adapters need the 'peft' package (cwa[peft])")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False)  # random B: the adapter changes the model
    get_peft_model(m, cfg).save_pretrained(out)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base)
    if scale_b != 1.0:
        f = out / "adapter_model.safetensors"
        sd = load_file(f)
        save_file({k: v * scale_b if "lora_B" in k else v for k, v in sd.items()}, f, metadata={"format": "pt"})
    return out


def test_peft_adapter_loads_merged_and_fingerprints_base_plus_adapter(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="PEFT adapters need the 'peft' package (cwa[peft])")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    base = C.build_tiny(tmp_path / "base", "gpt2")
    adapter = _adapter(base, tmp_path / "adapter")
    data = _text_file(tmp_path / "d.txt")
    run = ["eval", "--eval-data", str(data), "--seq-len", "16", "--eval-samples", "2", "--device", "cpu"]
    ra = runner.invoke(app, [*run, "--model", str(adapter)])
    rb = runner.invoke(app, [*run, "--model", str(base)])
    assert ra.exit_code == 0 and rb.exit_code == 0, (ra.stderr, rb.stderr)
    ea, eb = json.loads(Path(ra.stdout.strip()).read_text()), json.loads(Path(rb.stdout.strip()).read_text())
    assert ea["model_fingerprint"] != eb["model_fingerprint"] and ea["nll"] != eb["nll"]
    assert ea["eval_windows"] == eb["eval_windows"]

    lm = M.load_model(str(adapter), device="cpu")
    assert lm.source == "peft" and lm.name == str(adapter) and lm.fingerprint == ea["model_fingerprint"]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    want, got = ref.state_dict(), lm.model.state_dict()
    assert set(got) == set(want)  # the base's parameter names: no lora_A / lora_B
    assert all(torch.equal(got[k], want[k]) for k in want)
    plain = M.load_model(str(base), device="cpu").model.state_dict()
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(got[w], plain[w])  # merged: W + scale * (B A)

    bigger = _adapter(base, tmp_path / "adapter2", scale_b=2.0)
    assert M.load_model(str(bigger), device="cpu", lazy=True).fingerprint not in (lm.fingerprint, eb["model_fingerprint"])
    copy = Path(shutil.copytree(adapter, tmp_path / "copy"))
    assert M.load_model(str(copy), device="cpu", lazy=True).fingerprint == lm.fingerprint  # content, not place


def test_cached_hub_adapter_repository_loads_like_its_directory(tmp_path, hub_cache):
    pytest.importorskip("peft", reason="PEFT adapters need the 'peft' package (cwa[peft])")
    base = C.build_tiny(tmp_path / "base", "gpt2")
    adapter = _adapter(base, tmp_path / "adapter")
    make_hub_repo(hub_cache, "org/lora", adapter)
    hub = M.load_model("org/lora", device="cpu")
    local = M.load_model(str(adapter), device="cpu")
    assert hub.source == "peft" and hub.name == "org/lora" and hub.fingerprint == local.fingerprint
    w = "transformer.h.1.mlp.c_fc.weight"
    assert torch.equal(hub.model.state_dict()[w], local.model.state_dict()[w])


def test_peft_adapter_refusals_are_one_line(tmp_path, monkeypatch):
    pytest.importorskip("peft", reason="PEFT adapters need the 'peft' package (cwa[peft])")
    base = C.build_tiny(tmp_path / "base", "gpt2")
    adapter = _adapter(base, tmp_path / "adapter")
    # an adapter of GPT-2's c_attn on a Llama base: nothing to attach to
    llama = C.build_tiny(tmp_path / "llama", "llama")
    wrong = Path(shutil.copytree(adapter, tmp_path / "wrong"))
    acfg = json.loads((wrong / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(llama)
    (wrong / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(CwaError) as e:
        M.load_model(str(wrong), device="cpu")
    assert str(wrong) in str(e.value) and "adapter" in str(e.value) and "\n" not in str(e.value)
    # the base is missing
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (wrong / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(CwaError, match="its base model .*gone"):
        M.load_model(str(wrong), device="cpu", lazy=True)
    # a pickle-only adapter is refused unless --allow-pickle (and never opened)
    pk = Path(shutil.copytree(adapter, tmp_path / "pk"))
    (pk / "adapter_model.safetensors").rename(pk / "adapter_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(UsageError, match="--allow-pickle"):
        M.load_model(str(pk), device="cpu", lazy=True)
    # without peft installed
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(CwaError, match=r"cwa\[peft\]"):
        M.load_model(str(adapter), device="cpu", lazy=True)


# --------------------------------------------------------------------------- 5. data


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("hf:wikitext:wikitext-2-raw-v1:test[:5%]", ("wikitext", "wikitext-2-raw-v1", "test[:5%]")),
        ("hf:org/name", ("org/name", None, "train")),
        ("hf:org/name::validation[10:20]", ("org/name", None, "validation[10:20]")),
        ("hf:c4:en:train[:1000]+validation[:10]", ("c4", "en", "train[:1000]+validation[:10]")),
    ],
)
def test_hf_spec_keeps_the_colons_of_a_split_slice(spec, expected):
    assert parse_hf_spec(spec) == expected


def test_hf_spec_with_too_many_parts_is_a_usage_error():
    with pytest.raises(UsageError, match="hf:NAME"):
        parse_hf_spec("hf:a:b:c:d")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="hf: data needs the 'datasets' package (cwa[datasets])")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return datasets


DOCS = [f"document {i}: " + C.make_text(40, i) for i in range(20)]


def test_local_hf_dataset_with_config_split_and_slice(datasets_cache, tmp_path):
    d = tmp_path / "local"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    assert read_documents(f"hf:{d}", "body") == DOCS
    assert read_documents(f"hf:{d}::train[:25%]", "body") == DOCS[:5]
    assert read_documents(f"hf:{d}::train[3:7]", "body") == DOCS[3:7]
    with pytest.raises(UsageError) as e:
        read_documents(f"hf:{d}::train[:25%]")  # no 'text' column
    assert "'text'" in str(e.value) and "body" in str(e.value) and "--text-field" in str(e.value)


def test_save_to_disk_directories(datasets_cache, tmp_path):
    ds = datasets_cache
    ds.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "one"))
    ds.DatasetDict({"train": ds.Dataset.from_dict({"text": DOCS[:12]}),
                    "test": ds.Dataset.from_dict({"text": DOCS[12:]})}).save_to_disk(str(tmp_path / "dict"))
    assert read_documents(str(tmp_path / "one"), "body") == DOCS
    assert read_documents(f"hf:{tmp_path / 'one'}::train[:3]", "body") == DOCS[:3]
    assert read_documents(str(tmp_path / "dict")) == DOCS[:12]  # a DatasetDict: its train split
    assert read_documents(f"hf:{tmp_path / 'dict'}::test[:50%]") == DOCS[12:16]
    with pytest.raises(UsageError, match="no split 'dev'.*train, test"):
        read_documents(f"hf:{tmp_path / 'dict'}::dev")


def test_gzipped_json_lines_as_c4_ships_them(tmp_path):
    lines = "".join(json.dumps({"text": t, "url": f"u{i}", "timestamp": "2019"}) + "\n" for i, t in enumerate(DOCS))
    for name in ("c4-train.00000-of-01024.json.gz", "shard.jsonl.gz"):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(lines)
        assert read_documents(str(tmp_path / name)) == DOCS
        assert read_documents(str(tmp_path / name), "url") == [f"u{i}" for i in range(20)]
    (tmp_path / "cut.json.gz").write_bytes((tmp_path / "shard.jsonl.gz").read_bytes()[:40])
    with pytest.raises(UsageError) as e:
        read_documents(str(tmp_path / "cut.json.gz"))
    assert "gzip" in str(e.value) and "\n" not in str(e.value)


def test_text_field_reads_another_field_and_keys_the_data_fingerprint(tiny_gpt2, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tok, cfg = AutoTokenizer.from_pretrained(tiny_gpt2), AutoConfig.from_pretrained(tiny_gpt2)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    b.write_text("".join(json.dumps({"content": t}) + "\n" for t in DOCS))
    kw = {"seq_len": 16, "calib_samples": 4, "eval_samples": 2}
    with pytest.raises(UsageError, match="no string 'text' field.*content.*--text-field"):
        prepare_data(tok, cfg, data=str(b), **kw)
    pa = prepare_data(tok, cfg, data=str(a), **kw)
    pb = prepare_data(tok, cfg, data=str(b), text_field="content", **kw)
    assert torch.equal(pa.calibration.ids, pb.calibration.ids)  # the same text, read from another field
    assert pa.calibration.fingerprint != pb.calibration.fingerprint  # ... is another input by name
    assert pa.evaluation.fingerprint != pb.evaluation.fingerprint
    with pytest.raises(UsageError, match="--text-field content: .*has no fields"):
        prepare_data(tok, cfg, data=str(_text_file(tmp_path / "t.txt")), text_field="content", **kw)


@pytest.mark.parametrize("command", ["score", "eval", "perturb", "run"])
def test_every_command_that_reads_text_has_text_field(command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--text-field" in r.stdout


def test_text_field_on_the_cli_chain(tiny_gpt2, tmp_path):
    """score (calibration data), perturb (evaluation data) and run pass --text-field on."""
    data = tmp_path / "c.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"content": C.make_text(300, i)}) + "\n" for i in range(12)))
    common = ["--model", str(tiny_gpt2), "--device", "cpu", "--seq-len", "16"]
    r = runner.invoke(app, ["score", *common, "--data", str(data), "--text-field", "content", "--calib-samples", "2",
                            "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["rank", str(tmp_path / "s.safetensors"), "--topk", "5", "-o", str(tmp_path / "t.h5")])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["perturb", str(tmp_path / "t.h5"), *common, "--eval-data", str(data), "--text-field",
                            "content", "--eval-samples", "2", "--perturb", "zero", "-o", str(tmp_path / "p.h5")])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["run", *common, "--data", str(data), "--text-field", "nope", "--calib-samples", "2",
                            "--seeds", "0", "--topk", "5", "--perturb", "none", "--controls", "none",
                            "--no-save-plots", "--out-dir", str(tmp_path / "out")])
    assert r.exit_code == 2 and "'nope'" in r.stderr and len(_lines(r.stderr)) == 1, r.stderr


# --------------------------------------------------------------------------- 6. progress bars


def test_gguf_dequantizing_bar_only_with_verbose(tmp_path):
    pytest.importorskip("gguf", reason="GGUF needs the 'gguf' package (cwa[gguf])")
    from tests.integration.gguf_util import hf_llama_to_gguf

    hf = C.build_tiny(tmp_path / "llama", "llama", tied=False)
    (tmp_path / "g").mkdir()
    g = hf_llama_to_gguf(hf, tmp_path / "g" / "tiny.gguf")
    data = _text_file(tmp_path / "d.txt")
    args = ["eval", "--model", str(g), "--eval-data", str(data), "--seq-len", "16", "--eval-samples", "1",
            "--device", "cpu", "--force"]
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "a.json")])
    loud = runner.invoke(app, [*args, "-o", str(tmp_path / "b.json"), "--verbose"])
    assert quiet.exit_code == 0 and loud.exit_code == 0, (quiet.stderr, loud.stderr)
    assert "de-quantizing" not in quiet.stderr and quiet.stderr.strip() == ""
    assert "de-quantizing" in loud.stderr


def test_datasets_generating_split_bar_only_with_verbose(tiny_gpt2, datasets_cache, tmp_path, monkeypatch):
    d = tmp_path / "local"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"text": C.make_text(300, i)}) + "\n" for i in range(4)))
    args = ["eval", "--model", str(tiny_gpt2), "--eval-data", f"hf:{d}", "--seq-len", "16", "--eval-samples", "1",
            "--device", "cpu", "--force"]
    out = {}
    for name, extra in (("quiet", []), ("loud", ["--verbose"])):
        monkeypatch.setattr(datasets_cache.config, "HF_DATASETS_CACHE", str(tmp_path / f"cache-{name}"))
        r = runner.invoke(app, [*args, "-o", str(tmp_path / f"{name}.json"), *extra])
        assert r.exit_code == 0, r.stderr
        out[name] = r.stderr
    assert "Generating train split" not in out["quiet"] and out["quiet"].strip() == ""
    assert "Generating train split" in out["loud"]
