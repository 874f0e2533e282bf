"""Model identity and loading (`cwa.models`): the fingerprint covers every byte of the
weights (memoized per file, hub blobs by name), `--revision` resolves to one commit,
loading is strict, and pickle checkpoints are refused unless allowed.

The edits below are placed where the first, sampled fingerprint (64 reads of 8 bytes per
tensor; a GGUF's first MiB plus 4096 reads of 8 bytes) did not look, so these tests fail
on it: `_old_sampled_bytes` reproduces its read pattern only to place the edits.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cwa import models as M
from cwa.errors import CwaError, UsageError
from tests.integration import conftest as C

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _own_hash_memo(tmp_path, monkeypatch):
    """Every test gets its own (empty) memo of file hashes."""
    monkeypatch.setenv("CWA_CACHE_DIR", str(tmp_path / "cwa-cache"))


@pytest.fixture
def hash_reads(monkeypatch):
    """The real paths whose content `cwa.models` reads to hash, in order."""
    reads: list[str] = []
    real = M._sha256_of_file

    def counting(path):
        reads.append(os.path.realpath(path))
        return real(path)

    monkeypatch.setattr(M, "_sha256_of_file", counting)
    return reads


def _age(*paths, seconds: float = 3600) -> None:
    """Date files an hour back: a file is memoized only once it is older than 2 s."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _copy(src, dst) -> Path:
    return Path(shutil.copytree(src, dst))


def _old_sampled_bytes(nbytes: int) -> set[int]:
    """Byte offsets (within one tensor) that the first fingerprint read."""
    step = max(1, nbytes // 64)
    return {o + i for o in list(range(0, nbytes, step))[:64] for i in range(8)}


def _zero_top_weights(model_dir: Path, name: str, n: int) -> list[int]:
    """Zero the n largest-|w| entries of tensor `name` among those the sampled fingerprint
    never read, and save the checkpoint again (as an edited copy is saved); return them."""
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    t = sd[name]
    size = t.element_size()
    seen = _old_sampled_bytes(t.numel() * size)
    flat = t.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True).tolist()
    idx = [i for i in order if not any(b in seen for b in range(i * size, (i + 1) * size))][:n]
    flat[idx] = 0
    sd[name] = flat.reshape(t.shape)
    save_file(sd, f, metadata={"format": "pt"})
    return idx


def _edit_state(model_dir: Path, edit) -> None:
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _rewrite_header(path: Path, edit) -> None:
    """Edit a safetensors header in place, keeping the data bytes."""
    b = path.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    edit(header)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b[8 + n:])


