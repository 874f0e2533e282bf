"""`cwa info`: a readable summary of any artifact on stdout."""

from __future__ import annotations

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
        d = A.describe(path)
        con.print(f"[bold]{path}[/bold]  schema={d['schema']}")
        for k, v in d["fields"]:
            con.print(f"  {k}: {v}")
        t = Table(*d["table"]["columns"])
        for row in d["table"]["rows"]:
            t.add_row(*row)
        con.print(t)
        for line in d["notes"]:
            con.print(f"  {line}")
