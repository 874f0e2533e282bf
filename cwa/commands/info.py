"""`cwa info`: a readable summary of any artifact on stdout."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cwa.commands.common import read_paths


def info_cmd(
    artifacts: Annotated[list[str], typer.Argument(help="Artifact files (scores, selection, results, stability), or -.")],
) -> None:
    """Show an artifact's schema, provenance and a summary of its contents.

    Examples:

      cwa info cwa-out/scores-1a2b3c4d5e6f7a8b.safetensors

      cwa info outputs/x/artifacts/topk_seed0.h5
    """
    from rich.console import Console
    from rich.table import Table

    from cwa import artifacts as A

    con = Console(highlight=False, soft_wrap=True)
    for path in read_paths(artifacts):
        schema = A.artifact_schema(path)
        con.print(f"[bold]{path}[/bold]  schema={schema}")
        if schema == A.SCORES_SCHEMA:
            sc = A.open_scores(path)
            for k in sorted(sc.meta):
                if k in ("cwa.param_order", "cwa.sha256", "cwa.windows"):
                    continue
                con.print(f"  {k}: {sc.meta[k]}")
            windows = sc.json_meta("cwa.windows", [])
            con.print(f"  cwa.windows: {len(windows)} windows {windows[:8]}{' …' if len(windows) > 8 else ''}")
            t = Table("param", "shape", "numel")
            total = 0
            for n in sc.names:
                total += sc.numel(n)
                t.add_row(n, "x".join(map(str, sc.shape(n))), str(sc.numel(n)))
            con.print(t)
            con.print(f"  {len(sc.names)} tensors, {total} scores")
        else:
            art = A.read_h5(path)
            for k in sorted(art.attrs):
                v = art.attrs[k]
                s = v if isinstance(v, str) else json.dumps(v, default=str)
                con.print(f"  {k}: {s[:300]}{'…' if len(s) > 300 else ''}")
            t = Table("dataset", "shape", "dtype")
            for k, a in sorted(art.arrays.items())[:40]:
                t.add_row(k, str(getattr(a, "shape", "")), str(getattr(a, "dtype", "")))
            con.print(t)
            if len(art.arrays) > 40:
                con.print(f"  … {len(art.arrays) - 40} more datasets")
            if isinstance(art.doc, dict):
                con.print(f"  document keys: {', '.join(art.doc)}")
                if "baseline" in art.doc:
                    con.print(f"  baseline: {json.dumps(art.doc['baseline'])}")
                if "summary" in art.doc:
                    con.print(f"  summary: {json.dumps(art.doc['summary'])[:600]}")
