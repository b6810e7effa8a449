"""Shared helpers for the benchmark scripts: machine description and result files."""
from __future__ import annotations

import time
from pathlib import Path

from han_edge.bench import machine_description
from han_edge.fileio import write_json
from han_edge.paths import ensure_folder

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, rows, **extra) -> Path:
    ensure_folder(RESULTS, "benchmark results folder")
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M"), **extra, "rows": rows}
    write_json(path, payload, "benchmark result")
    print(f"wrote {path}")
    return path
