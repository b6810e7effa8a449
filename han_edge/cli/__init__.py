"""Command-line interface: `han-edge train | eval | export | build | inspect | embed | match | bench | profile | visualize | demo`.

The top layer: command modules register on one Typer app (``common.app``); ``main`` turns every
``HanEdgeError`` into one red sentence and exit 2 (3 for a missing optional dependency).
"""
from __future__ import annotations

import sys

from rich.console import Console

from han_edge.cli import train_cmds, model_cmds, runtime_cmds  # noqa: F401,I001  (they register the commands, in help order)
from han_edge.cli.common import app
from han_edge.errors import HanEdgeError, MissingDependencyError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point: bad input ends in one red sentence and a non-zero exit, never a traceback."""
    try:
        app()
    except MissingDependencyError as err:
        Console(stderr=True).print(f"[bold red]missing:[/] {err}", highlight=False)
        sys.exit(3)
    except HanEdgeError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
