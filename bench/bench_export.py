"""Export time, ONNX Runtime CPU latency and INT8 accuracy per precision (the numbers of issue 11).

    python bench/bench_export.py [--checkpoint runs/han_small.pt] [small medium large]

Latency: every model of a variant in one process, runs interleaved round-robin (machine noise hits
them alike), median per model, 2 ORT threads, batch 1 and 32. ``fp32-old`` is the graph before
issue 11 (``RegionCropper`` expanding T copies of each feature map before ``grid_sample``), exported
from a copy of that module kept here only, so old and new FP32 are compared in the same run.
Without a checkpoint the weights are fresh (speed does not depend on training) and INT8 is fully
quantised; with one (HAN-S of `han-edge demo`/`train`), the small variant's INT8 files go through
the full export (sensitivity analyses) and their accuracy against FP32 is measured on held-out
crops and on the synthetic test set. The ORT profiler's per-op share at batch 32 is recorded too.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from han_edge.bench import machine_description
from han_edge.exporter import export_fp16, export_fp32, load_batch
from han_edge.fileio import write_json
from han_edge.jobs import (
    ExportOptions,
    calibration_paths,
    compare_retrieval,
    heldout_paths,
    load_torch_model,
)
from han_edge.model import _base_grid
from han_edge.onnx_io import ort_session, run_ort
from han_edge.quantize import export_int8, held_out_accuracy

RESULTS = Path(__file__).parent / "results"


class OldRegionCropper(nn.Module):
    """The pre-issue-11 crop: T copies of the feature map (Expand), then one grid_sample per copy."""

    def __init__(self, out_size, regions):
        super().__init__()
        self.regions = regions
        self.register_buffer("base_grid", _base_grid(*out_size), persistent=False)
        self.register_buffer("scale", torch.tensor([1.0, 1.0 / regions]), persistent=False)

    def forward(self, x, theta):
        n, c, h, w = x.shape
        grid = self.base_grid * self.scale + theta.reshape(-1, 1, 1, 2)
        stacked = x.unsqueeze(1).expand(n, self.regions, c, h, w).reshape(-1, c, h, w)
        return F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if re.search(rf"\b{f}\b", text))


def export_variant(variant: str, checkpoint: str | None, out: Path, log) -> tuple[dict, dict, dict]:
    model, config, _ = load_torch_model(variant, checkpoint)
    trained = checkpoint is not None
    calib = load_batch(calibration_paths(None, 256 if trained else 128), config)
    held = load_batch(heldout_paths() if trained else heldout_paths(32), config)
    analysis = load_batch(heldout_paths(offset=1), config) if trained else held   # as `han-edge export`
    paths, seconds, reports = {}, {}, {}
    old = load_torch_model(variant, checkpoint)[0]
    old.croppers = nn.ModuleList(OldRegionCropper(size, config.regions) for size in config.crop_sizes)
    paths["fp32-old"] = export_fp32(old, config, out / f"han_{variant}.old.onnx")
    start = time.perf_counter()
    paths["fp32"] = export_fp32(model, config, out / f"han_{variant}.onnx")
    seconds["fp32"] = time.perf_counter() - start
    x = held[:8]
    assert np.abs(run_ort(ort_session(paths["fp32-old"]), x) - run_ort(ort_session(paths["fp32"]), x)).max() < 1e-5
    start = time.perf_counter()
    paths["fp16"] = export_fp16(paths["fp32"], out / f"han_{variant}.fp16.onnx")
    seconds["fp16"] = time.perf_counter() - start
    for flavour, name in (("tensorrt", "int8"), ("cpu", "int8-cpu")):
        start = time.perf_counter()
        paths[name] = out / f"han_{variant}.{name}.onnx"
        reports[name] = export_int8(paths["fp32"], paths[name], calib, analysis, flavour=flavour,
                                    exclude=None if trained else [],   # as `han-edge export`, fine-tune included
                                    finetune_steps=ExportOptions().int8_finetune if trained else 0)
        seconds[name] = time.perf_counter() - start
        log(f"{variant} {name}: {seconds[name]:.0f} s, not INT8 {reports[name].excluded_groups or 'none'}, "
            f"FP32 nodes {len(reports[name].fp32_nodes)}, ORT ops {reports[name].ort_ops}")
    return paths, seconds, reports


def latency(paths: dict, batch: int, rounds: int, threads: int = 2) -> dict:
    # spinning off: with it on, the idle threads of the model timed before spun into the next one's run
    # on 2 cores (batch-1 medians swung 2-3x between runs)
    sessions = {name: ort_session(path, threads=threads, spinning=False) for name, path in paths.items()}
    x = np.random.default_rng(0).normal(size=(batch, 3, 160, 64)).astype(np.float32)
    times = {name: [] for name in sessions}
    for session in sessions.values():     # warm-up
        session.run(None, {"images": x})
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": x})
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def profile_ops(path: Path, batch: int = 32, runs: int = 5, threads: int = 2) -> dict[str, float]:
    """Share of kernel time per op type from ONNX Runtime's profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling, options.intra_op_num_threads, options.log_severity_level = True, threads, 3
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).normal(size=(batch, 3, 160, 64)).astype(np.float32)
        for _ in range(runs):
            session.run(None, {"images": x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0) + e["dur"]
    total = sum(per_op.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return {"total_ms": total / runs / 1e3, **{op: round(100 * v / total, 1) for op, v in top}}


def accuracy(paths: dict, config, reports: dict) -> list[dict]:
    held = load_batch(heldout_paths(), config)
    reference = run_ort(ort_session(paths["fp32"]), held)
    rows = []
    for name in ("int8", "int8-cpu"):
        retrieval = compare_retrieval(paths["fp32"], paths[name])
        row = {"kind": "accuracy", "precision": name, **held_out_accuracy(reference, paths[name], held), **retrieval,
               "excluded_groups": reports[name].excluded_groups, "fp32_nodes": reports[name].fp32_nodes,
               "calibration": reports[name].method, "sensitivity": reports[name].sensitivity,
               "finetune": reports[name].finetune}
        rows.append(row)
        print(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=["small", "medium", "large"])
    parser.add_argument("--checkpoint", help="trained HAN-S checkpoint for the accuracy rows")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            checkpoint = args.checkpoint if variant == "small" else None
            paths, seconds, reports = export_variant(variant, checkpoint, Path(tmp), print)
            for name, s in seconds.items():
                rows.append({"variant": variant, "kind": "export_seconds", "precision": name, "value": s})
            for batch, rounds in ((1, 100), (32, 15)):
                for name, median in latency(paths, batch, rounds).items():
                    rows.append({"variant": variant, "kind": "ort_cpu", "precision": name, "batch": batch,
                                 "median_ms": median * 1e3, "images_per_s": batch / median})
                    print(f"{variant:6s} {name:9s} batch {batch:2d}: {median * 1e3:8.2f} ms  {batch / median:7.1f} img/s")
            if variant == "small":
                for name in ("fp32-old", "fp32", "int8-cpu", "int8"):
                    rows.append({"variant": variant, "kind": "profile", "precision": name, **profile_ops(paths[name])})
                if checkpoint:
                    config = load_torch_model(variant, checkpoint)[1]
                    rows += [{"variant": variant, **r} for r in accuracy(paths, config, reports)]
    payload = {"machine": machine_description(), "cpu_flags": cpu_flags(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "ort_threads": 2, "checkpoint": args.checkpoint, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "export.json", payload, "benchmark results")
    print(f"wrote {RESULTS / 'export.json'}")


if __name__ == "__main__":
    main()
