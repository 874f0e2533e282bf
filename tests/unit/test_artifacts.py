"""Artifacts round-trip with their metadata; corruption and interruption are clean errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cwa import artifacts as A
from cwa.errors import ArtifactError


def _scores(tmp_path, name="s.safetensors"):
    t = {"b.weight": torch.randn(3, 4), "a.weight": torch.randn(5)}
    meta = {"cwa.metric": "magnitude", "cwa.fingerprint": "fp1", "cwa.windows": [1, 2]}
    return A.write_scores(tmp_path / name, t, meta), t


def test_scores_round_trip_with_metadata_and_order(tmp_path):
    p, t = _scores(tmp_path)
    sc = A.open_scores(p)
    assert sc.names == ["b.weight", "a.weight"]  # param order, not safetensors' sorted order
    assert sc.metric == "magnitude" and sc.fingerprint == "fp1"
    assert sc.json_meta("cwa.windows") == [1, 2]
    assert sc.meta["cwa.schema"] == "scores/1" and "cwa.created" in sc.meta
    for n in t:
        assert torch.equal(sc.get(n), t[n])
        assert sc.shape(n) == tuple(t[n].shape)
    pieces = list(sc.chunks("b.weight", chunk_elems=4))
    assert len(pieces) == 3
    assert torch.equal(torch.cat([x for _, x in pieces]), t["b.weight"].reshape(-1))


def test_bfloat16_scores(tmp_path):
    t = {"w": torch.randn(4, 4)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {}, dtype="bfloat16")
    assert torch.equal(A.open_scores(p).get("w"), t["w"].bfloat16().float())


def test_corrupted_scores_tensor_is_detected(tmp_path):
    p, _ = _scores(tmp_path)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    sc = A.open_scores(p)
    with pytest.raises(ArtifactError, match="SHA-256"):
        for n in sc.names:
            sc.get(n)



@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_streamed_hash_check_detects_a_flipped_byte_in_any_piece(tmp_path, where):
    """`chunks()` hashes each piece on another thread while the consumer works (issue
    13): the pieces are the stored values, and a flipped byte in any piece still ends
    the stream with the SHA-256 error."""
    n = 3 * A.PIECE_ELEMS + 5
    t = {"w": torch.randn(n), "v": torch.randn(7)}
    p = A.write_scores(tmp_path / "big.safetensors", t, {"cwa.metric": "m", "cwa.fingerprint": "f"})
    sc = A.open_scores(p)
    got = torch.cat([c for _, c in sc.chunks("w")])
    assert torch.equal(got, t["w"])
    data = bytearray(p.read_bytes())
    start = len(data) - 4 * (n + 7)  # tensors sorted by name in the file: v, then w
    off = {"first": 4 * 7 + 2, "middle": 4 * (7 + 2 * A.PIECE_ELEMS) + 1, "last": 4 * (n + 7) - 2}[where]
    data[start + off] ^= 0x40
    p.write_bytes(bytes(data))
    sc = A.open_scores(p)
    with pytest.raises(ArtifactError, match="SHA-256"):
        for _ in sc.chunks("w"):
            pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mapped", [False, True])
def test_chunks_with_reuse_give_the_stored_values_and_check_the_hash(tmp_path, monkeypatch, dtype, mapped):
    """`reuse` (what ranking asks for): the same values as fresh pieces, from windows of
    a memory map (`mapped`) or two buffers read into in turn (no allocation per piece),
    hashed on the way the first time, and a flipped byte in the last window still ends
    the stream with the SHA-256 error."""
    monkeypatch.setattr(A, "PIECE_ELEMS", 64)
    monkeypatch.setattr(A, "MAP_BYTES", 512 if mapped else 0)  # 2 or 1 pieces per window
    n = 5 * 64 + 9
    t = {"w": torch.randn(n)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {}, dtype=dtype)
    want = t["w"].to(getattr(torch, dtype)).float()
    sc = A.open_scores(p)
    got, held = [], []
    for _, c in sc.chunks("w", reuse=True):  # first read: hashed meanwhile
        got.append(c.clone())
        held.append(c)  # held pieces cannot share memory unless the reader reuses it
    assert torch.equal(torch.cat(got), want)
    ptrs = [c.data_ptr() for c in held]
    if not mapped or dtype == "bfloat16":  # converted pieces: two float32 buffers in turn
        assert len(ptrs) == 6 and len(set(ptrs)) == 2 and ptrs[0::2] == [ptrs[0]] * 3
    fresh = [c for _, c in sc.chunks("w")]  # the default: pieces a consumer may keep
    assert len({c.data_ptr() for c in fresh}) == 6 and torch.equal(torch.cat(fresh), want)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        for _ in A.open_scores(p).chunks("w", reuse=True):
            pass


@pytest.mark.parametrize("reuse,map_bytes", [(True, 512), (True, 0), (False, 512)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_of_a_part_of_a_tensor(tmp_path, monkeypatch, reuse, map_bytes, dtype):
    """`chunks(start=, stop=)` (ranking's spans): pieces of exactly flat entries [start,
    stop), starting at ``start``, from mapped windows or reads alike; a part of a tensor
    not verified yet is refused (its hash needs the whole), and allowed once verified or
    without `verify`."""
    monkeypatch.setattr(A, "PIECE_ELEMS", 64)
    monkeypatch.setattr(A, "MAP_BYTES", map_bytes)
    t = {"w": torch.randn(5 * 64 + 9), "s": torch.randn(10)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {}, dtype=dtype)
    want = t["w"].to(getattr(torch, dtype)).float()
    sc = A.open_scores(p)
    with pytest.raises(ValueError, match="cannot be verified"):
        next(sc.chunks("w", reuse=reuse, start=64, stop=200))
    assert torch.equal(torch.cat([c.clone() for _, c in sc.chunks("w", reuse=reuse, start=64, stop=200, verify=False)]),
                       want[64:200])
    sc.verify()
    monkeypatch.setattr(sc, "get", None)  # a part is read alone, never the whole tensor
    for lo, hi in ((64, 200), (0, 64), (100, 100), (128, 1000), (3, 10), (320, 329)):
        starts, parts = [], []
        for s0, c in sc.chunks("w", reuse=reuse, start=lo, stop=hi):
            starts.append(s0)
            parts.append(c.clone())
        end = min(hi, want.numel())
        assert starts == list(range(lo, end, 64))
        assert torch.equal(torch.cat(parts) if parts else want[:0], want[lo:end])
    assert [c.numel() for _, c in sc.chunks("s", start=2, stop=7)] == [5]  # a small tensor
    assert [c.numel() for _, c in sc.chunks("s", start=0, stop=0)] == []


def _maps_of(path) -> int:
    """How many memory maps of `path` this process holds (Linux)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        return sum(line.rstrip("\n").endswith(real) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_mapped_chunks_unmap_each_window_and_never_write_the_file(tmp_path, monkeypatch):
    """Ranking reads a large file through windows of a memory map: the process holds
    at most two windows at a time (its resident set stays about two windows, however
    large the file), none once the pieces are gone, and a consumer that writes into a
    piece changes its own copy, never the file."""
    monkeypatch.setattr(A, "PIECE_ELEMS", 1024)
    monkeypatch.setattr(A, "MAP_BYTES", 8192)  # 2 pieces, 2 pages per window
    t = {"w": torch.randn(40 * 1024 + 3)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {})
    before = p.read_bytes()
    sc = A.open_scores(p)
    sc.verify()
    held_maps = []
    for start, c in sc.chunks("w", reuse=True):
        held_maps.append(_maps_of(p))
        assert torch.equal(c, t["w"][start : start + c.numel()])
        c.fill_(7.0)  # the consumer scribbles on its piece
    assert len(held_maps) == 41 and 1 <= max(held_maps) <= 2
    del c
    assert _maps_of(p) == 0
    assert p.read_bytes() == before
    assert torch.equal(A.open_scores(p).get("w"), t["w"])


@pytest.mark.parametrize("when", ["before", "during"])
def test_mapped_chunks_of_a_file_cut_short_after_opening_is_an_error(tmp_path, monkeypatch, when):
    """A scores file truncated after it was opened, before the read or while it goes on
    (by another program): a clean error before the next window is mapped (touching a map
    past the end of the file would end the process with SIGBUS)."""
    monkeypatch.setattr(A, "PIECE_ELEMS", 1024)
    monkeypatch.setattr(A, "MAP_BYTES", 8192)  # 2 pieces, 2 pages per window
    t = {"w": torch.randn(40 * 1024)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {})
    sc = A.open_scores(p)
    sc.verify()

    def cut():
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 4 * 20 * 1024)  # the second half of the tensor

    if when == "before":
        cut()
    seen = 0
    with pytest.raises(ArtifactError, match="truncated"):
        for _, c in sc.chunks("w", reuse=True):
            seen += c.numel()
            if when == "during" and seen == 4 * 1024:
                cut()
    assert seen == 20 * 1024  # the windows still in the file, then the error


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sample_runs_read_only_the_runs_asked_for(tmp_path, dtype):
    """A file's `sample_runs` (what ranking seeds its floor from) equals the same slices
    of the tensor, a run at the end is cut short, and an in-memory source agrees."""
    t = {"w": torch.randn(7, 53), "b": torch.randn(40)}
    p = A.write_scores(tmp_path / "s.safetensors", t, {}, dtype=dtype)
    want = t["w"].to(getattr(torch, dtype)).float().reshape(-1)
    starts = [0, 100, 250, 360]  # the last run: 11 of 16 entries left
    expect = torch.cat([want[s : s + 16] for s in starts])
    got = A.open_scores(p).sample_runs("w", starts, 16)
    assert got.dtype == torch.float32 and got.numel() == 3 * 16 + 11
    assert torch.equal(got, expect)
    mem = A.open_scores(p).tensors()
    assert torch.equal(A.Scores(mem, {}).sample_runs("w", starts, 16), expect)
    assert A.open_scores(p).sample_runs("w", [], 16).numel() == 0


