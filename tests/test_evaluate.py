import numpy as np
import pytest

from han_edge.errors import HanEdgeError
from han_edge.evaluate import euclidean_squared, evaluate_features, evaluate_rank, multi_query_features, re_ranking


def slow_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Obviously-correct loop: one query at a time, one gallery image at a time."""
    cmc_sum, aps, firsts = np.zeros(max_rank), [], []
    for q in range(distmat.shape[0]):
        order = np.argsort(distmat[q], kind="stable")
        ranked = [g for g in order
                  if g_pids[g] != -1 and not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
        hits = [g_pids[g] == q_pids[q] for g in ranked]
        if not any(hits):
            continue
        first = hits.index(True)
        firsts.append(first)
        cmc_sum += np.array([1.0 if first <= k else 0.0 for k in range(max_rank)])
        found, precisions = 0, []
        for pos, hit in enumerate(hits, 1):
            if hit:
                found += 1
                precisions.append(found / pos)
        aps.append(np.mean(precisions))
    return cmc_sum / len(aps), float(np.mean(aps)), len(aps), firsts


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_rank_matches_loop(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 25, 80
    q_pids = rng.integers(1, 12, nq)
    g_pids = rng.integers(-1, 12, ng)               # includes junk (-1) and distractors (0)
    q_cams, g_cams = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.integers(0, 6, (nq, ng)).astype(np.float64)   # many ties
    q_pids[0] = 99                                   # a query with no true match: skipped
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20, chunk=7)
    cmc, mAP, nvalid, firsts = slow_evaluate(dist, q_pids, g_pids, q_cams, g_cams, 20)
    assert result["num_valid_query"] == nvalid < nq
    assert result["num_skipped_query"] == nq - nvalid
    np.testing.assert_allclose(result["cmc"], cmc, atol=1e-6)
    assert abs(result["mAP"] - mAP) < 1e-6
    assert result["rank1"] == pytest.approx(cmc[0], abs=1e-6)
    assert result["first_rank"].tolist() == firsts       # per scored query, in query order


def test_perfect_ranking_scores_one():
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 1, 2])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 1, 2, 2])
    dist = np.array([[0.1, 0.9, 0.2, 0.8], [0.9, 0.1, 0.8, 0.2]])
    r = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    assert r["rank1"] == 1.0 and r["mAP"] == 1.0


def test_no_valid_query_is_an_error():
    with pytest.raises(HanEdgeError, match="no query has a true match"):
        evaluate_rank(np.zeros((1, 2)), [1], [1, 2], [0], [0, 0])


def dense_re_ranking(q_g, q_q, g_g, k1, k2, lam):
    """Straightforward dense implementation of Zhong et al.'s algorithm, loops and all."""
    original = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    original = (original / original.max(axis=0)).T
    n, nq = original.shape[0], q_g.shape[0]
    rank = np.argsort(original, axis=1)

    def recip(i, k):
        fwd = rank[i, :k + 1]
        return [j for j in fwd if i in rank[j, :k + 1]]

    V = np.zeros((n, n))
    kh = int(np.around(k1 / 2))
    for i in range(n):
        base = recip(i, k1)
        expanded = set(base)
        for c in base:
            cand = recip(c, kh)
            if len(set(cand) & set(base)) > 2 / 3 * len(cand):
                expanded |= set(cand)
        idx = sorted(expanded)
        w = np.exp(-original[i, idx])
        V[i, idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            m = np.minimum(V[i], V[j]).sum()
            jac[i, j] = 1 - m / (2 - m)
    final = jac * (1 - lam) + original[:nq] * lam
    return final[:, nq:]


def _random_case(seed, nq=12, ng=40, dim=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim))
    q = centres[rng.integers(0, 6, nq)] + 0.5 * rng.normal(size=(nq, dim))
    g = centres[rng.integers(0, 6, ng)] + 0.5 * rng.normal(size=(ng, dim))
    return euclidean_squared(q, g), euclidean_squared(q, q), euclidean_squared(g, g)


