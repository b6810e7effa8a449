"""Evaluation: CMC rank-k and mAP under the Market-1501 protocol, k-reciprocal re-ranking, and the
agreement of two feature sets (a quantised model against its FP32 reference).

Metrics are plain functions over arrays (torchreid style), vectorised so that a Market-1501-sized
3,368 x 15,913 distance matrix ranks in seconds. This module imports no other stage; scoring a
model file end to end (``evaluate_model``) lives in ``han_edge.jobs``.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from han_edge.errors import HanEdgeError
from han_edge.validate import whole_number
from han_edge.validate_arrays import features_array


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  chunk: int = 256) -> dict:
    """Market-1501 single-query CMC and mAP.

    For each query, gallery images of the same identity *and* camera are removed, as are junk
    images (pid -1); distractors (pid 0) stay. Queries left with no true match are skipped and
    counted. Ties are broken by gallery order (stable sort).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.atleast_1d(np.asarray(q_pids)), np.atleast_1d(np.asarray(g_pids))
    q_camids, g_camids = np.atleast_1d(np.asarray(q_camids)), np.atleast_1d(np.asarray(g_camids))
    if distmat.ndim != 2 or distmat.dtype.kind not in "iuf":
        raise HanEdgeError(f"distmat must be a (queries, gallery) array of real numbers; got {distmat.dtype} "
                           f"{distmat.shape}")
    num_q, num_g = distmat.shape
    if num_q == 0 or num_g == 0:
        raise HanEdgeError(f"cannot evaluate an empty distance matrix of shape {distmat.shape}")
    bad = ~np.isfinite(distmat).all(1)   # argsort puts NaN last and ties inf: a silently wrong ranking
    if bad.any():
        raise HanEdgeError(f"distmat holds NaN or infinite distances for {int(bad.sum())} queries (features too "
                           "large, or not numbers)")
    if len(q_pids) != num_q or len(q_camids) != num_q or len(g_pids) != num_g or len(g_camids) != num_g:
        raise HanEdgeError("pid/camera arrays do not match the distance matrix shape")
    max_rank, chunk = whole_number(max_rank, "max_rank", 1), whole_number(chunk, "chunk", 1)
    max_rank = min(max_rank, num_g)
    cmc_hits = np.zeros(max_rank, np.float64)
    aps, first_ranks = [], []
    for start in range(0, num_q, chunk):          # chunks bound memory to chunk x G arrays
        stop = min(start + chunk, num_q)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        same_pid = pids == q_pids[start:stop, None]
        keep = ~(same_pid & (cams == q_camids[start:stop, None])) & (pids != -1)
        matches = same_pid & keep
        num_rel = matches.sum(1)
        valid = num_rel > 0
        kept_pos = np.cumsum(keep, axis=1)                    # 1-based rank among kept images
        first = np.argmax(matches, axis=1)
        first_rank = kept_pos[np.arange(stop - start), first] - 1
        ranks = first_rank[valid]
        first_ranks.append(ranks)
        cmc_hits += (ranks[:, None] <= np.arange(max_rank)[None, :]).sum(0)
        precision = np.cumsum(matches, axis=1) / np.maximum(kept_pos, 1)
        aps.append((precision * matches).sum(1)[valid] / num_rel[valid])
    aps = np.concatenate(aps)
    num_valid = len(aps)
    if num_valid == 0:
        raise HanEdgeError("no query has a true match in the gallery (after removing same-camera matches)")
    cmc = cmc_hits / num_valid
    return {"rank1": float(cmc[0]), "rank5": float(cmc[min(4, max_rank - 1)]),
            "rank10": float(cmc[min(9, max_rank - 1)]), "mAP": float(aps.mean()), "cmc": cmc,
            "first_rank": np.concatenate(first_ranks),    # per scored query: 0-based rank of its first true match
            "num_valid_query": num_valid, "num_query": num_q, "num_skipped_query": num_q - num_valid}


def euclidean_squared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows, in float32 via one GEMM."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0, out=d)


