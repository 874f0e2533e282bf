"""Corrupted artifacts: every command that reads scores or selections either rejects a
damaged file cleanly (exit 1 or 2, one stderr line, no exception escaping) or reads it
correctly (the same ranking, the same control, the same perturbation results) — never a
crash, never a silently different answer.

Two kinds of damage, each with a capped number of hypothesis examples:
- bytes: flips, insertions, deletions and truncations anywhere in a valid file (biased
  towards the header, where a parser can go wrong);
- content: files that are well-formed containers (a valid safetensors header, a sealed
  HDF5 file) whose cwa content is wrong: metadata, dtypes, shapes, datasets, attributes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.reliability_util import assert_ok, invoke

# CWA_FUZZ_EXAMPLES=N: N random examples per test instead of the suite's fixed few.
_HUNT = int(os.environ.get("CWA_FUZZ_EXAMPLES", "0"))


def _n(examples: int) -> int:
    return _HUNT or examples


FUZZ = settings(
    max_examples=_n(25),
    deadline=30_000,  # a hang is a failure
    derandomize=not _HUNT,  # the same examples on every run: a fast, stable suite
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, fast
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def ref(k):
    """What the valid files give: the ranking, the control, the perturbation, stability."""
    from cwa import artifacts as A

    d = k.root / "fuzz-ref"
    d.mkdir(exist_ok=True)
    out = {}
    assert_ok(invoke(["rank", k.scores, *_EVERY_SCORE, "-o", d / "all.h5"]))
    out["all"] = _entries(A.read_selection(d / "all.h5"))
    assert_ok(invoke(["stability", k.scores, k.scores1, "--topk", "10", "-o", d / "st.h5"]))
    out["jaccard"] = A.read_h5(d / "st.h5").doc["jaccard"]
    assert_ok(invoke(["control", k.scores, "--ref", k.topk, "--control-draws", "2", "-o", d / "rk.h5"]))
    out["control"] = _entries(A.read_selection(d / "rk.h5"))
    assert_ok(invoke(["perturb", k.topk, "--model", k.model, *k.data(), "--eval-samples", "2", "-o", d / "p.h5"]))
    out["perturb"] = A.read_h5(d / "p.h5").arrays["conditions/0/per_window_nll"]
    return out


# per_layer with K above every tensor's size: a ranking that holds every score, so any
# value read differently shows
_EVERY_SCORE = ["--mode", "per_layer", "--topk", "1000000"]


def _entries(sel) -> list[dict[str, list[tuple[int, float]]]]:
    """Each draw as {parameter name: [(flat index, score), ...] in rank order}: what was
    selected, independent of the parameter order a file declares."""
    out = []
    for d in sel.draws:
        by_name: dict[str, list[tuple[int, float]]] = {}
        for p, f, s in zip(d.param_index, d.flat_index, d.score, strict=True):
            by_name.setdefault(sel.params[int(p)], []).append((int(f), float(s)))
        out.append(by_name)
    return out


def _clean(r, codes=(0, 1), what="") -> None:
    escaped = r.exception is not None and not isinstance(r.exception, SystemExit)
    assert not escaped, f"{what}: exception escaped: {r.exception!r}\n{r.stderr}"
    assert r.exit_code in codes, f"{what}: exit {r.exit_code}: {r.stderr}"
    if r.exit_code:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: {r.stderr}"
        assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- byte damage


def _mutations(header_end: int):
    # (where, n): a byte of the header (where a parser can go wrong) or anywhere; n is
    # scattered over the file by _position (hypothesis favours small integers)
    pos = st.tuples(st.sampled_from(["header", "anywhere"]), st.integers(0, 1 << 32))
    one = st.one_of(
        st.tuples(st.just("xor"), pos, st.integers(1, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
    )
    return st.lists(one, min_size=1, max_size=3).map(lambda m: (header_end, m))


def _position(where: str, n: int, header_end: int, size: int) -> int:
    span = min(header_end, size) if where == "header" else size
    return (n * 2654435761) % max(1, span)  # Knuth's multiplicative hash


def _mutate(data: bytes, spec) -> bytes:
    header_end, muts = spec
    b = bytearray(data)
    for kind, (where, n), v in muts:
        p = _position(where, n, header_end, len(b))
        if kind == "xor" and b:
            b[p] ^= v
        elif kind == "insert":
            b[p:p] = v
        elif kind == "delete":
            del b[p : p + v]
        else:
            del b[p:]
    return bytes(b)


def _scores_header_end(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _check_scores(k, ref, f: Path, tmp: Path, what: str) -> None:
    from cwa import artifacts as A

    _clean(invoke(["info", f]), what=f"info {what}")
    r = invoke(["rank", f, *_EVERY_SCORE, "-o", tmp / "t.h5"])
    _clean(r, what=f"rank {what}")
    if r.exit_code == 0:
        assert _entries(A.read_selection(tmp / "t.h5")) == ref["all"], f"{what}: read differently"
    r = invoke(["stability", f, k.scores1, "--topk", "10", "-o", tmp / "s.h5"])
    _clean(r, what=f"stability {what}")
    if r.exit_code == 0:
        assert A.read_h5(tmp / "s.h5").doc["jaccard"] == ref["jaccard"], f"{what}: read differently"


def test_scores_with_damaged_bytes(k, ref):
    data = k.scores.read_bytes()

    @FUZZ
    @given(muts=_mutations(_scores_header_end(k.scores)))
    def check(muts):
        with tempfile.TemporaryDirectory() as t:
            f = Path(t) / "scores.safetensors"
            f.write_bytes(_mutate(data, muts))
            _check_scores(k, ref, f, Path(t), str(muts))

    check()


SELECTION_READERS = ("info", "control", "perturb", "plot", "stability")


def _check_selection(k, ref, f: Path, tmp: Path, what: str, codes=(0, 1), exact=True,
                     commands=SELECTION_READERS) -> None:
    from cwa import artifacts as A

    if "info" in commands:
        _clean(invoke(["info", f]), codes, f"info {what}")
    if "control" in commands:
        r = invoke(["control", k.scores, "--ref", f, "--control-draws", "2", "-o", tmp / "c.h5"])
        _clean(r, codes, f"control {what}")
        if r.exit_code == 0 and exact:
            assert _entries(A.read_selection(tmp / "c.h5")) == ref["control"], f"{what}: read differently"
    if "perturb" in commands:
        r = invoke(["perturb", f, "--model", k.model, *k.data(), "--eval-samples", "2", "-o", tmp / "p.h5"])
        _clean(r, codes, f"perturb {what}")
        if r.exit_code == 0 and exact:
            got = A.read_h5(tmp / "p.h5").arrays["conditions/0/per_window_nll"]
            assert np.array_equal(got, ref["perturb"]), f"{what}: read differently"
    if "plot" in commands:
        _clean(invoke(["plot", f, "-o", tmp / "figs"]), codes, f"plot {what}")
    if "stability" in commands:
        _clean(invoke(["stability", f, k.topk1, "-o", tmp / "s.h5"]), codes, f"stability {what}")


def test_selections_with_damaged_bytes(k, ref):
    data = k.topk.read_bytes()

    @settings(FUZZ, max_examples=_n(15))
    @given(muts=_mutations(1024))
    def check(muts):
        with tempfile.TemporaryDirectory() as t:
            f = Path(t) / "topk.h5"
            f.write_bytes(_mutate(data, muts))
            _check_selection(k, ref, f, Path(t), str(muts))

    check()


# --------------------------------------------------------------------------- content damage


def _rewrite_safetensors(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file with its JSON header changed by `edit(header)`."""
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


