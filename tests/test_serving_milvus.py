"""MilvusIndex on Milvus Lite (embedded) against a brute-force NumPy reference."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from han_edge.errors import HanEdgeError  # noqa: E402
from han_edge.indexes import VectorIndex  # noqa: E402
from han_edge.milvus_index import MilvusIndex  # noqa: E402


def reference(feats, cams, ids, queries, k, metric, query_cams=None):
    """Exact top-k by NumPy in float64: (ids, distances), excluded/missing -> -1/inf."""
    f, q = feats.astype(np.float64), queries.astype(np.float64)
    if metric == "l2":
        d = np.sqrt(np.maximum(((q[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0))
    else:
        d = 1 - (q @ f.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(f, axis=1)[None, :]
    if query_cams is not None:
        qc = np.asarray(query_cams)[:, None]
        d[(qc == cams[None, :]) & (qc != -1)] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, order, 1)
    out = np.where(np.isfinite(dist), ids[order], -1)
    return out, dist


def _data(n=600, dim=32, seed=0, ids=None):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    ids = np.arange(100, 100 + n) if ids is None else ids
    cams = rng.integers(0, 6, n)
    times = 1.7e9 + np.arange(n, dtype=np.float64)
    return feats, ids.astype(np.int64), cams.astype(np.int64), times


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_flat_equals_exact_search(metric, tmp_path):
    feats, ids, cams, times = _data()
    index = MilvusIndex(32, metric, tmp_path / "g.db", index_type="flat")
    assert isinstance(index, VectorIndex)
    try:
        index.add(feats[:300], ids[:300], cams[:300], times[:300])
        index.add(feats[300:], ids[300:], cams[300:], times[300:])
        assert index.count() == 600
        queries = np.random.default_rng(5).standard_normal((9, 32)).astype(np.float32)
        qcams = np.array([0, 1, 2, 3, 4, 5, -1, 0, 7])
        for query_cams in (None, qcams):
            got_ids, got_d = index.search(queries, 7, query_cams)
            want_ids, want_d = reference(feats, cams, ids, queries, 7, metric, query_cams)
            assert got_ids.dtype == np.int64 and got_d.dtype == np.float32 and got_ids.shape == (9, 7)
            np.testing.assert_array_equal(got_ids, want_ids)
            np.testing.assert_allclose(got_d, want_d, atol=1e-5, rtol=1e-5)
        if metric == "l2":           # Euclidean, not Milvus' squared L2
            own, d = index.search(feats[:3], 1)
            np.testing.assert_array_equal(own[:, 0], ids[:3])
            np.testing.assert_allclose(d[:, 0], 0, atol=1e-3)
    finally:
        index.close()


def test_padding_same_camera_and_k_beyond_count(tmp_path):
    feats, ids, cams, times = _data(n=5, dim=8)
    cams = np.array([1, 1, 1, 2, -1])
    with MilvusIndex(8, "l2", tmp_path / "p.db") as index:
        index.add(feats, ids, cams, times)
        got_ids, got_d = index.search(feats[:2], 4, np.array([1, -1]))
        # query of camera 1: only the camera-2 and camera--1 entries remain; padded with -1/inf
        assert sorted(got_ids[0, :2].tolist()) == sorted(ids[3:].tolist())
        assert got_ids[0, 2:].tolist() == [-1, -1] and np.isinf(got_d[0, 2:]).all()
        assert (got_ids[1] != -1).all()          # camera -1 excludes nothing
        got_ids, got_d = index.search(feats[:1], 9)
        assert (got_ids[0, :5] != -1).all() and (got_ids[0, 5:] == -1).all() and np.isinf(got_d[0, 5:]).all()


def test_remove_keep_recent_and_entries(tmp_path):
    ids = np.repeat(np.arange(10), 6)
    feats, ids, cams, times = _data(n=60, dim=8, ids=ids)
    rng = np.random.default_rng(2)
    times = 1000.0 + rng.permutation(60).astype(np.float64)     # insertion order != time order
    with MilvusIndex(8, "cosine", tmp_path / "r.db") as index:
        index.add(feats, ids, cams, times)
        assert index.remove(ids=[3, 4]) == 12 and index.count() == 48
        old = int(((times < 1010) & ~np.isin(ids, [3, 4])).sum())
        assert index.remove(before=1010.0) == old and index.count() == 48 - old
        assert index.remove(ids=[3]) == 0
        kept = index.entries()
        expected_removed = sum(max(0, int((kept.ids == i).sum()) - 2) for i in np.unique(kept.ids))
        assert index.keep_recent(2) == expected_removed
        after = index.entries()
        for identity in np.unique(kept.ids):
            newest = np.sort(kept.times[kept.ids == identity])[-2:]
            np.testing.assert_array_equal(np.sort(after.times[after.ids == identity]), newest)
        # entries round-trip features with their ids, cameras and times
        row = {t: i for i, t in enumerate(times)}
        for f, i, c, t in zip(after.feats, after.ids, after.cams, after.times):
            j = row[t]
            np.testing.assert_array_equal(f, feats[j])
            assert i == ids[j] and c == cams[j]


def test_bad_input_is_one_sentence_and_keeps_entries(tmp_path):
    feats, ids, cams, times = _data(n=20, dim=16)
    path = tmp_path / "b.db"
    with MilvusIndex(16, "l2", path) as index:
        index.add(feats, ids, cams, times)
        bad = feats.copy()
        bad[3, 2] = np.nan
        with pytest.raises(HanEdgeError, match="NaN"):
            index.add(bad, ids, cams, times)
        with pytest.raises(HanEdgeError, match="NaN"):
            index.search(bad[:4], 3)
        with pytest.raises(HanEdgeError, match=r"\(N, 16\)"):
            index.add(feats[:, :8], ids, cams, times)
        assert index.count() == 20
    with pytest.raises(HanEdgeError, match="holds 16-D features, not 32-D"):
        MilvusIndex(32, "l2", path)
    with pytest.raises(HanEdgeError, match="indexed for L2"):
        MilvusIndex(16, "cosine", path)
    with pytest.raises(HanEdgeError, match="FLAT index, not HNSW"):
        MilvusIndex(16, "l2", path, index_type="hnsw")
    with MilvusIndex(16, "l2", path) as index:          # nothing stored was lost
        assert index.count() == 20
    with pytest.raises(HanEdgeError, match="cannot reach Milvus at http://127.0.0.1:1"):
        MilvusIndex(16, "l2", "http://127.0.0.1:1", timeout_s=5)
    with pytest.raises(HanEdgeError, match="ending in .db"):
        MilvusIndex(16, "l2", tmp_path / "gallery.npz")
    with pytest.raises(HanEdgeError, match="does not exist"):
        MilvusIndex(16, "l2", tmp_path / "missing" / "g.db")
    with pytest.raises(HanEdgeError, match="unknown metric"):
        MilvusIndex(16, "ip", tmp_path / "c.db")


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from han_edge.milvus_index import MilvusIndex
    rng = np.random.default_rng(7)
    feats = rng.standard_normal((50, 12)).astype(np.float32)
    index = MilvusIndex(12, "l2", sys.argv[1], collection="cams", index_type="hnsw")
    index.add(feats, np.arange(50), np.arange(50) % 3, 5.0 + np.arange(50))
    index.remove(ids=[0, 1])
    np.save(sys.argv[2], feats)
""")


