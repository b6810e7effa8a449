"""Runtime benchmark: per batch size, latency percentiles of each stage and end to end, on whichever backend runs.

Stages: ``preprocess`` (frame upload + every box cropped/resized/normalised), ``inference`` (network
input already on the device -> features on the device), ``matching`` (the batch's features against
the gallery, top-5 ids back on the host) and ``end_to_end``; plus ``search_<Q>q``: Q queries against
the whole gallery. Device work is synchronised before each clock read.
"""
from __future__ import annotations

import platform
import time

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.gallery import Gallery
from han_edge.runtime import Embedder


def synthetic_frame(batch: int, seed: int = 0, height: int = 1080, width: int = 1920):
    """A frame with ``batch`` person-sized boxes (crops of varied size, as from a detector)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    h = rng.integers(min(120, height // 2), max(min(400, height), 121), batch)
    h = np.minimum(h, height)
    w = np.maximum((h * rng.uniform(0.35, 0.5, batch)).astype(int), 1)
    x1 = rng.integers(0, width - w + 1)
    y1 = rng.integers(0, height - h + 1)
    return frame, np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)


def percentiles(samples_s: list[float], batch: int, stage: str) -> dict:
    ms = np.array(samples_s) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"batch": batch, "stage": stage, "p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": batch / p50 * 1e3}


def machine_description() -> str:
    """CPU model, cores and the SIMD flags that decide INT8/FP32 speed (numbers differ 2x between CPUs)."""
    import os

    try:
        text = open("/proc/cpuinfo").read()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "")
        flags = [f for f in ("avx512_vnni", "avx512f", "avx2") if f" {f}" in text]
    except OSError:
        model, flags = "", []
    return (f"{platform.machine()} {model} ({os.cpu_count()} cores, {' '.join(flags) or 'no AVX2'}), "
            f"Python {platform.python_version()}")


def fill_gallery(gallery: Gallery, size: int, dim: int, chunk: int = 65536, seed: int = 1) -> None:
    """``size`` random unit vectors, added a chunk at a time (host memory stays at one chunk)."""
    rng = np.random.default_rng(seed)
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        entries = rng.standard_normal((n, dim), dtype=np.float32)
        gallery.add(np.arange(start, start + n), entries / np.linalg.norm(entries, axis=1, keepdims=True))


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_bench(model_path, batches: list[int], iters: int, gallery_size: int, threads: int = 0, warmup: int = 3,
              progress=None, queries: int = 64, **backend_options) -> dict:
    from han_edge.cuda import synchronize
    from han_edge.formats import format_of

    fmt = format_of(model_path)
    options = dict(backend_options)
    if threads:   # a backend without the option refuses it (Embedder), rather than benchmarking its default
        options["threads"] = threads
    if "max_batch" in fmt.options:
        options.setdefault("max_batch", max(batches))
    embedder = Embedder(model_path, **options)
    xp = embedder.xp
    sync = (lambda: synchronize(xp)) if embedder.device == "cuda" else (lambda: None)
    dim = embedder.config.feature_dim
    need, free = gallery_size * (4 * dim + 24), available_memory()   # float32 features + id, camera, time
    if embedder.device != "cuda" and free is not None and need > 0.8 * free:
        raise HanEdgeError(f"a {gallery_size}-entry gallery of {dim}-D features needs {need / 2**30:.1f} GiB and "
                           f"this machine has {free / 2**30:.1f} GiB available; use a smaller --gallery-size")
    gallery = Gallery(embedder.config.feature_dim, device=embedder.placement, capacity=gallery_size)
    fill_gallery(gallery, gallery_size, embedder.config.feature_dim)
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
            t3 = time.perf_counter()
            if i >= warmup:
                for stage, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    timings[stage].append(dt)
        rows += [percentiles(samples, batch, stage) for stage, samples in timings.items()]
        if progress:
            progress()
    query = embedder.embed_frame(*synthetic_frame(queries, seed=2), on_device=True)
    samples = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        gallery.search(query, k=5)
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    rows.append(percentiles(samples, queries, f"search_{queries}q"))
    device = "cpu: " + machine_description()
    if embedder.device == "cuda":
        from han_edge.cuda import device_description
        device = "cuda: " + device_description()["gpu"]
    return {"model": str(model_path), "backend": embedder.name, "precision": embedder.precision,
            "variant": embedder.config.variant, "device": device, "gallery_size": gallery_size,
            "iters": iters, "rows": rows}
