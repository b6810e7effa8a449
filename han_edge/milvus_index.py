"""``MilvusIndex``: the ``VectorIndex`` protocol on Milvus — Milvus Lite in the process, or a Milvus cluster.

``uri`` a local file path (``gallery.db``) runs **Milvus Lite** embedded in this process (one process
at a time per file; the default for tests and a single box); ``http://host:19530`` (or ``https://``)
talks to a Milvus standalone or distributed deployment shared by many cameras and sites.

One collection per gallery: an auto-increment primary key (insertion order), the feature vector,
the identity id, the camera id and a timestamp per entry. Index ``"flat"`` (exact) or ``"hnsw"``
(graph, ``M`` / ``efConstruction`` / search ``ef`` tunable), metric L2 or COSINE. The protocol's
conventions (``han_edge.indexes``) are kept here, not left to Milvus:

- Milvus' L2 "distance" is the *squared* Euclidean distance: the square root is returned;
- Milvus' COSINE score is the similarity: ``1 - score`` is returned;
- same-camera exclusion is a filter expression (``cam != c``), one search per distinct query camera;
- rows with fewer than k candidates are padded with id -1 / distance inf;
- consistency level "Strong": a search sees every add/remove that returned before it.

pymilvus (and milvus-lite) are imported lazily through ``han_edge.milvus_client``: ``pip install 'han-edge[milvus]'``.
"""
from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.indexes import Entries, VectorIndex, pad_results, recent_mask
from han_edge.milvus_client import (
    call,
    check_uri,
    connect,
    import_pymilvus,
    is_remote,
    lite_release,
    quiet_pymilvus,
)