def make_hub_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, refs=("main",),
                  blob_names: dict[str, str] | None = None) -> Path:
    """Lay `src`'s files out as the HF hub cache does: `blobs/<name>` (the SHA-256 for LFS
    files, a 40-hex git id for the others), `snapshots/<commit>/<file>` relative symlinks to
    them, and `refs/<ref>` holding the commit. `blob_names` overrides a file's blob name."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes()
        lfs = f.suffix in (".safetensors", ".bin", ".gguf")
        name = (blob_names or {}).get(f.name) or (
            hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest())
        (repo / "blobs" / name).write_bytes(data)
        (snap / f.name).symlink_to(f"../../blobs/{name}")
    for r in refs:
        (repo / "refs" / r).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / r).write_text(commit)
    return repo


def _fp(path, **kw) -> str:
    return M.load_model(str(path), device="cpu", lazy=True, **kw).fingerprint


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


# --------------------------------------------------------------------------- 1. fingerprint


def test_fingerprint_changes_when_a_few_weights_are_zeroed(tiny_gpt2, tmp_path):
    orig = _fp(tiny_gpt2)
    same = _copy(tiny_gpt2, tmp_path / "same")
    assert _fp(same) == orig  # where the files are does not matter, only their content
    edited = _copy(tiny_gpt2, tmp_path / "edited")
    _zero_top_weights(edited, "transformer.h.1.mlp.c_proj.weight", 3)
    assert _fp(edited) != orig


def test_fingerprint_ignores_the_load_dtype_but_not_the_stored_dtype(tiny_gpt2, tmp_path):
    lm32 = M.load_model(str(tiny_gpt2), device="cpu", dtype="float32", lazy=True)
    lm16 = M.load_model(str(tiny_gpt2), device="cpu", dtype="bfloat16", lazy=True)
    assert lm32.fingerprint == lm16.fingerprint and lm16.dtype == "bfloat16"
    bf16 = C.build_tiny(tmp_path / "bf16", "gpt2", dtype=torch.bfloat16)
    assert _fp(bf16) != lm32.fingerprint


def test_fingerprint_covers_config_json(tiny_gpt2, tmp_path):
    d = _copy(tiny_gpt2, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-3  # the same weights, run differently
    (d / "config.json").write_text(json.dumps(cfg))
    assert _fp(d) != _fp(tiny_gpt2)


def test_file_hashes_are_memoized_by_path_size_mtime_inode(tiny_gpt2, tmp_path, hash_reads):
    d = _copy(tiny_gpt2, tmp_path / "m")
    weights, cfg = (d / "model.safetensors").resolve(), (d / "config.json").resolve()
    _age(weights, cfg)
    first = M.checkpoint_fingerprint(d)
    assert sorted(hash_reads) == sorted([str(weights), str(cfg)])
    assert M.hash_cache_path() == tmp_path / "cwa-cache" / "file_sha256.json"
    assert M.hash_cache_path().is_file()

    hash_reads.clear()
    assert M.checkpoint_fingerprint(d) == first and hash_reads == []  # nothing read again

    _age(weights, seconds=7200)  # touched: same bytes, another mtime
    assert M.checkpoint_fingerprint(d) == first and hash_reads == [str(weights)]

    hash_reads.clear()
    cfg.write_text(cfg.read_text() + "\n")  # another size
    _age(cfg)
    assert M.checkpoint_fingerprint(d) != first and hash_reads == [str(cfg)]


def test_a_file_written_just_now_is_not_memoized(tiny_gpt2, tmp_path, hash_reads):
    """Coarse file-system timestamps could hide a rewrite in the same tick; such a file is
    hashed again until it is older than 2 s."""
    d = _copy(tiny_gpt2, tmp_path / "fresh")
    weights = str((d / "model.safetensors").resolve())
    for _ in range(2):
        os.utime(weights)  # "just now", however long the copy took on a loaded machine
        M.checkpoint_fingerprint(d)
    assert hash_reads.count(weights) == 2


@pytest.mark.parametrize("memo", ["corrupt", "wrong-types", "unwritable"])
def test_a_bad_hash_memo_is_ignored_silently(tiny_gpt2, tmp_path, monkeypatch, memo):
    d = _copy(tiny_gpt2, tmp_path / "m")
    _age(*d.iterdir())
    expected = M.checkpoint_fingerprint(d)
    cache = tmp_path / f"memo-{memo}"
    if memo == "unwritable":  # the cache "directory" is a file: nothing can be written under it
        cache.write_text("not a directory")
        monkeypatch.setenv("CWA_CACHE_DIR", str(cache))
    else:
        monkeypatch.setenv("CWA_CACHE_DIR", str(cache))
        cache.mkdir()
        body = b"\x00{{not json" if memo == "corrupt" else json.dumps(
            {"version": 1, "files": {str((d / "model.safetensors").resolve()): {"size": "x", "sha256": 5}}}).encode()
        (cache / "file_sha256.json").write_bytes(body)
    assert M.checkpoint_fingerprint(d) == expected
    assert M.checkpoint_fingerprint(d) == expected
    if memo != "unwritable":
        assert json.loads((cache / "file_sha256.json").read_text())["version"] == 1  # rewritten whole
    assert not [p for p in tmp_path.rglob(".file_sha256.*")]  # no stray temporary file


def test_sha256_streams_the_full_content(tmp_path):
    f = tmp_path / "blob.bin"
    data = os.urandom((M._READ_SIZE * 2) + 12345)  # more than one read, and a partial last one
    f.write_bytes(data)
    assert M.file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_loaded_parameter_fallback_hashes_every_byte(tiny_gpt2):
    model = M.load_model(str(tiny_gpt2), device="cpu").model
    before = M.model_fingerprint(model)
    with torch.no_grad():
        p = model.transformer.h[0].mlp.c_fc.weight
        p.view(-1)[5] += 1e-3  # one unsampled entry
    assert M.model_fingerprint(model) != before
    assert M.model_fingerprint(model, commit=COMMIT) != M.model_fingerprint(model)


def test_gguf_fingerprint_sees_an_edit_in_the_middle(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.integration.gguf_util import hf_llama_to_gguf

    hf = tmp_path / "llama"
    tok = C.make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    (tmp_path / "a").mkdir()
    path = hf_llama_to_gguf(hf, tmp_path / "a" / "tiny.gguf")
    data = bytearray(path.read_bytes())
    size = len(data)
    assert size > 2 << 20  # past the first MiB, which the sampled fingerprint read whole
    step = size // 4096
    seen = {o + i for o in range(1 << 20, size, step) for i in range(8)}
    off = next(o for o in range(size // 2, size, 4) if not any(o + i in seen for i in range(4)))
    data[off:off + 4] = struct.pack("<f", struct.unpack("<f", bytes(data[off:off + 4]))[0] + 1.0)
    edited = tmp_path / "b" / "tiny.gguf"
    edited.parent.mkdir()
    edited.write_bytes(bytes(data))
    copy = tmp_path / "c" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)

    orig = M.load_model(str(path), device="cpu", lazy=True)
    assert orig.fingerprint == M.gguf_fingerprint(copy)
    assert M.gguf_fingerprint(edited) != orig.fingerprint


def test_cli_eval_of_an_edited_copy_is_not_a_cache_hit(tmp_path, monkeypatch):
    """The reported bug: the embedded model with its top weights zeroed and saved again got
    the original's fingerprint, so `cwa eval` returned the original's cached result."""
    from cwa.cli import app

    monkeypatch.chdir(tmp_path)
    orig = _copy(M.embedded_dir(), tmp_path / "orig")
    edited = _copy(M.embedded_dir(), tmp_path / "edited")
    _zero_top_weights(edited, "transformer.h.0.mlp.c_proj.weight", 50)
    args = ["eval", "--eval-samples", "2", "--seq-len", "32", "--device", "cpu"]
    r1 = runner.invoke(app, args + ["--model", str(orig)])
    assert r1.exit_code == 0, (r1.stdout, r1.stderr)
    r2 = runner.invoke(app, args + ["--model", str(edited)])
    assert r2.exit_code == 0, (r2.stdout, r2.stderr)
    p1, p2 = Path(r1.stdout.strip()), Path(r2.stdout.strip())
    assert p1 != p2  # another fingerprint, so another default output: no cache hit
    a, b = json.loads(p1.read_text()), json.loads(p2.read_text())
    assert a["model_fingerprint"] != b["model_fingerprint"]
    assert a["eval_windows"] == b["eval_windows"] and a["nll"] != b["nll"]


def test_models_module_does_not_import_torch():
    code = "import sys, cwa.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------- hub cache, 2. revision


def test_hub_model_loads_offline_by_id_and_hashes_nothing(tiny_gpt2, hub_cache, hash_reads):
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2, refs=("main", "v1.0"))
    lm = M.load_model("org/tiny", device="cpu")
    assert lm.source == "hub" and lm.commit == COMMIT and lm.revision is None
    assert lm.info()["commit"] == COMMIT and lm.fingerprint
    # only config.json (a small git blob, not named by a SHA-256) was read, never the weights
    config_blob = os.path.realpath(hub_cache / "models--org--tiny" / "snapshots" / COMMIT / "config.json")
    assert hash_reads == [config_blob]
    local = M.load_model(str(tiny_gpt2), device="cpu")
    for k, v in _state(local).items():
        assert torch.equal(lm.model.state_dict()[k], v), k


def test_hub_fingerprint_is_the_blob_name_not_a_read(tiny_gpt2, hub_cache, hash_reads):
    """A blob named by a valid-looking SHA-256 that is not its content's: the fingerprint is
    computed from the name (no read), so the same bytes under two names fingerprint apart,
    and the same name with the same header fingerprints alike."""
    fake = "ab" * 32
    make_hub_repo(hub_cache, "org/a", tiny_gpt2)
    make_hub_repo(hub_cache, "org/b", tiny_gpt2, blob_names={"model.safetensors": fake})
    make_hub_repo(hub_cache, "org/c", tiny_gpt2, blob_names={"model.safetensors": fake})
    fa, fb, fc = (M.load_model(r, device="cpu", lazy=True).fingerprint for r in ("org/a", "org/b", "org/c"))
    assert fb != fa and fb == fc
    assert not any(p.endswith(fake) or p.endswith(".safetensors") for p in hash_reads)
    real = hashlib.sha256((tiny_gpt2 / "model.safetensors").read_bytes()).hexdigest()
    assert not any(p.endswith(real) for p in hash_reads)


def test_branch_tag_and_commit_are_one_model(tiny_gpt2, hub_cache, tmp_path):
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2, refs=("main", "v1.0"))
    edited = _copy(tiny_gpt2, tmp_path / "edited")
    _zero_top_weights(edited, "transformer.h.1.mlp.c_proj.weight", 3)
    make_hub_repo(hub_cache, "org/tiny", edited, commit=COMMIT2, refs=("edits",))
    lms = {r: M.load_model("org/tiny", revision=r, device="cpu", lazy=True)
           for r in (None, "main", "v1.0", COMMIT, "edits", COMMIT2)}
    assert {lms[r].commit for r in (None, "main", "v1.0", COMMIT)} == {COMMIT}
    assert len({lms[r].fingerprint for r in (None, "main", "v1.0", COMMIT)}) == 1
    assert lms["edits"].commit == COMMIT2 and lms["edits"].fingerprint == lms[COMMIT2].fingerprint
    assert lms["edits"].fingerprint != lms["main"].fingerprint
    assert lms["v1.0"].revision == "v1.0" and lms["v1.0"].info()["commit"] == COMMIT
    w = "transformer.h.1.mlp.c_proj.weight"  # each revision loads its own commit's weights
    assert not torch.equal(lms["edits"].model.state_dict()[w], lms["v1.0"].model.state_dict()[w])


def test_hub_commit_is_part_of_the_fingerprint(tiny_gpt2, hub_cache):
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2, refs=("main",))
    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2, commit=COMMIT2, refs=("readme-edit",))
    a = M.load_model("org/tiny", device="cpu", lazy=True)
    b = M.load_model("org/tiny", revision="readme-edit", device="cpu", lazy=True)
    assert a.fingerprint != b.fingerprint


def test_unknown_revision_is_a_usage_error(tiny_gpt2, hub_cache):
    from cwa.cli import app

    make_hub_repo(hub_cache, "org/tiny", tiny_gpt2, refs=("main", "v1.0"))
    with pytest.raises(UsageError) as e:
        M.load_model("org/tiny", revision="v9.9", device="cpu", lazy=True)
    msg = str(e.value)
    assert "--revision v9.9" in msg and "org/tiny" in msg and "main, v1.0" in msg and "\n" not in msg
    r = runner.invoke(app, ["eval", "--model", "org/tiny", "--revision", "v9.9", "--device", "cpu"])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "v9.9" in lines[0] and r.stdout == ""


def test_uncached_hub_model_offline_is_one_clear_error(hub_cache):
    with pytest.raises(CwaError) as e:
        M.load_model("org/absent", device="cpu", lazy=True)
    assert not isinstance(e.value, UsageError)
    assert "org/absent" in str(e.value) and "not available offline" in str(e.value)


def test_revision_with_a_local_model_is_a_usage_error(tiny_gpt2, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    for model in (str(tiny_gpt2), None, "embedded", str(tmp_path / "x.gguf")):
        with pytest.raises(UsageError, match="--revision applies to hub ids only"):
            M.load_model(model, revision="main", device="cpu", lazy=True)


# --------------------------------------------------------------------------- 3. strict loading


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False)])
def test_clean_checkpoints_load_strictly(tmp_path, arch, tied):
    d = C.build_tiny(tmp_path / "m", arch, tied=tied)
    lm = M.load_model(str(d), device="cpu")
    sd = load_file(d / "model.safetensors")
    for k, v in sd.items():
        assert torch.equal(lm.model.state_dict()[k], v), k


def test_embedded_model_loads_strictly():
    lm = M.load_model(device="cpu")
    assert lm.source == "embedded" and lm.commit is None and lm.info()["commit"] is None


def _refused(d: Path) -> str:
    with pytest.raises(CwaError) as e:
        M.load_model(str(d), device="cpu")
    assert not isinstance(e.value, UsageError)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--model {d}:")
    return msg


def test_a_missing_tensor_is_an_error_naming_it(tiny_gpt2, tmp_path):
    d = _copy(tiny_gpt2, tmp_path / "missing")
    _edit_state(d, lambda sd: sd.pop("transformer.h.0.mlp.c_fc.weight"))
    msg = _refused(d)
    assert "missing 1 weight(s)" in msg and "transformer.h.0.mlp.c_fc.weight" in msg
    assert "randomly initialised" in msg


def test_many_missing_tensors_are_counted(tiny_llama, tmp_path):
    d = _copy(tiny_llama, tmp_path / "missing")
    _edit_state(d, lambda sd: [sd.pop(k) for k in list(sd) if ".mlp." in k])
    msg = _refused(d)
    assert "missing 6 weight(s)" in msg and "and 3 more" in msg


def test_an_extra_tensor_is_an_error_naming_it(tiny_gpt2, tmp_path):
    d = _copy(tiny_gpt2, tmp_path / "extra")
    _edit_state(d, lambda sd: sd.__setitem__("transformer.h.0.mlp.gate.weight", torch.zeros(4, 4)))
    msg = _refused(d)
    assert "1 weight(s)" in msg and "transformer.h.0.mlp.gate.weight" in msg


def test_a_shape_changed_in_the_header_is_an_error_not_a_crash(tiny_gpt2, tmp_path):
    d = _copy(tiny_gpt2, tmp_path / "shape")
    name = "transformer.h.0.mlp.c_fc.weight"

    def transpose(h):
        h[name]["shape"] = h[name]["shape"][::-1]  # same size: still a valid file

    _rewrite_header(d / "model.safetensors", transpose)
    msg = _refused(d)
    assert name in msg and "[128, 32]" in msg and "[32, 128]" in msg


# --------------------------------------------------------------------------- 4. pickle checkpoints


def _pickle_only(src: Path, dst: Path, extra=None) -> Path:
    d = _copy(src, dst)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    if extra is not None:
        sd["evil"] = extra
    torch.save(sd, d / "pytorch_model.bin")
    return d


class _Marker:
    """Unpickling this writes a file: proof that a pickle ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_pickle_only_checkpoint_is_refused_without_allow_pickle(tiny_gpt2, tmp_path, monkeypatch):
    d = _pickle_only(tiny_gpt2, tmp_path / "pkl")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(UsageError) as e:
        M.load_model(str(d), device="cpu", lazy=True)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "--allow-pickle" in msg and "safe_serialization=True" in msg
    assert msg.startswith(f"--model {d}:") and "\n" not in msg