def multi_query_features(q_feats, q_pids, q_camids):
    """Market-1501 multi-query: each query's feature averaged over its identity's same-camera queries."""
    q_feats = np.asarray(q_feats)
    keys = np.stack([np.asarray(q_pids), np.asarray(q_camids)], 1)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.ravel()
    sums = np.zeros((group.max() + 1, q_feats.shape[1]), np.float64)
    np.add.at(sums, group, q_feats)
    counts = np.bincount(group)[:, None]
    return (sums / counts)[group].astype(np.float32)


def _top_neighbours(dist: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """First k columns of ``argsort(dist)`` per row without sorting whole rows."""
    n = dist.shape[0]
    k = min(k, dist.shape[1])
    out = np.empty((n, k), np.int64)
    for s in range(0, n, chunk):
        block = dist[s:s + chunk]
        part = np.argpartition(block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
            np.tile(np.arange(block.shape[1]), (len(block), 1))
        vals = np.take_along_axis(block, part, 1)
        out[s:s + chunk] = np.take_along_axis(part, np.argsort(vals, axis=1, kind="stable"), 1)
    return out


def _reciprocal_sets(rank: np.ndarray, k: int) -> sparse.csr_matrix:
    """Row i marks the k-reciprocal neighbours of i: j in top-(k+1) of i and i in top-(k+1) of j."""
    n = rank.shape[0]
    forward = rank[:, :k + 1]
    backward = forward[forward]                                   # (n, k+1, k+1)
    mask = (backward == np.arange(n)[:, None, None]).any(-1)
    rows = np.repeat(np.arange(n), forward.shape[1])[mask.ravel()]
    return sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, forward.ravel()[mask.ravel()])),
                             shape=(n, n))


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               chunk: int = 512) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), following the authors' public code.

    Takes squared-Euclidean distance matrices; like the authors' code it squares them again and
    scales each column by its maximum. Neighbour sets and the encoding V are sparse, so memory is
    one dense (Q+G)^2 float32 matrix rather than several. On a set of fewer than ``k1 + 1`` or ``k2``
    images the neighbour lists hold every image, as the authors' slicing gives.
    """
    q_g = np.asarray(q_g_dist, np.float32)
    num_q, num_g = q_g.shape
    if num_q == 0 or num_g == 0:
        raise HanEdgeError("re-ranking needs at least one query and one gallery item")
    if k1 < 1 or k2 < 1:
        raise HanEdgeError(f"re-ranking needs k1 and k2 of at least 1, got k1={k1}, k2={k2}")
    k2 = min(k2, num_q + num_g)   # the query expansion averages the k2 nearest rows: at most all of them
    original = np.block([[np.asarray(q_q_dist, np.float32), q_g],
                         [q_g.T, np.asarray(g_g_dist, np.float32)]])
    np.square(original, out=original)
    original /= np.maximum(original.max(axis=0), np.finfo(np.float32).tiny)
    original = np.ascontiguousarray(original.T)
    n = original.shape[0]
    rank = _top_neighbours(original, max(k1 + 1, k2))
    recip = _reciprocal_sets(rank, k1)
    half = _reciprocal_sets(rank, int(np.around(k1 / 2.0)))
    # Expansion: add a candidate's half-size set when 2/3 of it lies in the query's set.
    overlap = (half @ recip.T).tocsr()                            # [c, i] = |half(c) & recip(i)|
    half_size = np.asarray(half.sum(1)).ravel()
    pairs = recip.tocoo()                                         # (i, c) with c in recip(i)
    shared = np.asarray(overlap[pairs.col, pairs.row]).ravel()
    ok = shared > 2.0 / 3 * half_size[pairs.col]
    qualify = sparse.csr_matrix((np.ones(ok.sum(), np.float32), (pairs.row[ok], pairs.col[ok])), shape=(n, n))
    expanded = ((recip + qualify @ half) > 0).tocoo()
    weight = np.exp(-original[expanded.row, expanded.col])
    v = sparse.csr_matrix((weight, (expanded.row, expanded.col)), shape=(n, n))
    v = sparse.diags(1.0 / np.asarray(v.sum(1)).ravel()) @ v
    if k2 != 1:   # local query expansion: mean of the k2 nearest rows
        rows = np.repeat(np.arange(n), k2)
        v = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (rows, rank[:, :k2].ravel())), shape=(n, n)) @ v
    v = v.astype(np.float32).tocsr()
    v_cols = v.tocsc()
    jaccard = np.empty((num_q, num_g), np.float32)
    for i in range(num_q):
        start, stop = v.indptr[i], v.indptr[i + 1]
        cols, vals = v.indices[start:stop], v.data[start:stop]
        lengths = v_cols.indptr[cols + 1] - v_cols.indptr[cols]
        take = np.concatenate([np.arange(v_cols.indptr[c], v_cols.indptr[c + 1]) for c in cols]) \
            if len(cols) else np.zeros(0, np.int64)
        mins = np.minimum(np.repeat(vals, lengths), v_cols.data[take])
        temp_min = np.bincount(v_cols.indices[take], weights=mins, minlength=n)[num_q:]
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return jaccard * (1 - lambda_value) + original[:num_q, num_q:] * lambda_value


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test (McNemar's) of paired hits: how likely ``gained`` vs ``lost`` is by chance."""
    from scipy.stats import binomtest

    return float(binomtest(gained, gained + lost).pvalue) if gained + lost else 1.0