def test_restart_keeps_the_data(tmp_path):
    """A gallery written by another process (which exited) opens with every entry and search still right."""
    path, saved = tmp_path / "restart.db", tmp_path / "feats.npy"
    subprocess.run([sys.executable, "-c", _WRITER, str(path), str(saved)], check=True, timeout=300)
    feats = np.load(saved)
    with MilvusIndex(12, "l2", path, collection="cams", index_type="hnsw") as index:
        assert index.count() == 48
        entries = index.entries()
        np.testing.assert_array_equal(entries.ids, np.arange(2, 50))
        np.testing.assert_array_equal(entries.feats, feats[2:])
        np.testing.assert_array_equal(entries.times, 5.0 + np.arange(2, 50))
        got, _ = index.search(feats[10:13], 1)
        np.testing.assert_array_equal(got[:, 0], [10, 11, 12])
        index.add(feats[:2], np.array([0, 1]), np.array([0, 1]), np.array([1.0, 2.0]))
    # reopened in this process after close: the add above persisted
    with MilvusIndex(12, "l2", path, collection="cams", index_type="hnsw") as index:
        assert index.count() == 50


@pytest.mark.slow
def test_hnsw_recall_at_5_on_100k(tmp_path):
    """HNSW recall@5 >= 0.99 against exact search, 100,000 re-id-like entries (identities with several views)."""
    n, dim, views = 100_000, 64, 10
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // views, dim)).astype(np.float32)
    feats = np.repeat(centres, views, 0) + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    rows = np.arange(n)
    queries = feats[rng.choice(n, 200, replace=False)] + 0.05 * rng.standard_normal((200, dim)).astype(np.float32)
    with MilvusIndex(dim, "l2", tmp_path / "h.db", index_type="hnsw", timeout_s=600) as index:
        index.add(feats, rows, rng.integers(0, 6, n), np.zeros(n))
        index.flush()
        assert index.count() == n
    # reopened: the HNSW graph Milvus built in the background is what the search uses
    with MilvusIndex(dim, "l2", tmp_path / "h.db", index_type="hnsw", timeout_s=600) as index:
        got, _ = index.search(queries, 5)
    sq = (queries * queries).sum(1)[:, None] + (feats * feats).sum(1)[None, :] - 2 * queries @ feats.T
    want = np.argsort(sq, axis=1)[:, :5]
    recall = np.mean([len(set(want[i]) & set(got[i])) / 5 for i in range(len(queries))])
    assert recall >= 0.99


