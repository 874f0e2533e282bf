"""report.html of `cwa run` and `cwa compare`: one self-contained file (every figure a
data URI that decodes to the PNG the run wrote, at the size the page declares; nothing
fetched), the tables of perturbation_results.json and sensitivity_stats.json against
those files, the manifest's essentials, escaping, the headline on stderr; and, marked
slow, the page rendered by headless chromium: every image loaded, nothing overflowing."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shlex
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cwa
from cwa.cli import app
from cwa.comparison import read_run
from cwa.report import headline, write_run_report
from tests.integration.test_compare import build_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_gpt2, tiny_llama, text_docs):
    return build_runs(tmp_path_factory.getbasetemp(), tiny_gpt2, tiny_llama, text_docs[0])


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_cmp") / "ab"
    cwa.compare([runs["a"], runs["b"], runs["c"]]).save(out)
    return out


class Page(HTMLParser):
    """The parts of a page the tests read: tags, images, tables by class, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.heads: dict[str, list[str]] = {}
        self.text: list[str] = []
        self.metas: list[dict[str, str]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_head = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "meta":
            self.metas.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            (self.heads.setdefault(self._table, []).extend(self._row) if self._in_head
             else self.tables[self._table].append(self._row))
            self._row = None
        elif tag == "thead":
            self._in_head = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def column(self, table: str, name: str) -> list[str]:
        i = self.heads[table].index(name)
        return [r[i] for r in self.tables[table]]


def _decoded(img: dict[str, str]) -> bytes:
    src = img["src"]
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1], validate=True)


def check_self_contained(text: str) -> Page:
    page = Page(text)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    csp = [m["content"] for m in page.metas if m.get("http-equiv", "").lower() == "content-security-policy"]
    assert csp and "default-src 'none'" in csp[0] and "img-src data:" in csp[0]
    import matplotlib.image as mpimg

    for img in page.imgs:
        arr = mpimg.imread(io.BytesIO(_decoded(img)), format="png")
        assert arr.shape[:2] == (int(img["height"]), int(img["width"]))
        assert arr.std() > 0  # not a blank image
    return page


# --------------------------------------------------------------------------- cwa run


def test_run_prints_the_headline_on_stderr(tiny_gpt2, text_docs, tmp_path):
    out = tmp_path / "h"
    r = runner.invoke(app, ["run", "--model", str(tiny_gpt2), "--data", str(text_docs[0]), "--metric", "magnitude",
                            "--topk", "5", "--seeds", "0", "--controls", "random_k", "--control-draws", "2",
                            "--calib-samples", "2", "--eval-samples", "2", "--seq-len", "32", "--no-save-plots",
                            "--out-dir", str(out)])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    line = headline(read_run(out))
    assert r.stderr.strip().splitlines()[-1] == line
    assert line.startswith("Perturbing the top-5 weights by magnitude (seed 0) with sign_flip (scale 1) changed NLL by ")
    assert (out / "report.html").is_file()


def test_the_headline_holds_the_stored_numbers(runs):
    line = headline(read_run(runs["a"]))
    doc = json.loads((runs["a"] / "perturbation_results.json").read_text())
    top = doc["summary"]["topk"]
    assert line.startswith("Perturbing the top-10 weights by grad_x_weight (seed 0) with sign_flip (scale 1) "
                           f"changed NLL by {top['delta_nll']:+.3g} nats/token (95% CI {top['ci95'][0]:.3g} to "
                           f"{top['ci95'][1]:.3g}")
    rnd = doc["summary"]["random_k"]
    assert f"random_k {rnd['mean']:+.3g} on average over 4 draws" in line
    assert f"p = {rnd['topk_p_value']:.3g}, z = {rnd['topk_z']:.3g}" in line
    st = json.loads((runs["a"] / "stability_results.json").read_text())
    assert f"mean Jaccard {st['mean_jaccard']:.3g} (chance {st['random_jaccard']:.3g})" in line
    assert f"other seeds 1: {doc['summary_by_seed']['1']['topk']['delta_nll']:+.3g}" in line


