"""Serving benchmarks: Milvus Lite vs the in-process exact gallery, and the Triton client's overhead.

1. Galleries of 1e4 and 1e5 HAN-sized (1024-D) re-id-like features (identities of 10 views around a
   centre, L2-normalised): insert rate, search latency p50/p99 for 1 and 32 queries, recall@5 against
   exact search — for the in-process exact index (NumPy GEMM + top-k), Milvus Lite FLAT and Milvus
   Lite HNSW (M 16, efConstruction 128, ef 128). Milvus Lite seals and indexes in background threads
   after a flush; "index ready" is the time from the flush until that work is done (close + reopen).
2. Triton: ``TritonBackend`` (tritonclient gRPC) against ``tests/triton_stub.py`` (Triton's gRPC service
   definitions, ONNX Runtime behind, on 127.0.0.1) vs the in-process ONNX Runtime backend, HAN(Small)
   FP32, batch 1 and 32. The difference is the client + protocol + local transport overhead (the stub
   is Python; a real Triton server's own scheduling is not measured).

Writes ``bench/results/serving.json`` and replaces its own section of ``bench/RESULTS.md``.
Run: ``python bench/bench_serving.py`` (about 20-30 minutes on 2 cores); ``BENCH_SERVING_PARTS=triton`` (or
``gallery``) re-measures one part and keeps the other's numbers from ``results/serving.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, write_result

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

DIM = 1024
SIZES = tuple(int(v) for v in os.environ.get("BENCH_SERVING_SIZES", "10000,100000").split(","))
K = 5


def timings(fn, iters: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)), "iters": iters}


def interleaved(fa, fb, iters: int, warmup: int = 2) -> tuple[dict, dict]:
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(iters):
        for fn, out in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return tuple({"p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)), "iters": iters}
                 for t in (ta, tb))


def reid_features(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    views = 10
    centres = rng.standard_normal((-(-n // views), DIM)).astype(np.float32)
    feats = np.repeat(centres, views, 0)[:n] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def gallery_rows(tmp: Path, progress=None) -> list[dict]:
    from han_edge.indexes import ExactIndex
    from han_edge.milvus_index import MilvusIndex

    rows = []
    for n in SIZES:
        feats = reid_features(n)
        ids, cams, times = np.arange(n), np.arange(n) % 6, 1.7e9 + np.arange(n, dtype=np.float64)
        rng = np.random.default_rng(1)
        queries = feats[rng.choice(n, 64, replace=False)] + 0.05 * rng.standard_normal((64, DIM)).astype(np.float32)
        exact = ExactIndex(DIM, "l2", "cpu", capacity=n)
        start = time.perf_counter()
        exact.add(feats, ids, cams, times)
        insert_s = time.perf_counter() - start
        truth, _ = exact.search(queries, K)
        row = {"index": "exact (in-process NumPy)", "entries": n, "insert_per_s": n / insert_s, "index_ready_s": 0.0,
               "search_1": timings(lambda: exact.search(queries[:1], K), 30),
               "search_32": timings(lambda: exact.search(queries[:32], K), 10),
               "recall_at_5": recall(exact.search(queries, K)[0], truth)}
        rows.append(row)
        print(row, flush=True)
        for kind in ("flat", "hnsw"):
            path = tmp / f"g_{kind}_{n}.db"
            index = MilvusIndex(DIM, "l2", path, index_type=kind, timeout_s=3600)
            start = time.perf_counter()
            index.add(feats, ids, cams, times)
            insert_s = time.perf_counter() - start
            start = time.perf_counter()
            index.flush()
            index.close()                     # waits for Milvus Lite's background sealing / index build
            index = MilvusIndex(DIM, "l2", path, index_type=kind, timeout_s=3600)
            ready_s = time.perf_counter() - start
            got, _ = index.search(queries, K)
            row = {"index": f"Milvus Lite {kind.upper()}", "entries": n, "insert_per_s": n / insert_s,
                   "index_ready_s": ready_s,
                   "search_1": timings(lambda: index.search(queries[:1], K), 30 if n <= 10_000 else 10,
                                       warmup=2 if n <= 10_000 else 1),
                   "search_32": timings(lambda: index.search(queries[:32], K), 10 if n <= 10_000 else 3,
                                        warmup=2 if n <= 10_000 else 1),
                   "recall_at_5": recall(got, truth)}
            index.close()
            shutil.rmtree(path, ignore_errors=True)
            rows.append(row)
            print(row, flush=True)
            if progress:
                progress(rows)
    return rows


def triton_rows(tmp: Path) -> list[dict]:
    import torch

    from han_edge.backends.onnxruntime import OnnxRuntimeBackend
    from han_edge.backends.triton import TritonBackend
    from han_edge.exporter import export_fp32
    from han_edge.model import build_model
    from han_edge.triton import RepoOptions, write_repository
    from triton_stub import TritonStub

    torch.manual_seed(0)
    model = build_model("small").eval()
    onnx_path = export_fp32(model, model.config, tmp / "han_small.onnx")
    write_repository(onnx_path, tmp / "models", RepoOptions(max_batch=32, instance_kind="cpu"))
    local = OnnxRuntimeBackend(onnx_path)
    rows = []
    with TritonStub(tmp / "models", max_requests=10_000, threads=0) as stub:
        remote = TritonBackend(f"grpc://{stub.url}/han_small", timeout_s=120)
        for batch in (1, 32):
            x = np.random.default_rng(batch).standard_normal((batch, 3, 160, 64)).astype(np.float32)
            np.testing.assert_allclose(remote.infer(x), local.infer(x), atol=1e-5)
            # interleaved, so a change in the shared machine's load hits both sides alike
            a, b = interleaved(lambda: local.infer(x), lambda: remote.infer(x), 30 if batch == 1 else 10)
            rows.append({"batch": batch, "in_process_ort": a, "triton_grpc": b,
                         "overhead_p50_ms": b["p50_ms"] - a["p50_ms"],
                         "request_mib": x.nbytes / 2**20})
            print(rows[-1], flush=True)
        remote.close()
    return rows


def cpu_flags() -> str:
    out = subprocess.run(["grep", "-o", "-m1", r"avx512_vnni\|avx2", "/proc/cpuinfo"], capture_output=True, text=True)
    return ",".join(sorted(set(out.stdout.split()))) or "none"


def markdown(result: dict) -> str:
    lines = [f"## Serving: Milvus Lite vs exact gallery, Triton client overhead ({result['machine']}, "
             f"CPU flags {result['cpu_flags']}, {result['date']})", "",
             f"Written by `python bench/bench_serving.py`. {DIM}-D L2-normalised re-id-like features (10 views per "
             "identity), 64 queries near stored entries, recall@5 against exact search, L2 metric. Milvus Lite "
             f"{result['versions']['milvus_lite']} (pymilvus {result['versions']['pymilvus']}) embedded in the "
             "process; \"index ready\" = flush until Milvus Lite's background sealing/indexing is done. "
             "`MilvusIndex` sends Milvus Lite one query per FLAT search call (its brute force broadcasts "
             "queries x entries x dim: 13 GB for 32 queries at 1e5) and 8 per HNSW call. Measured while other "
             "jobs shared the 2 cores (load average 4-9): absolute times are noisy.", "",
             "| index | entries | insert entries/s | index ready s | 1 query p50 / p99 ms | 32 queries p50 / p99 ms "
             "| recall@5 |", "|---|---|---|---|---|---|---|"]
    for r in result["gallery"]:
        lines.append(f"| {r['index']} | {r['entries']:,} | {r['insert_per_s']:,.0f} | {r['index_ready_s']:.1f} | "
                     f"{r['search_1']['p50_ms']:.2f} / {r['search_1']['p99_ms']:.2f} | "
                     f"{r['search_32']['p50_ms']:.2f} / {r['search_32']['p99_ms']:.2f} | {r['recall_at_5']:.3f} |")
    lines += ["", "Triton: `TritonBackend` (tritonclient gRPC) to the test stand-in server (`tests/triton_stub.py`: "
              "Triton's gRPC service definitions, ONNX Runtime behind, Python) on 127.0.0.1, vs the in-process ONNX "
              "Runtime backend; HAN(Small) FP32, same ORT threads. Overhead = client + protocol + transport (+ the "
              "stub's Python), not a real Triton's scheduling.", "",
              "| batch | request MiB | in-process ORT p50 / p99 ms | Triton gRPC p50 / p99 ms | overhead p50 ms |",
              "|---|---|---|---|---|"]
    for r in result["triton"]:
        a, b = r["in_process_ort"], r["triton_grpc"]
        lines.append(f"| {r['batch']} | {r['request_mib']:.2f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
                     f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {r['overhead_p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def update_results_md(section: str) -> None:
    """Replace (or append) only the serving section of RESULTS.md, between its own markers."""
    from han_edge.fileio import atomic_write_bytes

    path = RESULTS.parent / "RESULTS.md"
    text = path.read_text() if path.is_file() else ""
    block = f"<!-- serving:begin -->\n{section}<!-- serving:end -->\n"
    pattern = re.compile(r"<!-- serving:begin -->.*?<!-- serving:end -->\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    atomic_write_bytes(path, text.encode(), "RESULTS.md")
    print(f"updated the serving section of {path}")


def main() -> None:
    import milvus_lite
    import pymilvus

    versions = {"pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__}
    parts = os.environ.get("BENCH_SERVING_PARTS", "triton,gallery").split(",")
    previous = json.loads((RESULTS / "serving.json").read_text()) if (RESULTS / "serving.json").is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        triton = triton_rows(Path(tmp)) if "triton" in parts else previous.get("triton", [])
        if "gallery" not in parts:             # re-measure one part, keep the other's numbers
            path = write_result("serving", [], gallery=previous.get("gallery", []), triton=triton,
                                cpu_flags=cpu_flags(), versions=versions)
            update_results_md(markdown(json.loads(path.read_text())))
            return

        def save(gallery):           # after every row: a run cut short still leaves its numbers
            return write_result("serving", [], gallery=gallery, triton=triton, cpu_flags=cpu_flags(),
                                versions=versions)
        gallery = gallery_rows(Path(tmp), save)
    path = save(gallery)
    update_results_md(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
