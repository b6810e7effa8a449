import threading

import numpy as np
import pytest

from han_edge.errors import HanEdgeError
from han_edge.gallery import Gallery


def brute_force(queries, feats, ids, k, metric):
    if metric == "l2":
        d = np.sqrt(((queries[:, None, :] - feats[None, :, :]) ** 2).sum(-1))
    else:
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        d = 1 - qn @ gn.T
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(d, order, 1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_search_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 32)).astype(np.float32)
    ids = rng.permutation(1000)[:300]
    gallery = Gallery(32, metric=metric, capacity=4)      # forces several capacity doublings
    for start in range(0, 300, 37):
        gallery.add(ids[start:start + 37], feats[start:start + 37])
    queries = rng.normal(size=(9, 32)).astype(np.float32)
    got_ids, got_d = gallery.search(queries, k=7)
    want_ids, want_d = brute_force(queries, feats, ids, 7, metric)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-4)


def test_remove_and_same_camera_exclusion():
    feats = np.eye(4, dtype=np.float32)
    gallery = Gallery(4)
    gallery.add([10, 11, 12, 13], feats, cams=[0, 1, 0, 1])
    ids, _ = gallery.search(feats[0], k=1)
    assert ids[0, 0] == 10
    ids, _ = gallery.search(feats[0], k=2, query_cams=[0], exclude_same_camera=True)
    assert set(ids[0]) <= {11, 13}
    assert gallery.remove([10, 99]) == 1 and len(gallery) == 3
    ids, _ = gallery.search(feats[0], k=3)
    assert 10 not in ids
    # fewer candidates than k after exclusion: padded with -1 / inf
    ids, d = gallery.search(feats[1], k=3, query_cams=[1], exclude_same_camera=True)
    assert ids[0, 1] == -1 and np.isinf(d[0, 1])


def test_bad_inputs():
    gallery = Gallery(8)
    with pytest.raises(HanEdgeError, match="empty"):
        gallery.search(np.zeros(8, np.float32))
    with pytest.raises(HanEdgeError, match=r"shape \(N, 8\)"):
        gallery.add([1], np.zeros((1, 4)))
    with pytest.raises(HanEdgeError, match="ids"):
        gallery.add([1, 2], np.zeros((1, 8)))
    with pytest.raises(HanEdgeError, match="NaN"):
        gallery.add([1], np.full((1, 8), np.nan))
    gallery.add([1], np.ones((1, 8)))
    with pytest.raises(HanEdgeError, match=r"queries must have shape \(N, 8\)"):
        gallery.search(np.zeros((2, 3)))
    with pytest.raises(HanEdgeError, match="NaN"):              # a NaN query is refused, not answered with id -1
        gallery.search(np.full((1, 8), np.nan))


