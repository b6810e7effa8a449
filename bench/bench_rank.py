"""Time to rank and re-rank a Market-1501-sized random case (3,368 queries x 15,913 gallery)."""
from __future__ import annotations

import resource
import time

import numpy as np

from common import write_result
from han_edge.evaluate import euclidean_squared, evaluate_rank, re_ranking


def main(num_q: int = 3368, num_g: int = 15913, dim: int = 1024, ids: int = 750) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(ids, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(1, ids, num_q), rng.integers(-1, ids, num_g)
    q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
    q = centres[q_pids] + rng.normal(size=(num_q, dim)).astype(np.float32)
    g = centres[np.maximum(g_pids, 0)] + rng.normal(size=(num_g, dim)).astype(np.float32)
    rows = []
    start = time.perf_counter()
    q_g = euclidean_squared(q, g)
    rows.append({"step": "distance matrix (GEMM)", "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    result = evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams)
    rows.append({"step": "evaluate_rank (CMC + mAP)", "seconds": time.perf_counter() - start,
                 "rank1": result["rank1"], "mAP": result["mAP"]})
    start = time.perf_counter()
    rr = re_ranking(q_g, euclidean_squared(q, q), euclidean_squared(g, g))
    rows.append({"step": "re_ranking (k1=20, k2=6, lambda=0.3, incl. q-q and g-g distances)",
                 "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    result = evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams)
    rows.append({"step": "evaluate_rank after re-ranking", "seconds": time.perf_counter() - start,
                 "rank1": result["rank1"], "mAP": result["mAP"]})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for row in rows:
        print(f"{row['step']:70s} {row['seconds']:8.2f} s")
    print(f"peak resident memory {peak:.1f} GiB")
    write_result("rank", rows, shape=[num_q, num_g], peak_rss_gib=peak)


if __name__ == "__main__":
    main()