def evaluate_features(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, rerank: bool = False) -> dict:
    """Squared-Euclidean ranking (the ordering of the paper's L2 distance), optionally re-ranked."""
    q_feats, g_feats = _features(q_feats, "query"), _features(g_feats, "gallery")
    if q_feats.shape[1] != g_feats.shape[1]:
        raise HanEdgeError(f"query features are {q_feats.shape[1]}-D and gallery features {g_feats.shape[1]}-D")
    q_g = euclidean_squared(q_feats, g_feats)
    if rerank:
        q_g = re_ranking(q_g, euclidean_squared(q_feats, q_feats), euclidean_squared(g_feats, g_feats))
    return evaluate_rank(q_g, q_pids, g_pids, q_camids, g_camids)


def _features(feats, which: str) -> np.ndarray:
    """Real, finite (N, D) features whose float32 distances stay finite (``validate_arrays.features_array``)."""
    array = feats if hasattr(feats, "shape") else np.asarray(feats)
    if array.ndim != 2:
        raise HanEdgeError(f"{which} features must be an (N, D) array; got shape {tuple(array.shape)}")
    return np.asarray(features_array(array, array.shape[1], f"{which} features"))


# -- agreement of two feature sets for the same images (quantised vs reference) ------------------------
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of corresponding rows."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def centred_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean cosine after subtracting the reference's mean feature.

    An untrained or weak network maps every image near one point, where the plain cosine is ~1
    whatever the quantisation does; centring measures what distinguishes images.
    """
    mu = reference.mean(0, keepdims=True)
    return float(cosine_rows(reference - mu, other - mu).mean())


def _nearest(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's most similar other image (inner product) and its lead over the second, relative."""
    sim = features @ features.T
    np.fill_diagonal(sim, -np.inf)
    top2 = np.argsort(-sim, axis=1, kind="stable")[:, :2]
    first, second = np.take_along_axis(sim, top2, axis=1).T
    return top2[:, 0], (first - second) / np.maximum(np.abs(first), 1e-12)


def neighbour_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of images whose nearest other image is the same under both feature sets."""
    return float((_nearest(reference)[0] == _nearest(other)[0]).mean())


def clear_neighbour_agreement(reference: np.ndarray, other: np.ndarray, margin: float = 0.01) -> tuple[float, float]:
    """Neighbour agreement over the images whose reference neighbour is clear; (agreement, their share).

    An image counts when its nearest neighbour under ``reference`` beats the second by more than
    ``margin`` of the similarity. The plain agreement also counts near-ties, where any perturbation
    may pick either neighbour (on a trained HAN-S a quarter of held-out crops have a margin under 1%);
    this one says whether the perturbation moves neighbours that were not in doubt.
    """
    nearest, lead = _nearest(reference)
    clear = lead > margin
    if not clear.any():
        return float("nan"), 0.0
    return float((nearest[clear] == _nearest(other)[0][clear]).mean()), float(clear.mean())