def _no_hashing(monkeypatch):
    """Make any SHA-256 of scores data fail the test (the file must be trusted unread)."""

    def boom(*a, **k):
        raise AssertionError("hashed again")

    sha256 = A.hashlib.sha256

    def streamed_only(*a, **k):  # `verify` streams into `sha256()`; the memo hashes the header
        return sha256(*a, **k) if a else boom()

    monkeypatch.setattr(A, "_tensor_sha", boom)
    monkeypatch.setattr(A, "_HashBehind", boom)
    monkeypatch.setattr(A.hashlib, "sha256", streamed_only)


def test_a_verified_unchanged_scores_file_is_not_hashed_again(tmp_path, monkeypatch):
    """Issue 13: ranking the same scores again reads them once; the memo (in the test's
    CWA_CACHE_DIR) trusts a file verified in full while its stamp and hashes are the same."""
    monkeypatch.setattr(A.memo, "RACY_NS", 0)  # the file is seconds old, not 2 s
    p, t = _scores(tmp_path)
    sc = A.open_scores(p)
    assert sc._verified == set()  # never verified: hashed on first read
    sc.get("b.weight")
    assert not A._verified_memo_path().exists() or str(p.resolve()) not in A.memo.read_memo(A._verified_memo_path())
    sc.get("a.weight")  # now every tensor is verified: remembered
    entry = A.memo.read_memo(A._verified_memo_path())[os.path.realpath(p)]
    assert entry["stamp"] == A.memo.stamp(os.stat(p))
    with monkeypatch.context() as m:
        _no_hashing(m)
        again = A.open_scores(p)
        assert again._verified == set(t)
        assert torch.equal(torch.cat([c for _, c in again.chunks("b.weight", 4)]), t["b.weight"].reshape(-1))
        again.verify()  # a cache hit's check: nothing left to hash
        with pytest.raises(AssertionError, match="hashed again"):
            again.verify(force=True)


