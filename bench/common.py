"""Shared helpers for the benchmark scripts: machine description and result files."""
from __future__ import annotations

import json
import time
from pathlib import Path

from han_edge.bench import machine_description

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, rows, **extra) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d %H:%M"), **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
