"""Command-line interface: `han-edge train | eval | export | build | inspect | embed | match | bench | profile | visualize | demo`.

The top layer: command modules register on one Typer app (``common.app``); ``main`` turns every
``HanEdgeError`` into one red sentence and exit 2 (3 for a missing optional dependency).
"""
from __future__ import annotations

import signal
import sys

import typer

from han_edge.cli import train_cmds, model_cmds, runtime_cmds, serve_cmds  # noqa: F401,I001  (they register the commands, in help order)
from han_edge.cli.common import app, fail
from han_edge.errors import HanEdgeError, MissingDependencyError

__all__ = ["app", "main"]


def _terminated(signum, frame):
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so atomic writes remove their temporary files
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point: bad input ends in one red sentence and a non-zero exit, never a traceback.

    The app's command group already converts errors (so ``CliRunner`` sees the same exit codes); this
    catches what is raised outside a command (e.g. while the app is being built).
    """
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except MissingDependencyError as err:
        try:
            fail(str(err), 3, "missing")
        except typer.Exit as done:
            sys.exit(done.exit_code)
    except HanEdgeError as err:
        try:
            fail(str(err), 2)
        except typer.Exit as done:
            sys.exit(done.exit_code)


if __name__ == "__main__":
    main()
