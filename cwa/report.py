"""`report.html`: what a person reads after `cwa run` (and `cwa compare`).

One self-contained HTML file: the figures are embedded as base64 PNG data URIs (each
`<img>` declares the PNG's pixel size), the style sheet is inline, and a
Content-Security-Policy (`default-src 'none'; img-src data:`) forbids any request, so the
page opens offline and fetches nothing. Every string that reaches the page (paths,
names, command lines, labels) goes through `html.escape`. The layout is responsive:
images scale down to the page width and wide tables scroll inside their own box, so the
page itself never overflows its window.

A run's report: the headline sentence (the first seed and K: top-K ΔNLL with its paired
bootstrap interval, each control's effect with its interval, p and z, and the stability
of the top-K across seeds), the baseline, the summary and every condition of
`perturbation_results.json`, the score statistics of `sensitivity_stats.json`, the
stability matrix, every figure of the run, and the manifest's essentials (versions,
commit, command line, times, model, data fingerprints, hardware, stages). A comparison's
report: a warning when it mixes models or evaluation windows, each run's headline, the
headline table, the rows of `comparison.csv`, the Jaccard matrix, every figure, and each
run's provenance.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cwa import __version__
from cwa import artifacts as A
from cwa.comparison import fmt, read_run, run_rows
from cwa.errors import ArtifactError

if TYPE_CHECKING:
    from cwa.comparison import Comparison, RunOutput

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;line-height:1.45;
  margin:0 auto;padding:1rem 1.5rem 3rem;max-width:1240px}
h1{font-size:1.5rem;margin:.5rem 0}
h2{font-size:1.2rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
p,li,code,figcaption,table.kv td{overflow-wrap:anywhere}
.headline{background:#f2f6fc;border-left:5px solid #4c72b0;padding:.7rem 1rem;font-size:1.05rem}
.warn{background:#fff3e6;border-left:5px solid #d62728;padding:.7rem 1rem}
.scroll{overflow-x:auto;max-width:100%;margin:.4rem 0 1rem}
table{border-collapse:collapse;font-size:.82rem}
th,td{border:1px solid #d5d5d5;padding:.2rem .45rem;vertical-align:top;text-align:right;white-space:nowrap}
th{background:#eef1f6}
td.t,th.t{text-align:left}
table.kv td:first-child{font-weight:600;text-align:left;white-space:nowrap}
table.kv td{text-align:left;white-space:normal}
figure{margin:1rem 0 1.5rem}
img{max-width:100%;height:auto;display:block;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
.muted{color:#666;font-size:.85rem}
"""


# --------------------------------------------------------------------------- HTML pieces


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG from its IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ArtifactError("not a PNG image")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def figure(path: Path, caption: str) -> str:
    """A PNG embedded as a data URI, its pixel size declared."""
    data = Path(path).read_bytes()
    w, h = png_size(data)
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" width="{w}" height="{h}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def cell(v: Any) -> str:
    """A value as table text: floats to 6 significant digits, lists comma-joined."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, list | tuple):
        return ", ".join(cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(A.json_safe(v), separators=(", ", ": "))
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A table in a scroll box; numbers right-aligned, text left."""
    head = "".join(f'<th class="t">{esc(c)}</th>' for c in columns)
    body = []
    for r in rows:
        tds = "".join(f"<td>{esc(cell(v))}</td>" if _is_num(v) else f'<td class="t">{esc(cell(v))}</td>' for v in r)
        body.append(f"<tr>{tds}</tr>")
    c = f' class="{esc(cls)}"' if cls else ""
    return f'<div class="scroll"><table{c}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(cell(v))}</td></tr>" for k, v in pairs)
    return f'<div class="scroll"><table class="kv"><tbody>{rows}</tbody></table></div>'


def dict_rows(items: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> tuple[list[str], list[list[Any]]]:
    """Columns (the union of keys, first-seen order, nested dicts flattened `a.b`) and rows."""
    flat = [_flatten(d) for d in items]
    cols = [c for c in dict.fromkeys(k for d in flat for k in d) if c not in skip]
    return cols, [[d.get(c) for c in cols] for d in flat]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + f'\n<p class="muted">Written by cwa {esc(__version__)} at {esc(A.now_iso())}.</p>\n</body></html>\n'
    )