_TEXT = st.text(st.characters(exclude_characters="\x00"), max_size=12)  # HDF5 strings have no NUL
_ANY = st.one_of(
    _TEXT,
    st.integers(-(1 << 40), 1 << 40),
    st.sampled_from(["5", "[]", "{}", '"x"', "null", "[1, 2]", '{"a": 5}', "nan", "-1", "float16", "bfloat16"]),
)


@st.composite
def _header_edits(draw, names: list[str], meta_keys: list[str]):
    kind = draw(st.sampled_from(["meta", "drop-meta", "dtype", "shape", "offsets", "param-order"]))
    if kind == "meta":
        key = draw(st.sampled_from(meta_keys))
        val = draw(_ANY)
        return kind, key, val
    if kind == "drop-meta":
        return kind, draw(st.sampled_from(meta_keys)), None
    name = draw(st.sampled_from(names))
    if kind == "dtype":
        return kind, name, draw(st.sampled_from(["I32", "U32", "F16", "BF16", "F64", "I8", "BOOL", "X9"]))
    if kind == "shape":
        return kind, name, draw(st.sampled_from(["transpose", "flatten", "grow", "empty", "negative", "strings"]))
    if kind == "offsets":
        return kind, name, (draw(st.integers(-8, 1 << 20)), draw(st.integers(-8, 1 << 20)))
    return kind, None, draw(st.sampled_from(["reverse", "drop-one", "duplicate", "not-a-list"]))


def _apply_header_edit(header: dict, edit) -> None:
    kind, key, val = edit
    meta = header.setdefault("__metadata__", {})
    if kind == "meta":
        meta[key] = val
    elif kind == "drop-meta":
        meta.pop(key, None)
    elif kind == "dtype":
        header[key]["dtype"] = val
    elif kind == "shape":
        s = [int(x) for x in header[key]["shape"]] or [1]  # (an earlier edit may have made strings)
        header[key]["shape"] = {
            "transpose": s[::-1], "flatten": [int(np.prod(s))], "grow": [s[0] + 1, *s[1:]],
            "empty": [], "negative": [-1, *s[1:]], "strings": [str(x) for x in s],
        }[val]
    elif kind == "offsets":
        header[key]["data_offsets"] = list(val)
    else:
        order = json.loads(meta["cwa.param_order"])
        meta["cwa.param_order"] = json.dumps(
            {"reverse": order[::-1], "drop-one": order[1:], "duplicate": order + order[:1], "not-a-list": "x"}[val]
        )