METRICS = {"l2": "L2", "cosine": "COSINE"}
INDEX_TYPES = ("flat", "hnsw")
FIELDS = ("pk", "feat", "pid", "cam", "time")
_MAX_TOPK = 16384          # Milvus' limit on one search's limit (topk)
_BATCH = 2000              # rows per insert / ids per delete expression
_MAX_QUERIES = 256         # queries per search call to a Milvus server
_LITE_QUERIES = 8          # ... to Milvus Lite with an HNSW index (its unsealed rows are brute-forced)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class MilvusIndex(VectorIndex):
    """Entries in a Milvus collection; search by FLAT (exact) or HNSW.

    ``MilvusIndex(dim, metric="l2", uri="gallery.db", collection="han_edge", index_type="flat",
    hnsw_m=16, hnsw_ef_construction=128, hnsw_ef=128, token="", timeout_s=30.0)``

    Opening an existing collection checks its dimension, metric and index type against the
    arguments and refuses a mismatch (one sentence) instead of touching the stored entries;
    ``index_type=None`` takes the stored collection's index (FLAT for a new one).
    """

    def __init__(self, dim: int, metric: str = "l2", uri: str | Path = "han_edge_gallery.db",
                 collection: str = "han_edge", index_type: str | None = "flat", hnsw_m: int = 16,
                 hnsw_ef_construction: int = 128, hnsw_ef: int = 128, token: str = "", timeout_s: float = 30.0):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or not 1 <= int(dim) <= 32768:
            raise HanEdgeError(f"the gallery dimension must be a whole number from 1 to 32768, got {dim!r}")
        if metric is not None and metric not in METRICS:   # None: the stored collection's (new: l2)
            raise HanEdgeError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
        index_type = None if index_type is None else str(index_type).lower()   # None: the stored one (new: flat)
        if index_type is not None and index_type not in INDEX_TYPES:
            raise HanEdgeError(f"unknown Milvus index type {index_type!r}; one of {', '.join(INDEX_TYPES)}")
        if not _NAME.match(str(collection)):
            raise HanEdgeError(f"invalid Milvus collection name {collection!r}: letters, digits and '_', "
                               "not starting with a digit")
        if hnsw_m < 2 or hnsw_ef_construction < 1 or hnsw_ef < 1:
            raise HanEdgeError("HNSW parameters must be positive (M >= 2, efConstruction >= 1, ef >= 1)")
        self.dim, self.metric, self.index_type = int(dim), metric, index_type
        self.collection = str(collection)
        self.hnsw = {"M": int(hnsw_m), "efConstruction": int(hnsw_ef_construction)}
        self.hnsw_ef = int(hnsw_ef)
        self.timeout_s = float(timeout_s)
        self.uri = check_uri(uri)
        self._lock = threading.Lock()
        pymilvus = import_pymilvus()
        self.client = None
        self._lite_path = None if is_remote(self.uri) else str(Path(self.uri).resolve())
        self.client = connect(pymilvus, self.uri, token, self.timeout_s, self._lite_path)
        try:
            self._open_collection(pymilvus)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        return call(self.uri, what, fn, *args, **kwargs)

    def _open_collection(self, pymilvus) -> None:
        client, name = self.client, self.collection
        if self._call("list collections", client.has_collection, name, timeout=self.timeout_s):
            self._check_existing()
            return
        self.index_type, self.metric = self.index_type or "flat", self.metric or "l2"
        DataType = pymilvus.DataType
        schema = client.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("feat", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("pid", DataType.INT64)
        schema.add_field("cam", DataType.INT64)
        schema.add_field("time", DataType.DOUBLE)
        params = client.prepare_index_params()
        params.add_index(field_name="feat", index_name="feat", index_type=self.index_type.upper(),
                         metric_type=METRICS[self.metric], params=self.hnsw if self.index_type == "hnsw" else {})
        self._call("create the gallery collection", client.create_collection, name, schema=schema,
                   index_params=params, consistency_level="Strong", timeout=self.timeout_s)

    def _check_existing(self) -> None:
        info = self._call("describe the gallery collection", self.client.describe_collection, self.collection,
                          timeout=self.timeout_s)
        fields = {f["name"]: f for f in info.get("fields", [])}
        if set(FIELDS) - set(fields):
            raise HanEdgeError(f"collection {self.collection!r} at {self.uri} is not a han-edge gallery "
                               f"(fields {sorted(fields)}); choose another collection name")
        stored_dim = int(fields["feat"].get("params", {}).get("dim", -1))
        if stored_dim != self.dim:
            raise HanEdgeError(f"gallery {self.collection!r} at {self.uri} holds {stored_dim}-D features, "
                               f"not {self.dim}-D; use a gallery of the model's dimension")
        index = self._call("describe the gallery index", self.client.describe_index, self.collection, "feat",
                           timeout=self.timeout_s) or {}
        metric = str(index.get("metric_type", "")).upper()
        kind = str(index.get("index_type", "")).lower()
        if self.metric is None:
            self.metric = _metric_name(metric) if metric else "l2"
        elif metric and metric != METRICS[self.metric]:
            raise HanEdgeError(f"gallery {self.collection!r} at {self.uri} is indexed for {metric}, not "
                               f"{METRICS[self.metric]}; open it with metric={_metric_name(metric)!r}")
        if self.index_type is None:
            self.index_type = kind if kind in INDEX_TYPES else "flat"
        elif kind and kind != self.index_type:
            raise HanEdgeError(f"gallery {self.collection!r} at {self.uri} has a {kind.upper()} index, not "
                               f"{self.index_type.upper()}; open it with index_type={kind!r}")
        self._call("load the gallery collection", self.client.load_collection, self.collection,
                   timeout=self.timeout_s)

    # -- writing ---------------------------------------------------------------------------------------
    def _feats(self, feats, what: str) -> np.ndarray:
        from han_edge.arrays import to_numpy

        feats = np.asarray(to_numpy(feats) if not isinstance(feats, np.ndarray) else feats, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise HanEdgeError(f"{what} must be (N, {self.dim}) for this gallery, got {tuple(feats.shape)}")
        if not np.isfinite(feats).all():
            done = "; nothing was added" if what == "features" else ""
            raise HanEdgeError(f"{what} contain NaN or infinite values{done}")
        return np.ascontiguousarray(feats)

    def add(self, feats, ids, cams, times) -> None:
        feats = self._feats(feats, "features")
        ids = np.asarray(ids, np.int64).ravel()
        cams = np.asarray(cams, np.int64).ravel()
        times = np.asarray(times, np.float64).ravel()
        n = feats.shape[0]
        if not len(ids) == len(cams) == len(times) == n:
            raise HanEdgeError(f"{n} features need {n} ids, cameras and times; got {len(ids)}, {len(cams)}, {len(times)}")
        if not np.isfinite(times).all():
            raise HanEdgeError("entry times contain NaN or infinite values; nothing was added")
        with self._lock:
            for start in range(0, n, _BATCH):
                end = min(n, start + _BATCH)
                rows = [{"feat": feats[i], "pid": int(ids[i]), "cam": int(cams[i]), "time": float(times[i])}
                        for i in range(start, end)]
                self._call(f"add {end - start} entries", self.client.insert, self.collection, rows,
                           timeout=self.timeout_s)

    def _delete(self, expr: str, what: str) -> int:
        matched = self._count(expr)
        if matched:
            self._call(what, self.client.delete, self.collection, filter=expr, timeout=self.timeout_s)
        return matched

    def remove(self, ids=None, before=None) -> int:
        pids = np.unique(np.asarray(ids, np.int64).ravel()) if ids is not None else np.zeros(0, np.int64)
        if before is not None:
            before = float(before)
            if math.isnan(before):
                raise HanEdgeError("remove(before=...) got NaN; give a time in seconds since the epoch")
        removed = 0
        with self._lock:
            for start in range(0, len(pids), _BATCH):
                chunk = ", ".join(str(int(v)) for v in pids[start:start + _BATCH])
                removed += self._delete(f"pid in [{chunk}]", "remove entries by id")
            if before is not None:
                removed += self._delete(f"time < {before!r}", "remove old entries")
        return removed

    def keep_recent(self, per_id: int) -> int:
        if not isinstance(per_id, (int, np.integer)) or int(per_id) < 1:
            raise HanEdgeError(f"keep_recent needs a positive number of entries per id, got {per_id!r}")
        with self._lock:
            rows = self._scan(["pk", "pid", "time"])
            if not rows["pk"].size:
                return 0
            drop = recent_mask(rows["pid"], rows["time"], int(per_id))
            pks = rows["pk"][drop]
            for start in range(0, len(pks), _BATCH):
                chunk = pks[start:start + _BATCH]
                self._call("remove old entries of an identity", self.client.delete, self.collection,
                           ids=[int(p) for p in chunk], timeout=self.timeout_s)
            return int(len(pks))

    def flush(self) -> None:
        """Seal what was added into indexed segments now (Milvus otherwise does it in the background)."""
        with self._lock:
            self._call("flush the gallery", self.client.flush, self.collection, timeout=self.timeout_s)

    # -- reading ---------------------------------------------------------------------------------------
    def _count(self, expr: str = "") -> int:
        res = self._call("count entries", self.client.query, self.collection, filter=expr,
                         output_fields=["count(*)"], timeout=self.timeout_s)
        return int(res[0]["count(*)"]) if res else 0

    def count(self) -> int:
        return self._count()

    def _scan(self, fields: list[str]) -> dict[str, np.ndarray]:
        """Every entry's ``fields``, in insertion (primary-key) order."""
        out = {f: [] for f in fields}
        with quiet_pymilvus():
            self._scan_into(out, fields)
        dtypes = {"pk": np.int64, "pid": np.int64, "cam": np.int64, "time": np.float64, "feat": np.float32}
        arrays = {f: np.asarray(v, dtypes[f]) for f, v in out.items()}
        if "feat" in arrays and not arrays["feat"].size:
            arrays["feat"] = np.zeros((0, self.dim), np.float32)
        order = np.argsort(arrays["pk"], kind="stable")
        return {f: a[order] for f, a in arrays.items()}

    def _scan_into(self, out: dict, fields: list[str]) -> None:
        iterator = self._call("read the gallery", self.client.query_iterator, self.collection, batch_size=4096,
                              filter="", output_fields=[f for f in fields if f != "pk"], timeout=self.timeout_s)
        try:
            while True:
                page = self._call("read the gallery", iterator.next)
                if not page:
                    break
                for row in page:
                    for f in fields:
                        out[f].append(row[f])
        finally:
            iterator.close()

    def entries(self) -> Entries:
        rows = self._scan(["pk", "feat", "pid", "cam", "time"])
        return Entries(rows["feat"].reshape(-1, self.dim), rows["pid"], rows["cam"], rows["time"])

    def search(self, queries, k: int, query_cams=None):
        queries = self._feats(queries, "queries")
        if not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise HanEdgeError(f"k must be a positive whole number, got {k!r}")
        k = int(k)
        q = queries.shape[0]
        out_ids = np.full((q, k), -1, np.int64)
        out_d = np.full((q, k), np.inf, np.float32)
        if q == 0:
            return out_ids, out_d
        limit = min(k, _MAX_TOPK)
        if query_cams is None:
            groups = {-1: np.arange(q)}
        else:
            cams = np.asarray(query_cams, np.int64).ravel()
            if len(cams) != q:
                raise HanEdgeError(f"{q} queries need {q} camera ids, got {len(cams)}")
            groups = {int(c): np.flatnonzero(cams == c) for c in np.unique(cams)}
        params = {"metric_type": METRICS[self.metric]}
        if self.index_type == "hnsw":
            params["params"] = {"ef": max(self.hnsw_ef, limit)}
        # Milvus Lite's brute force (FLAT, and rows not yet sealed into an indexed segment) broadcasts a
        # (queries x entries x dim) array: 13 GB for 32 queries on 100,000 1024-D entries. Send it few queries.
        per_call = (1 if self.index_type == "flat" else _LITE_QUERIES) if self._lite_path else _MAX_QUERIES
        for cam, group in groups.items():
            expr = "" if cam == -1 else f"cam != {cam}"
            for start in range(0, len(group), per_call):
                rows = group[start:start + per_call]
                hits = self._call("search the gallery", self.client.search, self.collection,
                                  data=[queries[r] for r in rows], filter=expr, limit=limit, output_fields=["pid"],
                                  search_params=params, anns_field="feat", timeout=self.timeout_s)
                self._collect(rows, hits, k, out_ids, out_d)
        return pad_results(out_ids, out_d, k)

    def _collect(self, rows, hits, k: int, out_ids: np.ndarray, out_d: np.ndarray) -> None:
        """Milvus hits -> the protocol's ids and distances (Euclidean for l2, 1 - cos for cosine), nearest first."""
        for row, found in zip(rows, hits):
            ids = np.asarray([h["entity"]["pid"] for h in found], np.int64)
            raw = np.asarray([h["distance"] for h in found], np.float64)
            dist = np.sqrt(np.maximum(raw, 0.0)) if self.metric == "l2" else 1.0 - raw
            order = np.argsort(dist, kind="stable")
            width = min(k, len(order))
            out_ids[row, :width], out_d[row, :width] = ids[order][:width], dist[order][:width]

    def close(self) -> None:
        """Close the connection; the last index on a Milvus Lite file also stops its embedded server (and file lock)."""
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
            lite_release(self._lite_path)

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _metric_name(milvus_metric: str) -> str:
    return {v: k for k, v in METRICS.items()}.get(milvus_metric, milvus_metric.lower())