# --------------------------------------------------------------------------- the headline


def headline(run: RunOutput) -> str:
    """One sentence: the first seed and K's top-K ΔNLL with its interval, each control's
    effect (interval, p, z), and the stability of the top-K across seeds."""
    s0, k0 = run.seeds[0], run.ks[0]
    per = " per tensor" if run.mode == "per_layer" else ""
    what = f"the top-{k0}{per} weights by {run.metric} (seed {s0})"
    res = run.results.get((s0, k0))
    if res is None:
        text = f"No perturbation of {what} (--perturb none)"
    else:
        text = _effect_text(run, res, what)
    return f"{text}. {_stability_text(run, k0)}."


def _effect_text(run: RunOutput, res: A.Results, what: str) -> str:
    summary = res.summary
    top = summary.get("topk") or {}
    ci = top.get("ci95") or [None, None]
    n_win = len(res.doc.get("eval_windows") or [])
    text = (f"Perturbing {what} with {run.perturbation_text} changed NLL by {fmt(top.get('delta_nll'), sign=True)} nats/token "
            f"(95% CI {fmt(ci[0])} to {fmt(ci[1])}, paired bootstrap over {n_win} evaluation windows; "
            f"baseline {fmt(res.baseline.get('nll'), 4)})")
    others = [(s, (run.results[s, run.ks[0]].summary.get("topk") or {}).get("delta_nll"))
              for s in run.seeds[1:] if (s, run.ks[0]) in run.results]
    if others:
        text += "; other seeds " + ", ".join(f"{s}: {fmt(d, sign=True)}" for s, d in others)
    controls = []
    for name, s in summary.items():
        if name == "topk" or not isinstance(s, dict):
            continue
        ci = s.get("ci95") or [None, None]
        if "mean" in s:
            controls.append(f"{name} {fmt(s.get('mean'), sign=True)} on average over {s.get('n_draws')} draws "
                            f"(95% of draws {fmt(ci[0])} to {fmt(ci[1])}; top-K p = {fmt(s.get('topk_p_value'))}, "
                            f"z = {fmt(s.get('topk_z'))})")
        else:
            controls.append(f"{name} {fmt(s.get('delta_nll'), sign=True)} (95% CI {fmt(ci[0])} to {fmt(ci[1])})")
    return text + ("; against " + "; ".join(controls) if controls else "; no controls")


def _stability_text(run: RunOutput, k: int) -> str:
    st = run.stability(k)
    if st is None:
        return ("Stability across seeds not checked (one seed)" if len(run.seeds) < 2
                else "Stability across seeds not checked (--no-stability-check)")
    labels = ", ".join(str(x) for x in st.doc.get("labels") or [])
    return (f"Stability: the top-{k} sets of seeds {labels} overlap with mean Jaccard {fmt(st.mean_jaccard)} "
            f"(chance {fmt(st.random_jaccard)})")


# --------------------------------------------------------------------------- run report


SUMMARY_COLUMNS = ("seed", "k", "condition", "n_draws", "delta_nll", "ci95_lo", "ci95_hi", "interval", "std",
                   "p_value", "z", "kl_from_baseline", "top1_agreement")


def write_run_report(out: str | Path) -> str:
    """Write `out/report.html` for a `cwa run` output directory; returns the headline."""
    run = read_run(out)
    line = headline(run)
    A.write_text_atomic(Path(out) / "report.html", run_report_html(run, line))
    return line


def run_report_html(run: RunOutput, line: str | None = None) -> str:
    line = headline(run) if line is None else line
    body = [f"<h1>cwa run: {esc(run.path.name or run.path)}</h1>", f'<p class="muted">{esc(run.path)}</p>',
            f'<p class="headline">{esc(line)}</p>']
    body += _perturbation_section(run)
    body += _stats_section(run)
    body += _stability_section(run)
    body += _figures_section([(p, p.name) for p in run.plots()])
    body += _provenance_section(run)
    return page(f"cwa run: {run.path.name}", body)