def test_cli_embed_into_milvus_and_match(fresh_onnx, tmp_path):
    """`embed --gallery milvus:X.db` adds to Milvus Lite; `match --gallery milvus:X.db` equals matching the .npz."""
    import json

    import cv2
    from typer.testing import CliRunner

    from han_edge.cli import app

    _, model = fresh_onnx
    rng = np.random.default_rng(4)
    folder = tmp_path / "crops"
    folder.mkdir()
    for pid in range(1, 7):
        for cam in (1, 2):
            cv2.imwrite(str(folder / f"{pid:04d}_c{cam}s1_000001_00.jpg"),
                        rng.integers(0, 256, (128, 48, 3), dtype=np.uint8))
    runner = CliRunner()
    db = tmp_path / "g.db"
    result = runner.invoke(app, ["embed", "--model", str(model), "--images", str(folder), "--out",
                                 str(tmp_path / "g.npz"), "--gallery", f"milvus:{db}"])
    assert result.exit_code == 0, result.output
    query = tmp_path / "q.npz"
    result = runner.invoke(app, ["embed", "--model", str(model), "--images", str(folder), "--out", str(query)])
    assert result.exit_code == 0, result.output
    reports = {}
    for name, spec in (("npz", str(tmp_path / "g.npz")), ("milvus", f"milvus:{db}")):
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["match", "--gallery", spec, "--query", str(query), "-k", "3",
                                     "--exclude-same-camera", "--json", str(out)])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(out.read_text())
    got_d, want_d = np.array(reports["milvus"]["distances"]), np.array(reports["npz"]["distances"])
    np.testing.assert_allclose(got_d, want_d, atol=1e-5)
    got_ids, want_ids = np.array(reports["milvus"]["ids"]), np.array(reports["npz"]["ids"])
    # fresh weights put many crops at nearly equal distances: ids must agree wherever the distance is not a tie
    gaps = np.diff(want_d, axis=1)
    clear = np.ones_like(want_d, bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    np.testing.assert_array_equal(got_ids[clear], want_ids[clear])
    for row in range(len(want_ids)):        # and as sets within each row
        assert sorted(got_ids[row]) == sorted(want_ids[row]) or not clear[row].all()
    result = runner.invoke(app, ["match", "--gallery", "milvus:", "--query", str(query)])
    assert result.exit_code == 2 and "needs a location" in result.output
    result = runner.invoke(app, ["embed", "--model", str(model), "--images", str(folder), "--gallery", "x.npz"])
    assert result.exit_code == 2


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gallery_front_on_milvus_equals_exact(metric, tmp_path):
    """Gallery(index="milvus") behaves as Gallery(index="exact"): search with exclusion, history, removal, reopen."""
    from han_edge.gallery import Gallery

    feats, ids, cams, times = _data(n=200, dim=24, ids=np.repeat(np.arange(40), 5))
    queries = np.random.default_rng(9).standard_normal((6, 24)).astype(np.float32)
    qcams = np.array([0, 1, 2, 3, -1, 5])
    uri = tmp_path / "front.db"
    milvus = Gallery(24, metric, index="milvus", uri=str(uri))
    exact = Gallery(24, metric, index="exact")
    try:
        for gallery in (milvus, exact):
            gallery.add(ids, feats, cams, times)
        for exclude in (False, True):
            got = milvus.search(queries, 8, qcams, exclude_same_camera=exclude)
            want = exact.search(queries, 8, qcams, exclude_same_camera=exclude)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-5)
        assert milvus.keep_recent(3) == exact.keep_recent(3) == 80
        assert milvus.remove_older_than(times[100]) == exact.remove_older_than(times[100])
        assert milvus.remove([7, 8]) == exact.remove([7, 8])
        assert len(milvus) == len(exact)
        a, b = milvus.entries(), exact.entries()
        order = np.argsort(a.times)
        np.testing.assert_array_equal(a.ids[order], b.ids[np.argsort(b.times)])
    finally:
        milvus.backend.close()
    reopened = Gallery(24, metric, index="milvus", uri=str(uri))
    try:
        assert len(reopened) == len(exact)
        got = reopened.search(queries, 4)
        want = exact.search(queries, 4)
        np.testing.assert_array_equal(got[0], want[0])
        with pytest.raises(HanEdgeError):
            Gallery(48, metric, index="milvus", uri=str(uri))
    finally:
        reopened.backend.close()
    stored = Gallery(24, None, index="milvus", uri=str(uri))   # metric None: the collection's own
    try:
        assert stored.metric == metric and stored.backend.metric == metric
        np.testing.assert_allclose(stored.search(queries, 4)[1], want[1], atol=1e-5)
    finally:
        stored.backend.close()
    fresh = Gallery(24, None, index="milvus", uri=str(tmp_path / "new.db"))
    try:
        assert fresh.metric == "l2"
    finally:
        fresh.backend.close()


