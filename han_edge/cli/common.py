"""What every command module shares: the Typer apps, the console, progress bars, report writing."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="han-edge: HAN person re-id from training to TensorRT engines on Jetson and data-centre GPUs.")
profile_app = typer.Typer(no_args_is_help=True, help="FLOPs/params per variant and cost-effectiveness tables.")
app.add_typer(profile_app, name="profile")
console = Console()


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def write_json(path: Optional[Path], data) -> None:
    """An optional --json report, written atomically."""
    if path:
        from han_edge.fileio import write_json as write

        write(path, data)
        console.print(f"wrote {path}")
