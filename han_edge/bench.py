"""Runtime benchmark: per batch size, latency percentiles of each stage and end to end."""
from __future__ import annotations

import platform
import time

import numpy as np

from han_edge.gallery import Gallery
from han_edge.runtime import Embedder


def synthetic_frame(batch: int, seed: int = 0, height: int = 720, width: int = 1280):
    """A 720p frame with ``batch`` person-sized boxes (crops of varied size, as from a detector)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    h = rng.integers(120, 400, batch)
    w = (h * rng.uniform(0.35, 0.5, batch)).astype(int)
    x1 = rng.integers(0, width - w)
    y1 = rng.integers(0, height - h)
    return frame, np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def percentiles(samples_s: list[float], batch: int, stage: str) -> dict:
    ms = np.array(samples_s) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"batch": batch, "stage": stage, "p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": batch / p50 * 1e3}


def machine_description() -> str:
    try:
        import os
        cores = os.cpu_count()
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    except OSError:
        cores, model = "?", ""
    return f"{platform.machine()} {model} ({cores} cores), Python {platform.python_version()}"


def run_bench(model_path, batches: list[int], iters: int, gallery_size: int, threads: int = 0,
              warmup: int = 3, progress=None) -> dict:
    options = {"threads": threads} if str(model_path).endswith(".onnx") and threads else {}
    embedder = Embedder(model_path, **options)
    xp = embedder.xp
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if xp is not np else (lambda: None)
    gallery = Gallery(embedder.config.feature_dim, device=embedder.device if xp is not np else "cpu",
                      capacity=gallery_size)
    rng = np.random.default_rng(1)
    entries = rng.normal(size=(gallery_size, embedder.config.feature_dim)).astype(np.float32)
    gallery.add(np.arange(gallery_size), entries / np.linalg.norm(entries, axis=1, keepdims=True))
    rows = []
    for batch in batches:
        frame, boxes = synthetic_frame(batch)
        timings = {"preprocess": [], "inference": [], "matching": [], "end_to_end": []}
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            x = embedder.preprocess_frame(frame, boxes)
            sync()
            t1 = time.perf_counter()
            feats = embedder.embed_batch(x, on_device=True)
            sync()
            t2 = time.perf_counter()
            gallery.search(feats, k=5)
            sync()
            t3 = time.perf_counter()
            if i >= warmup:
                for stage, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    timings[stage].append(dt)
        rows += [percentiles(samples, batch, stage) for stage, samples in timings.items()]
        if progress:
            progress()
    device = "cpu: " + machine_description()
    if xp is not np:
        from han_edge.cuda import device_description
        device = "cuda: " + device_description()["gpu"]
    return {"model": str(model_path), "backend": embedder.name, "precision": embedder.precision,
            "variant": embedder.config.variant, "device": device, "gallery_size": gallery_size,
            "iters": iters, "rows": rows}