def test_allow_pickle_loads_tensors_only(tiny_gpt2, tmp_path):
    d = _pickle_only(tiny_gpt2, tmp_path / "pkl")
    _age(d / "pytorch_model.bin")
    lm = M.load_model(str(d), device="cpu", allow_pickle=True)
    ref = load_file(tiny_gpt2 / "model.safetensors")
    for k, v in ref.items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    assert lm.fingerprint == M.checkpoint_fingerprint(d)  # the .bin file's content, hashed
    e = _pickle_only(tiny_gpt2, tmp_path / "pkl-edited")
    sd = torch.load(e / "pytorch_model.bin", weights_only=True)
    sd["transformer.h.1.mlp.c_proj.weight"].view(-1)[7] = 0.0
    torch.save(sd, e / "pytorch_model.bin")
    assert _fp(e, allow_pickle=True) != lm.fingerprint


def test_allow_pickle_still_refuses_objects_that_are_not_tensors(tiny_gpt2, tmp_path):
    marker = tmp_path / "pwned"
    d = _pickle_only(tiny_gpt2, tmp_path / "evil", extra=_Marker(marker))
    with pytest.raises(CwaError, match="not plain tensors"):
        M.load_model(str(d), device="cpu", allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_beside_safetensors_is_never_opened(tiny_gpt2, tmp_path, monkeypatch, allow_pickle):
    d = _copy(tiny_gpt2, tmp_path / "both")
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    lm = M.load_model(str(d), device="cpu", allow_pickle=allow_pickle)
    assert lm.fingerprint == _fp(tiny_gpt2)  # the unused pickle is not part of the model


def test_pickle_only_hub_snapshot_is_refused(tiny_gpt2, hub_cache, tmp_path):
    d = _pickle_only(tiny_gpt2, tmp_path / "pkl")
    make_hub_repo(hub_cache, "org/old", d)
    with pytest.raises(UsageError, match="pytorch_model.bin.*--allow-pickle"):
        M.load_model("org/old", device="cpu", lazy=True)
    lm = M.load_model("org/old", device="cpu", allow_pickle=True)
    assert lm.commit == COMMIT and lm.model is not None


@pytest.mark.parametrize("size", [0, 1, (64 << 20) + 3])
def test_file_hash_is_the_sha256_of_every_byte(tmp_path, size):
    """The memory-mapped hash (and the streamed fallback for an empty file) against
    hashlib over the bytes read whole, across a 64 MiB update boundary."""
    import hashlib
    import os

    from cwa.models import _sha256_of_file

    p = tmp_path / "w.bin"
    data = os.urandom(size)
    p.write_bytes(data)
    assert _sha256_of_file(str(p)) == hashlib.sha256(data).hexdigest()
