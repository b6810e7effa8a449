"""Command-line interface: `han-edge train | eval | export | inspect | embed | match | bench | profile | demo`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from han_edge.errors import HanEdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
profile_app = typer.Typer(no_args_is_help=True, help="FLOPs/params per variant and cost-effectiveness tables.")
app.add_typer(profile_app, name="profile")
console = Console()


@profile_app.command("flops")
def profile_flops(
    variant: str = typer.Option("all", help="small, medium, large or all"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table"),
):
    """Parameters and multiply-adds per variant at 1x3x160x64, next to Table 1's FLOPs."""
    from han_edge.profile import count_cost, variants_of

    rows = [count_cost(v) for v in variants_of(variant)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="HAN cost at 1x3x160x64 (FLOPs = 2 x MACs, as Table 1)")
    for col in ("variant", "strides", "params", "MACs", "FLOPs", "Table 1", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["variant"], str(tuple(r["strides"])), f"{r['params'] / 1e6:.2f}M", f"{r['macs']:.3e}",
                      f"{r['flops']:.3e}", f"{r['paper_flops']:.2e}", f"{r['ratio']:.3f}")
    console.print(table)


def main() -> None:
    """Entry point: bad input ends in one red sentence and exit code 2, never a traceback."""
    try:
        app()
    except HanEdgeError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