def _perturbation_section(run: RunOutput) -> list[str]:
    rep = run.perturbation_report()
    if rep is None:
        return ["<h2>Perturbation results</h2>", "<p>No perturbation (--perturb none).</p>"]
    rows = run_rows(run)
    cols, crows = dict_rows(rep.conditions)
    return [
        "<h2>Perturbation results</h2>",
        '<p class="muted">perturbation_results.json: baseline, the summary of every seed and K, every condition.</p>',
        "<h3>Baseline</h3>", kv(rep.baseline.items()),
        "<h3>Summary (top-K and controls, per seed and K)</h3>",
        table(SUMMARY_COLUMNS, ([r[c] for c in SUMMARY_COLUMNS] for r in rows), "summary"),
        f"<h3>Conditions ({len(crows)})</h3>", table(cols, crows, "conditions"),
    ]


def _stats_section(run: RunOutput) -> list[str]:
    st = run.sensitivity_stats()
    if not st:
        return []
    head = [(k, v) for k, v in st.items() if not isinstance(v, dict) and k != "all_seeds"]
    per = st.get("per_tensor") or {}
    cols, rows = dict_rows([{"param": n, **v} for n, v in per.items()])
    ocols, orows = dict_rows([st.get("overall") or {}])
    return [
        "<h2>Sensitivity statistics</h2>",
        '<p class="muted">sensitivity_stats.json: score summaries of the first seed (all seeds under artifacts/).</p>',
        kv(head), "<h3>Overall</h3>", table(ocols, orows, "overall"),
        f"<h3>Per tensor ({len(rows)})</h3>", table(cols, rows, "per-tensor"),
    ]


def _stability_section(run: RunOutput) -> list[str]:
    out = []
    for k in run.ks:
        st = run.stability(k)
        if st is None:
            continue
        labels = [str(x) for x in st.doc.get("labels") or []]
        jac = st.doc.get("jaccard") or []
        out += [f"<h3>Top-{k}: Jaccard across seeds</h3>",
                kv([("mean Jaccard", st.mean_jaccard), ("chance K/(2n−K)", st.random_jaccard),
                    ("mean Spearman", st.mean_spearman)]),
                table(["seed", *labels], ([lab, *[A.json_safe(x) for x in row]] for lab, row in zip(labels, jac, strict=False)),
                      "jaccard")]
    return ["<h2>Stability</h2>", *out] if out else []


def _figures_section(figs: list[tuple[Path, str]]) -> list[str]:
    if not figs:
        return ["<h2>Figures</h2>", "<p>No figures (--no-save-plots).</p>"]
    return ["<h2>Figures</h2>", *(figure(p, cap) for p, cap in figs)]


def _provenance_pairs(run: RunOutput) -> list[tuple[str, Any]]:
    m = run.manifest
    model = m.get("model") or {}
    data = m.get("data") or {}
    versions = m.get("versions") or {}
    hw = m.get("hardware") or {}
    cmd = m.get("command_line")
    pairs = [
        ("cwa version", m.get("cwa_version")), ("git commit", m.get("git_commit")),
        ("command line", shlex.join(map(str, cmd)) if isinstance(cmd, list) else cmd),
        ("working directory", m.get("cwd")), ("started", m.get("started")), ("finished", m.get("finished")),
        ("seconds", m.get("seconds")), ("all cache hits", m.get("all_cache_hits")),
    ]
    pairs += [(f"model {k}", model.get(k)) for k in ("name", "source", "fingerprint", "dtype", "device",
                                                      "revision", "commit")]
    for seed, c in (data.get("calibration") or {}).items():
        pairs.append((f"calibration data, seed {seed}",
                      f"{c.get('fingerprint')} ({len(c.get('windows') or [])} windows)"))
    pairs.append(("evaluation data", (data.get("evaluation") or {}).get("fingerprint")))
    pairs += [(f"version {k}", v) for k, v in versions.items() if k != "pip_freeze"]
    pairs += [(f"hardware {k}", v) for k, v in hw.items()]
    return pairs