def test_scores_with_damaged_content(k, ref):
    from cwa import artifacts as A

    sc = A.open_scores(k.scores)
    names, meta_keys = list(sc.names), sorted(sc.meta)

    @FUZZ
    @given(edits=st.lists(_header_edits(names, meta_keys), min_size=1, max_size=2))
    def check(edits):
        with tempfile.TemporaryDirectory() as t:
            f = Path(t) / "scores.safetensors"
            _rewrite_safetensors(k.scores, f, lambda h: [_apply_header_edit(h, e) for e in edits])
            _check_scores(k, ref, f, Path(t), str(edits))

    check()


@st.composite
def _selection_edits(draw, dataset_names: list[str], attr_names: list[str]):
    kind = draw(st.sampled_from(["drop-dataset", "dataset", "attr", "drop-attr"]))
    if kind in ("drop-dataset", "dataset"):
        name = draw(st.sampled_from(dataset_names))
        val = draw(
            st.one_of(
                st.lists(st.integers(-(1 << 40), 1 << 40), max_size=12).map(lambda x: np.array(x, dtype=np.int64)),
                st.lists(st.floats(allow_nan=True), max_size=12).map(lambda x: np.array(x, dtype=np.float64)),
                st.lists(_TEXT, min_size=1, max_size=4).map(lambda x: np.array(x, dtype=object)),
                st.just(np.zeros((2, 2), dtype=np.int32)),
                st.just(np.zeros(0, dtype=np.int32)),
                st.just("shift"),  # the right values, one past the end of their tensor
            )
        )
        return kind, name, val
    return kind, draw(st.sampled_from(attr_names)), draw(_ANY)


def _apply_selection_edits(arrays: dict, attrs: dict, edits) -> tuple[dict, dict]:
    a, m = dict(arrays), dict(attrs)
    for kind, key, val in edits:
        if kind == "drop-dataset":
            a.pop(key, None)
        elif kind == "dataset":
            if isinstance(val, str):  # "shift"
                val = np.asarray(a.get(key, np.zeros(1, np.int64)))
                if val.dtype.kind in "iu":
                    val = val + 10**6
            a[key] = val
        elif kind == "drop-attr":
            m.pop(key, None)
        else:
            m[key] = val
    return a, m


def _valid_selection_parts(k):
    from cwa import artifacts as A

    art = A.read_h5(k.topk)
    arrays, attrs = dict(art.arrays), dict(art.attrs)
    attrs.pop("cwa.version", None)
    attrs.pop("cwa.created", None)
    return art, arrays, attrs


def test_selections_with_damaged_content(k):
    """Sealed (hash-valid) selection files whose content is wrong are rejected cleanly —
    exit 1, or 2 where the content makes an impossible request — or read as written."""
    from cwa import artifacts as A

    art, arrays, attrs = _valid_selection_parts(k)

    @FUZZ
    @given(edits=st.lists(_selection_edits(sorted(arrays), sorted(attrs)), min_size=1, max_size=2))
    def check(edits):
        a, m = _apply_selection_edits(arrays, attrs, edits)
        with tempfile.TemporaryDirectory() as t:
            f = Path(t) / "topk.h5"
            A.write_h5(f, A.SELECTION_SCHEMA, m, a, doc=art.doc)
            _check_selection(k, None, f, Path(t), str(edits), codes=(0, 1, 2), exact=False,
                             commands=("info", "control", "perturb", "stability"))

    check()


@pytest.mark.parametrize(
    "edits",
    [
        [("dataset", "params", np.zeros(0, dtype=np.int64))],
        [("attr", "k", "ten")],
        [("dataset", "draws/0/param_index", "shift")],
        [("drop-dataset", "draws/0/flat_index", None)],
        [("attr", "info", "[1, 2]")],
    ],
    ids=["empty-params", "k-not-int", "param-index-out-of-range", "no-flat-index", "info-not-object"],
)
def test_plot_of_selections_with_damaged_content(k, edits, tmp_path):
    """The same contract for `cwa plot` (explicit cases: drawing figures is too slow to fuzz)."""
    from cwa import artifacts as A

    art, arrays, attrs = _valid_selection_parts(k)
    a, m = _apply_selection_edits(arrays, attrs, edits)
    f = tmp_path / "topk.h5"
    A.write_h5(f, A.SELECTION_SCHEMA, m, a, doc=art.doc)
    _check_selection(k, None, f, tmp_path, str(edits), codes=(1,), exact=False, commands=("plot",))


def test_fuzz_inputs_are_valid_to_begin_with(k, ref, tmp_path):
    """The unmutated files pass every check: the harness itself is sound."""
    _check_scores(k, ref, k.scores, tmp_path, "valid scores")
    _check_selection(k, ref, k.topk, tmp_path, "valid selection")
