"""FAISS HNSW behind the vector-index protocol (CPU): approximate search for galleries too large for a GEMM.

One lock serialises every FAISS call (an HNSW graph must not be searched while it is being added to),
so one writer and many readers are safe. HNSW cannot delete: removals rebuild the graph at the next
search from the host copy kept here. Same-camera exclusion runs inside FAISS with an ID selector per
query camera, never by falling back to another index.
"""
from __future__ import annotations

import threading

import numpy as np

from han_edge.errors import MissingDependencyError
from han_edge.indexes import Entries, VectorIndex, pad_results, recent_mask


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("index='faiss' needs FAISS: pip install faiss-cpu") from None
    return faiss


class FaissIndex(VectorIndex):
    def __init__(self, dim: int, metric: str = "l2", m: int = 32, ef_search: int = 128):
        self._faiss_module = _faiss()
        self.dim, self.metric, self.m, self.ef_search = dim, metric, m, ef_search
        self._lock = threading.RLock()
        self._entries = Entries(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                np.zeros(0))
        self._index = None

    def _prepare(self, feats) -> np.ndarray:
        feats = np.ascontiguousarray(feats, np.float32)
        if self.metric == "cosine":
            feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return feats

    def _graph(self):
        if self._index is None:
            index = self._faiss_module.IndexHNSWFlat(self.dim, self.m)
            index.hnsw.efSearch = self.ef_search
            if len(self._entries.ids):
                index.add(self._prepare(self._entries.feats))
            self._index = index
        return self._index

    def count(self) -> int:
        return len(self._entries.ids)

    def add(self, feats, ids, cams, times) -> None:
        from han_edge.arrays import to_numpy

        feats = to_numpy(feats).astype(np.float32, copy=False)
        with self._lock:
            e = self._entries
            self._entries = Entries(np.concatenate([e.feats, feats]), np.concatenate([e.ids, ids]),
                                    np.concatenate([e.cams, cams]), np.concatenate([e.times, times]))
            if self._index is not None:
                self._index.add(self._prepare(feats))

    def _drop(self, drop: np.ndarray) -> int:
        if drop.any():
            keep = ~drop
            e = self._entries
            self._entries = Entries(e.feats[keep], e.ids[keep], e.cams[keep], e.times[keep])
            self._index = None                   # rebuilt at the next search
        return int(drop.sum())

    def remove(self, ids=None, before=None) -> int:
        with self._lock:
            e = self._entries
            drop = np.zeros(len(e.ids), bool)
            if ids is not None:
                drop |= np.isin(e.ids, ids)
            if before is not None:
                drop |= e.times < before
            return self._drop(drop)

    def keep_recent(self, per_id: int) -> int:
        with self._lock:
            return self._drop(recent_mask(self._entries.ids, self._entries.times, per_id))

    def search(self, queries, k, query_cams=None):
        from han_edge.arrays import to_numpy

        faiss = self._faiss_module
        queries = self._prepare(to_numpy(queries))
        out_rows = np.full((len(queries), k), -1, np.int64)
        out_d = np.full((len(queries), k), np.inf, np.float32)
        with self._lock:
            index, e = self._graph(), self._entries
            if len(e.ids) == 0 or len(queries) == 0:   # a writer emptied the index since the caller looked
                return pad_results(np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32), k)
            groups = [(np.arange(len(queries)), None)] if query_cams is None else \
                [(np.flatnonzero(query_cams == c), c) for c in np.unique(query_cams)]
            for rows, cam in groups:
                params = None
                if cam is not None and cam != -1:
                    excluded = np.flatnonzero(e.cams == cam).astype(np.int64)
                    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
                    params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
                d, found = index.search(queries[rows], k, params=params)
                out_rows[rows], out_d[rows] = found, d
            ids = np.where(out_rows >= 0, e.ids[np.maximum(out_rows, 0)], -1)
        dist = np.sqrt(np.maximum(out_d, 0))            # FAISS L2 is squared
        if self.metric == "cosine":
            dist = dist ** 2 / 2                          # unit vectors: |a-b|^2 = 2 - 2cos
        dist = np.where(out_rows >= 0, dist, np.inf).astype(np.float32)
        return pad_results(ids, dist, k)

    def entries(self) -> Entries:
        with self._lock:
            e = self._entries
            return Entries(e.feats.copy(), e.ids.copy(), e.cams.copy(), e.times.copy())