def _provenance_section(run: RunOutput) -> list[str]:
    stages = [s for s in run.manifest.get("stages") or [] if isinstance(s, dict)]
    cols = ["stage", "seed", "k", "path", "cache_hit", "seconds", "compute_seconds"]
    return [
        "<h2>Provenance</h2>", '<p class="muted">experiment_manifest.json (pip freeze and every artifact fingerprint '
        "are in the file).</p>", kv(_provenance_pairs(run)),
        "<h3>Stages</h3>", table(cols, ([s.get(c) for c in cols] for s in stages), "stages"),
        "<h3>Configuration</h3>", kv(_flatten(run.config).items()),
    ]


# --------------------------------------------------------------------------- comparison report


def write_comparison_report(cmp: Comparison, out: str | Path) -> Path:
    """Write `out/report.html` for a comparison (its figures already under out/plots)."""
    from cwa.comparison import ROW_COLUMNS, headline_table

    out = Path(out)
    body = [f"<h1>cwa compare: {len(cmp.runs)} run{'s' if len(cmp.runs) != 1 else ''}</h1>",
            f'<p class="muted">{esc(out)}</p>']
    if cmp.mixed:
        body.append(f'<p class="warn">Mixed comparison ({esc(", ".join(cmp.mixed))}): these runs are on different '
                    "models or evaluation windows, so their ΔNLL are not measured against one baseline and "
                    "their top-K sets are not sets of the same weights. Compare them with care.</p>")
    body.append("<h2>Headlines</h2>")
    body += [f'<p class="headline"><b>{esc(lab)}</b>: {esc(headline(r))}</p>'
             for r, lab in zip(cmp.runs, cmp.labels, strict=True)]
    cols, rows = headline_table(cmp)
    if rows:
        body += ["<h3>Headline numbers (each run's first seed)</h3>", table(cols, rows, "headline-table")]
    body += [f"<h2>Rows ({len(cmp.rows)})</h2>", '<p class="muted">comparison.csv: one row per run × seed × K × '
             "condition.</p>", table(ROW_COLUMNS, ([r[c] for c in ROW_COLUMNS] for r in cmp.rows), "rows")]
    body += _overlap_section(cmp)
    body += _figures_section([(out / f, Path(f).name) for f in cmp.figures])
    body += ["<h2>Runs</h2>"] + [s for r, lab in zip(cmp.runs, cmp.labels, strict=True) for s in (
        f"<h3>{esc(lab)}</h3>", kv([("directory", str(r.path)), ("metric", r.metric), ("mode", r.mode),
                                    ("perturbation", r.perturbation_text), ("K", r.ks), ("seeds", r.seeds),
                                    ("evaluation windows", len(r.eval_windows)),
                                    ("evaluation data", r.eval_fingerprint), *_provenance_pairs(r)]))]
    if cmp.notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in cmp.notes) + "</ul>"]
    A.write_text_atomic(out / "report.html", page(f"cwa compare: {len(cmp.runs)} runs", body))
    return out / "report.html"


def _overlap_section(cmp: Comparison) -> list[str]:
    ov = cmp.overlap
    if ov is None:
        return []
    rows = [[lab, *row] for lab, row in zip(cmp.labels, ov.jaccard, strict=True)]
    return [f"<h2>Top-{ov.k} overlap</h2>",
            kv([("K", ov.k), ("seeds", ov.seeds), ("chance K/(2n−K)", ov.random_jaccard),
                ("first K of a larger top-K", [lab for lab, t in zip(cmp.labels, ov.truncated, strict=True) if t])]),
            table(["Jaccard", *cmp.labels], rows, "jaccard"),
            "<h3>Per block (counts)</h3>", table(["run", *ov.columns], ([lab, *r] for lab, r in zip(cmp.labels, ov.per_block, strict=True)), "per-block"),
            "<h3>Per module type (counts)</h3>", table(["run", *ov.types], ([lab, *r] for lab, r in zip(cmp.labels, ov.per_type, strict=True)), "per-type")]