def test_save_load_round_trip_and_truncated_file(tmp_path):
    rng = np.random.default_rng(1)
    gallery = Gallery(16, metric="cosine")
    gallery.add(np.arange(50), rng.normal(size=(50, 16)), cams=np.arange(50) % 3)
    path = tmp_path / "g.npz"
    gallery.save(path)
    loaded = Gallery.load(path, dim=16)
    q = rng.normal(size=(5, 16))
    for a, b in zip(gallery.search(q, 5), loaded.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    assert loaded.metric == "cosine"
    with pytest.raises(HanEdgeError, match="holds 16-D features, expected 1024-D"):
        Gallery.load(path, dim=1024)
    good = path.read_bytes()
    # A crash mid-save: the temporary file is truncated, the previous gallery is untouched.
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(HanEdgeError, match="corrupt"):
        Gallery.load(truncated)
    assert Gallery.load(path).search(q, 5)[0].tolist() == gallery.search(q, 5)[0].tolist()


def test_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "g.npz"
    gallery = Gallery(4)
    gallery.add([1], np.ones((1, 4)))
    gallery.save(path)
    before = path.read_bytes()
    gallery.add([2], np.zeros((1, 4)))
    import errno
    import han_edge.fileio as module

    def crash(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(module.os, "replace", crash)
    with pytest.raises(HanEdgeError, match="no space"):
        gallery.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]      # no stray temporary file


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_one_writer_many_readers(index):
    rng = np.random.default_rng(2)
    gallery = Gallery(8, index=index)
    gallery.add([0], rng.normal(size=(1, 8)))
    errors = []

    def reader():
        try:
            for _ in range(200):
                ids, d = gallery.search(rng.normal(size=(2, 8)), k=3)
                assert (ids[np.isfinite(d)] >= 0).all()
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(1, 300):
        gallery.add([i], rng.normal(size=(1, 8)))
        if i % 50 == 0:
            gallery.remove([i - 1])
    for t in threads:
        t.join()
    assert not errors
    assert len(gallery) == 300 - 5


def test_faiss_index_agrees_with_exact():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(500, 32)).astype(np.float32)
    exact, approx = Gallery(32), Gallery(32, index="faiss")
    exact.add(np.arange(500), feats)
    approx.add(np.arange(500), feats)
    q = feats[:20] + 0.01 * rng.normal(size=(20, 32)).astype(np.float32)
    e_ids, e_d = exact.search(q, 5)
    a_ids, a_d = approx.search(q, 5)
    assert (e_ids[:, 0] == a_ids[:, 0]).all()
    np.testing.assert_allclose(a_d[:, 0], e_d[:, 0], rtol=1e-3, atol=1e-3)
    approx.remove([0])
    assert approx.search(q[:1], 1)[0][0, 0] != 0


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_same_camera_exclusion_runs_inside_every_index(index):
    """FAISS used to fall back to exact search silently; now each index excludes by itself."""
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    cams = np.arange(400) % 4
    ref, other = Gallery(16), Gallery(16, index=index)
    ref.add(np.arange(400), feats, cams)
    other.add(np.arange(400), feats, cams)
    q, q_cams = feats[:12], np.array([0, 1, 2, 3, -1, 0, 1, 2, 3, -1, 0, 1])
    want = ref.search(q, 5, q_cams, exclude_same_camera=True)
    got = other.search(q, 5, q_cams, exclude_same_camera=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    own = cams[got[0]] == q_cams[:, None]
    assert not own[q_cams != -1].any() and got[0][4, 0] == 4        # camera -1 excludes nothing


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_bounded_history_and_age(index):
    clock = iter(range(100, 200))
    gallery = Gallery(4, index=index, max_per_id=2, clock=lambda: float(next(clock)))
    for i in range(5):                                     # identity 7 seen five times, identity 8 once
        gallery.add([7], np.full((1, 4), i, np.float32), cams=[0])
    gallery.add([8], np.full((1, 4), -1, np.float32), cams=[1])
    e = gallery.entries()
    assert sorted(e.ids.tolist()) == [7, 7, 8]
    assert sorted(e.feats[e.ids == 7, 0].tolist()) == [3, 4]        # the two most recent of id 7 kept
    assert gallery.remove_older_than(105) == 2 and gallery.entries().ids.tolist() == [8]
    with pytest.raises(HanEdgeError, match="finite time"):
        gallery.remove_older_than(float("nan"))


@pytest.mark.gpu
def test_device_gallery_matches_cpu():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(2000, 64)).astype(np.float32)
    cpu, gpu = Gallery(64), Gallery(64, device="cuda")
    cpu.add(np.arange(2000), feats, cams=np.arange(2000) % 4)
    gpu.add(np.arange(2000), feats, cams=np.arange(2000) % 4)
    q = rng.normal(size=(16, 64)).astype(np.float32)
    for exclude in (False, True):
        c = cpu.search(q, 10, query_cams=np.arange(16) % 4, exclude_same_camera=exclude)
        g = gpu.search(q, 10, query_cams=np.arange(16) % 4, exclude_same_camera=exclude)
        np.testing.assert_array_equal(c[0], g[0])
        np.testing.assert_allclose(c[1], g[1], rtol=1e-4, atol=1e-4)