@pytest.mark.parametrize("how", ["rewrite", "rewrite-keep-mtime", "replace", "new-hashes"])
def test_a_changed_scores_file_is_hashed_again(tmp_path, monkeypatch, how):
    """Any change after the memo was written (in place, even with the mtime set back,
    or a file renamed over it) means a full check again, which finds the flipped byte."""
    monkeypatch.setattr(A.memo, "RACY_NS", 0)
    p, t = _scores(tmp_path)
    A.open_scores(p).verify()
    assert os.path.realpath(p) in A.memo.read_memo(A._verified_memo_path())
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    if how == "replace":
        (tmp_path / "other").write_bytes(bytes(data))
        os.replace(tmp_path / "other", p)
    elif how == "new-hashes":  # the memo's entry for the path, but other recorded hashes
        A.write_scores(tmp_path / "n.safetensors", {k: v + 1 for k, v in t.items()}, {})
        os.replace(tmp_path / "n.safetensors", p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        memo_path = A._verified_memo_path()
        entry = A.memo.read_memo(memo_path)[os.path.realpath(p)]
        entry["stamp"] = A.memo.stamp(os.stat(p))  # as if the stamp had not changed
        A.memo.write_memo(memo_path, os.path.realpath(p), entry)
        assert A.open_scores(p)._verified == set()
        return
    else:
        with open(p, "r+b") as f:
            f.write(bytes(data))
        if how == "rewrite-keep-mtime":
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert os.stat(p).st_mtime_ns == st.st_mtime_ns
    sc = A.open_scores(p)
    assert sc._verified == set()
    with pytest.raises(ArtifactError, match="SHA-256"):
        for n in sc.names:
            for _ in sc.chunks(n, 4):
                pass


def test_a_fresh_scores_file_is_not_remembered(tmp_path):
    """Within 2 s of its last change a file could change again unseen on a file system
    with coarse timestamps: it is verified, but not remembered, and so hashed next time."""
    p, _ = _scores(tmp_path)
    A.open_scores(p).verify()
    assert os.path.realpath(p) not in A.memo.read_memo(A._verified_memo_path())
    assert A.open_scores(p)._verified == set()


@pytest.mark.parametrize("cut", [4, 20, 60])
def test_truncated_scores_are_refused(tmp_path, cut):
    p, _ = _scores(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - cut] if cut < len(data) else data[:cut])
    with pytest.raises(ArtifactError):
        sc = A.open_scores(p)
        for n in sc.names:
            sc.get(n)