def test_run_report_embeds_every_figure_and_fetches_nothing(runs):
    text = (runs["a"] / "report.html").read_text()
    page = check_self_contained(text)
    pngs = sorted(p.read_bytes() for p in (runs["a"] / "plots").glob("*.png"))
    assert len(pngs) >= 10  # the figures of both K and the dose response
    assert sorted(_decoded(i) for i in page.imgs) == pngs
    assert headline(read_run(runs["a"])) in "".join(page.text)


def test_run_report_tables_hold_the_json_files(runs):
    page = Page((runs["a"] / "report.html").read_text())
    doc = json.loads((runs["a"] / "perturbation_results.json").read_text())
    conds = doc["conditions"]
    assert len(page.tables["conditions"]) == len(conds)
    for col in ("delta_nll", "kl_from_baseline", "nll", "n_changed", "delta_w_norm"):
        got = [float(x) for x in page.column("conditions", col)]
        assert got == pytest.approx([float(c[col]) for c in conds], rel=1e-5), col
    assert page.column("conditions", "name") == [c["name"] for c in conds]
    # the summary of every seed and K; the first seed's agree with the json's summary
    assert len(page.tables["summary"]) == 2 * 2 * 3
    first = [r for r in page.tables["summary"] if r[0] == "0" and r[1] == "10"]
    heads = page.heads["summary"]
    for r in first:
        s = doc["summary"][r[heads.index("condition")]]
        assert float(r[heads.index("delta_nll")]) == pytest.approx(s.get("mean", s.get("delta_nll")), rel=1e-5)
        assert float(r[heads.index("ci95_lo")]) == pytest.approx(s["ci95"][0], rel=1e-5, abs=1e-12)
    stats = json.loads((runs["a"] / "sensitivity_stats.json").read_text())
    assert page.column("per-tensor", "param") == list(stats["per_tensor"])
    got = [float(x) for x in page.column("per-tensor", "mean")]
    assert got == pytest.approx([v["mean"] for v in stats["per_tensor"].values()], rel=1e-5)
    assert float(page.column("overall", "count")[0]) == stats["overall"]["count"]
    kv = {r[0]: r[1] for r in page.tables["kv"]}
    man = json.loads((runs["a"] / "experiment_manifest.json").read_text())
    assert kv["model fingerprint"] == man["model"]["fingerprint"]
    assert kv["cwa version"] == man["cwa_version"] and kv["git commit"] == str(man["git_commit"] or "—")
    assert kv["evaluation data"] == man["data"]["evaluation"]["fingerprint"]
    assert kv["command line"] == shlex.join(man["command_line"])
    assert [float(x) for x in page.tables["jaccard"][0][1:]] == pytest.approx(
        json.loads((runs["a"] / "stability_results.json").read_text())["jaccard"][0])


def test_every_string_is_escaped(runs, tmp_path):
    odd = tmp_path / """r<b>old</b>&"'x"""
    shutil.copytree(runs["b"], odd)
    write_run_report(odd)
    text = (odd / "report.html").read_text()
    page = Page(text)
    assert "b" not in page.tags
    assert odd.name in "".join(page.text)  # shown as written, as text
    assert "&lt;b&gt;old&lt;/b&gt;&amp;&quot;&#x27;x" in text
    assert page.imgs == []  # b draws no figures: the report says so instead
    assert "No figures" in "".join(page.text)


