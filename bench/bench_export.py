"""Export time per variant and ONNX Runtime CPU latency of FP32 / FP16 / INT8 (TensorRT flavour) / INT8 (CPU flavour).

Latency: median of repeated runs at batch 1 and 32, the four models interleaved round-robin so
that machine noise hits them alike. Weights are fresh (speed does not depend on training).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import write_result
from han_edge.export import (calibration_paths, export_fp16, export_fp32, export_int8, heldout_paths, load_batch,
                             ort_session)
from han_edge.export import load_torch_model


def export_variant(variant: str, out: Path) -> tuple[dict, dict]:
    model, config, _ = load_torch_model(variant, None)
    calib = load_batch(calibration_paths(None, 128), config)
    held = load_batch(heldout_paths(32), config)
    paths, seconds = {}, {}
    start = time.perf_counter()
    paths["fp32"] = export_fp32(model, config, out / f"han_{variant}.onnx")
    seconds["fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    paths["fp16"] = export_fp16(paths["fp32"], out / f"han_{variant}.fp16.onnx")
    seconds["fp16"] = time.perf_counter() - start
    for flavour, name in (("tensorrt", "int8"), ("cpu", "int8-cpu")):
        start = time.perf_counter()
        paths[name] = out / f"han_{variant}.{name}.onnx"
        export_int8(paths["fp32"], paths[name], calib, held, flavour=flavour, exclude=[])   # calibration + Q/DQ
        seconds[name] = time.perf_counter() - start
    return paths, seconds


def latency(paths: dict, batch: int, rounds: int, threads: int = 2) -> dict:
    sessions = {name: ort_session(path, threads=threads) for name, path in paths.items()}
    x = np.random.default_rng(0).normal(size=(batch, 3, 160, 64)).astype(np.float32)
    times = {name: [] for name in sessions}
    for name, session in sessions.items():     # warm-up
        session.run(None, {"images": x})
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": x})
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(variants=("small", "medium", "large")) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            paths, seconds = export_variant(variant, Path(tmp))
            for name, s in seconds.items():
                rows.append({"variant": variant, "kind": "export_seconds", "precision": name, "value": s})
            for batch, rounds in ((1, 40), (32, 10)):
                for name, median in latency(paths, batch, rounds).items():
                    rows.append({"variant": variant, "kind": "ort_cpu", "precision": name, "batch": batch,
                                 "median_ms": median * 1e3, "images_per_s": batch / median})
                    print(f"{variant:6s} {name:9s} batch {batch:2d}: {median * 1e3:8.2f} ms  {batch / median:7.1f} img/s")
    write_result("export", rows, ort_threads=2)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("small", "medium", "large"))