@pytest.mark.parametrize("seed,k1,k2", [(0, 20, 6), (1, 8, 3), (2, 5, 1)])
def test_re_ranking_matches_dense_reference(seed, k1, k2):
    q_g, q_q, g_g = _random_case(seed)
    fast = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=0.3)
    slow = dense_re_ranking(q_g, q_q, g_g, k1, k2, 0.3)
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_re_ranking_properties():
    q_g, q_q, g_g = _random_case(3, nq=10, ng=10)
    # Identity case: queries equal to the gallery -> each query's own copy ranks first.
    g = np.random.default_rng(4).normal(size=(10, 8))
    d = euclidean_squared(g, g)
    rr = re_ranking(d, d, d, k1=4, k2=2)
    assert (rr.argmin(1) == np.arange(10)).all()
    # lambda = 1 leaves only the (squared, column-scaled) original distance.
    only_original = re_ranking(q_g, q_q, g_g, lambda_value=1.0)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    np.testing.assert_allclose(only_original, (full / full.max(0)).T[:10, 10:], rtol=1e-5)
    # Jaccard part lies in [0, 1].
    jac = re_ranking(q_g, q_q, g_g, lambda_value=0.0)
    assert jac.min() >= -1e-6 and jac.max() <= 1 + 1e-6


def test_multi_query_averages_same_camera_queries():
    f = np.array([[1.0, 0], [3.0, 0], [0, 5.0]])
    out = multi_query_features(f, [1, 1, 1], [0, 0, 1])
    np.testing.assert_allclose(out, [[2, 0], [2, 0], [0, 5]])


def test_clear_neighbour_agreement_ignores_near_ties_but_not_moved_clear_neighbours():
    from han_edge.evaluate import clear_neighbour_agreement, neighbour_agreement

    # two pairs: a and b nearly tie as c's neighbour; d's neighbour e is clear
    reference = np.array([[1.0, 0.0, 0.0], [0.995, 0.0998, 0.0], [0.995, -0.0998, 0.0],
                          [0.0, 0.0, 1.0], [0.0, 0.3, 0.95], [0.0, -0.9, 0.3]])
    # image 0's neighbour (1 or 2: 0.995 each, a tie broken by index) flips to 2
    tie_flipped = reference + np.array([[0.0, -0.01, 0.0]] + [[0.0, 0.0, 0.0]] * 5)
    assert neighbour_agreement(reference, tie_flipped) < 1
    agreement, share = clear_neighbour_agreement(reference, tie_flipped)
    assert agreement == 1.0 and 0 < share < 1
    # image 3's clear neighbour 4 moves to 5
    moved = reference.copy()
    moved[3] = [0.0, -0.9, 0.4]
    agreement, _ = clear_neighbour_agreement(reference, moved)
    assert agreement < 1
    # all ties: nothing to score
    agreement, share = clear_neighbour_agreement(np.ones((4, 3)), np.ones((4, 3)))
    assert share == 0 and np.isnan(agreement)


def test_evaluate_rank_refuses_what_it_cannot_rank():
    q, g = ([1], [0]), ([1, 2], [1, 1])
    for distmat, match in [(np.zeros(2), "distmat must be a \\(queries, gallery\\) array"), (None, "array of real numbers"),
                           (np.zeros((1, 2), complex), "real numbers"),
                           (np.array([[np.nan, 1.0]]), "NaN or infinite distances for 1 queries"),
                           (np.full((1, 2), np.inf), "NaN or infinite distances")]:   # NaN sorted last: silently scored
        with pytest.raises(HanEdgeError, match=match):
            evaluate_rank(distmat, q[0], g[0], q[1], g[1])
    for kwargs in ({"max_rank": 0}, {"max_rank": -1}, {"chunk": 0}):   # IndexError / ValueError before
        with pytest.raises(HanEdgeError, match="must be a whole number >= 1"):
            evaluate_rank(np.zeros((1, 2)), q[0], g[0], q[1], g[1], **kwargs)
    assert evaluate_rank(np.array([[0.1, 0.5]]), 1, [1, 2], 0, [1, 1])["rank1"] == 1.0   # scalars for one query


def test_evaluate_features_refuses_what_would_rank_silently_wrong():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    ids = ([1, 2], [1, 2, 3], [0, 0], [1, 1, 1])
    for qf, gf, match in [(q * 1e30, g, "too large for float32"),              # distances overflowed to inf: gallery order
                          (q + 1000j * q, g, "must hold real numbers"),        # the imaginary part was dropped
                          (q, g[:, :5], "query features are 8-D and gallery features 5-D"),
                          (q[0], g, "query features must be an \\(N, D\\) array"), ([["a"] * 8] * 2, g, "real numbers")]:
        with pytest.raises(HanEdgeError, match=match):
            evaluate_features(qf, gf, *ids)
    assert evaluate_features(q, g, *ids)["num_query"] == 2
