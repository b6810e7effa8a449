"""Issue 9/12 acceptance on the CPU (and the GPU numbers where one is present).

1. ``Embedder.embed_frame`` on 32 (and 128) boxes of a 1080p frame against the baseline "cut each box with
   cv2.resize, normalise the stack, run the same model", interleaved in one process, medians.
2. Pre-processing alone: the host path (OpenCV per box), the array-API gather on NumPy, and on PyTorch
   CPU tensors (the code a CUDA machine runs).
3. ``--memory``: embed_frame with 10,000 small boxes on one 1080p frame; run it under
   ``/usr/bin/time -v python bench/bench_device_path.py --memory`` to read the peak RSS.

Run from the repository root: ``python bench/bench_device_path.py [--memory] [--model X.onnx]``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

from han_edge import Embedder  # noqa: E402
from han_edge.bench import synthetic_frame  # noqa: E402
from han_edge.preprocess import Normalizer, clip_boxes, crop_batch, crop_batch_host  # noqa: E402


def fresh_onnx(tmp: Path) -> Path:
    import torch

    from han_edge.exporter import export_fp32
    from han_edge.model import build_model

    torch.manual_seed(0)
    model = build_model("small").eval()
    return export_fp32(model, model.config, tmp / "han_small.onnx")


def cv2_baseline(embedder: Embedder, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """boxmot's way: cut and resize each box with OpenCV, normalise the stack in NumPy, run the model."""
    h, w = embedder.config.input_size
    crops = [cv2.resize(frame[y1:y2, x1:x2], (w, h), interpolation=cv2.INTER_LINEAR)
             for x1, y1, x2, y2 in clip_boxes(boxes, frame.shape[:2])]
    rgb = np.stack(crops)[..., ::-1].astype(np.float32) / 255
    x = ((rgb - np.array(embedder.config.mean, np.float32)) / np.array(embedder.config.std, np.float32))
    return embedder.backend.infer(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def median_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def speed(model: Path, repeats: int) -> list[dict]:
    import array_api_compat.torch as txp
    import torch

    embedder = Embedder(model, threads=2, max_batch=128)   # the same inference batches as the baseline
    rows = []
    for n in (32, 128):
        frame, boxes = synthetic_frame(n, seed=n)
        np.testing.assert_allclose(embedder.embed_frame(frame, boxes), cv2_baseline(embedder, frame, boxes), atol=0.05)
        ours, base = [], []
        for _ in range(repeats):                      # interleaved: the same machine state for both
            ours += median_ms(lambda: embedder.embed_frame(frame, boxes), 1)
            base += median_ms(lambda: cv2_baseline(embedder, frame, boxes), 1)
        clipped = clip_boxes(boxes, frame.shape[:2])
        norm = Normalizer(np, "cpu", embedder.config.mean, embedder.config.std)
        tnorm = Normalizer(txp, torch.device("cpu"), embedder.config.mean, embedder.config.std)
        tframe = torch.from_numpy(frame)
        pre = {"host (OpenCV per box)": lambda: crop_batch_host(frame, clipped, (160, 64), norm),
               "array-API gather, NumPy": lambda: crop_batch(np, frame, clipped, (160, 64), norm),
               "array-API gather, torch CPU": lambda: crop_batch(txp, tframe, clipped, (160, 64), tnorm)}
        pre_ms = {k: float(np.median(median_ms(f, repeats))) for k, f in pre.items()}
        row = {"boxes": n, "embed_frame_ms": float(np.median(ours)), "cv2_baseline_ms": float(np.median(base)),
               "ratio_baseline_over_ours": float(np.median(base) / np.median(ours)),
               **{f"preprocess_ms[{k}]": v for k, v in pre_ms.items()}}
        rows.append(row)
        print(f"{n:4d} boxes on 1080p: embed_frame {row['embed_frame_ms']:.1f} ms, cv2 per crop + same model "
              f"{row['cv2_baseline_ms']:.1f} ms (baseline/ours {row['ratio_baseline_over_ours']:.2f}); "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in pre_ms.items()))
    return rows


def memory(model: Path) -> dict:
    import resource

    embedder = Embedder(model, threads=2)
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    x1, y1 = rng.integers(0, 1880, 10000), rng.integers(0, 1000, 10000)
    boxes = np.stack([x1, y1, x1 + 40, y1 + 80], 1)
    t0 = time.perf_counter()
    feats = embedder.embed_frame(frame, boxes)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"10,000 boxes: {feats.shape} in {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB (ru_maxrss)")
    return {"boxes": 10000, "seconds": seconds, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="an ONNX file (default: fresh HAN-S weights)")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or fresh_onnx(Path(tmp))
        if args.memory:
            write_result("device_path_memory", [memory(model)])
        else:
            write_result("device_path", speed(model, args.repeats), backend="onnxruntime/CPU, 2 threads")


if __name__ == "__main__":
    main()