def test_not_an_artifact(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_text("hello world, I am not a safetensors file")
    with pytest.raises(ArtifactError):
        A.open_scores(p)
    with pytest.raises(ArtifactError, match="no such file"):
        A.open_scores(tmp_path / "missing.safetensors")


def test_h5_round_trip_and_integrity(tmp_path):
    arrays = {"x": np.arange(5), "g/y": np.ones((2, 2), np.float32), "names": np.array(["a", "b"], dtype=object)}
    p = A.write_h5(tmp_path / "r.h5", "perturbation/1", {"fingerprint": "f", "k": 3, "d": {"a": 1}}, arrays, doc={"v": [1.0, float("inf")]})
    art = A.read_h5(p, "perturbation/1")
    assert art.schema == "perturbation/1" and art.fingerprint == "f" and art.attrs["k"] == 3
    assert json.loads(art.attrs["d"]) == {"a": 1}
    assert art.doc == {"v": [1.0, "inf"]}
    np.testing.assert_array_equal(art.arrays["g/y"], arrays["g/y"])
    assert list(art.arrays["names"]) == ["a", "b"]
    with pytest.raises(ArtifactError, match="expected a selection/1"):
        A.read_h5(p, "selection/1")
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        A.read_h5(p)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), A.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    A.write_json(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": "nan"}
    assert os.listdir(tmp_path) == ["out.json"]


def test_json_safe_strict():
    s = A.dumps({"a": float("inf"), "b": -float("inf"), "c": np.float32(1.5), "d": np.arange(2)})
    assert json.loads(s) == {"a": "inf", "b": "-inf", "c": 1.5, "d": [0, 1]}


def test_stage_fingerprint_depends_on_every_part():
    a = A.stage_fingerprint("rank", scores="x", k=1)
    assert a == A.stage_fingerprint("rank", k=1, scores="x")
    assert a != A.stage_fingerprint("rank", scores="x", k=2)
    assert a != A.stage_fingerprint("control", scores="x", k=1)