def test_cli_match_uses_the_collection_metric_not_the_query_files(tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app
    from han_edge.gallery import Gallery

    feats, ids, cams, times = _data(n=20, dim=16, ids=np.arange(20))
    uri = tmp_path / "cos.db"
    stored = Gallery(16, "cosine", index="milvus", uri=str(uri))
    try:
        stored.add(ids, feats, cams, times)
    finally:
        stored.backend.close()
    query = Gallery(16)                       # an embed file: l2 by default
    query.add(ids[:3], feats[:3] * 2.0, cams[:3])
    query.save(tmp_path / "q.npz")
    result = CliRunner().invoke(app, ["match", "--gallery", f"milvus:{uri}", "--query", str(tmp_path / "q.npz"),
                                      "-k", "1", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert [row[0] for row in report["ids"]] == [0, 1, 2]
    assert np.allclose([row[0] for row in report["distances"]], 0, atol=1e-5)   # cosine: the scale does not count


@pytest.mark.parametrize("content", [b"SQLite format 3\0junk", b"", b"\x00" * 64])
def test_a_file_that_is_not_a_milvus_lite_database_is_named_and_kept(tmp_path, content):
    from han_edge.gallery import Gallery

    path = tmp_path / "users.db"
    path.write_bytes(content)
    with pytest.raises(HanEdgeError, match="users.db is a file, not a Milvus Lite database"):
        Gallery(8, index="milvus", uri=str(path))
    assert path.read_bytes() == content


def test_cli_match_reads_a_milvus_gallery_and_never_creates_one(tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app
    from han_edge.gallery import Gallery

    query = Gallery(8)
    query.add([1], np.ones((1, 8), np.float32))
    query.save(tmp_path / "q.npz")
    (tmp_path / "photos.db" / "sub").mkdir(parents=True)
    (tmp_path / "photos.db" / "notes.txt").write_text("the user's")
    for name, match in (("new.db", "Milvus Lite gallery .*new.db does not exist"),
                        ("photos.db", "photos.db is a folder Milvus Lite did not make")):
        result = CliRunner().invoke(app, ["match", "--gallery", f"milvus:{tmp_path / name}", "--query",
                                          str(tmp_path / "q.npz")])
        assert result.exit_code == 2 and re.search(match, " ".join(result.output.split())), result.output
    assert not (tmp_path / "new.db").exists()                                   # was created, empty
    stored = Gallery(8, index="milvus", uri=str(tmp_path / "g.db"))
    try:
        stored.add([1], np.ones((1, 8), np.float32))
    finally:
        stored.backend.close()
    inside = next(p for p in (tmp_path / "g.db").rglob("*") if p.is_file())
    before = inside.read_bytes()
    result = CliRunner().invoke(app, ["match", "--gallery", f"milvus:{tmp_path / 'g.db'}", "--query", str(tmp_path / "q.npz"),
                                      "--json", str(inside)])                 # was: the store's manifest became JSON
    assert result.exit_code == 2 and "is a file inside the --gallery input folder" in " ".join(result.output.split())
    assert inside.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "photos.db").iterdir()) == ["notes.txt", "sub"]   # was written into