def test_compare_report(compared, runs):
    text = (compared / "report.html").read_text()
    page = check_self_contained(text)
    figs = json.loads((compared / "comparison.json").read_text())["figures"]
    assert len(figs) == 5
    assert sorted(_decoded(i) for i in page.imgs) == sorted((compared / f).read_bytes() for f in figs)
    with open(compared / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(page.tables["rows"]) == len(rows)
    for col in ("delta_nll", "kl_from_baseline"):
        got = [float(x) for x in page.column("rows", col)]
        assert got == pytest.approx([float(r[col]) for r in rows], rel=1e-5, abs=1e-12), col
    assert page.column("rows", "label") == [r["label"] for r in rows]
    shown = "".join(page.text)
    for name in ("a", "b", "c"):
        assert headline(read_run(runs[name])) in shown


# --------------------------------------------------------------------------- chromium


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHECK = """<script>window.addEventListener("load",function(){var r=[];
document.querySelectorAll("img").forEach(function(i){var b=i.getBoundingClientRect();
r.push([i.complete,i.naturalWidth,i.naturalHeight,+i.getAttribute("width"),+i.getAttribute("height"),b.right]);});
document.body.setAttribute("data-check",JSON.stringify({imgs:r,sw:document.documentElement.scrollWidth,
iw:window.innerWidth}));});</script>"""


def _chrome(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _render(exe: str, html_path: Path, tmp: Path) -> None:
    """Screenshot the page as written and check, in a copy that only adds the checking
    script (a Content-Security-Policy forbids scripts in the original), that every
    image decoded at its declared size and that nothing is wider than the window."""
    import matplotlib.image as mpimg

    shot = tmp / "page.png"
    _chrome(exe, tmp, f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri())
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1280)
    assert (img[..., :3] < 0.9).any(axis=-1).mean() > 0.02, "screenshot is blank"
    text = html_path.read_text()
    probe = tmp / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text).replace(
        "</body>", CHECK + "</body>"))
    shot2 = tmp / "probe.png"
    _chrome(exe, tmp, f"--screenshot={shot2}", "--window-size=1280,2000", probe.as_uri())
    # the script changes nothing visible: the page as written drew the same images
    assert np.abs(mpimg.imread(shot2) - img).mean() < 2e-3
    n_img = text.count("<img ")
    for width in (1280, 700):
        r = _chrome(exe, tmp, "--dump-dom", f"--window-size={width},2000", "--virtual-time-budget=10000", probe.as_uri())
        m = re.search(r'data-check="([^"]*)"', r.stdout)
        assert m, r.stderr[-2000:]
        got = json.loads(m.group(1).replace("&quot;", '"'))
        assert len(got["imgs"]) == n_img > 0
        for complete, nw, nh, w, h, right in got["imgs"]:
            assert complete and (nw, nh) == (w, h) and right <= width
        assert got["sw"] <= got["iw"] == width, got


@pytest.mark.slow
def test_reports_render_in_headless_chromium(runs, compared, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    for name, page in (("run", runs["a"] / "report.html"), ("compare", compared / "report.html")):
        (tmp_path / name).mkdir()
        _render(exe, page, tmp_path / name)


def test_a_run_without_perturbation_reports_and_compares(tiny_gpt2, text_docs, tmp_path):
    from cwa.pipeline import RunConfig
    from cwa.stages import DataOptions

    data = DataOptions(data=str(text_docs[0]), calib_samples=2, eval_samples=2, seq_len=32)
    out = cwa.run(RunConfig(model=str(tiny_gpt2), data=data, metric="magnitude", topk=[5], seeds=[0],
                            perturb="none", save_plots=False, out_dir=tmp_path / "np"))
    line = headline(read_run(out))
    assert line == ("No perturbation of the top-5 weights by magnitude (seed 0) (--perturb none). "
                    "Stability across seeds not checked (one seed).")
    page = check_self_contained((out / "report.html").read_text())
    assert "conditions" not in page.tables and "per-tensor" in page.tables
    cmp = cwa.compare(out)
    assert cmp.rows == [] and cmp.overlap.k == 5 and "no perturbation results" in cmp.notes[0]
    cmp.save(tmp_path / "cmp")
    assert sorted(p.name for p in (tmp_path / "cmp" / "plots").iterdir()) == ["topk_location_k5.png"]
