"""Gallery: identities' features kept on the device (CuPy) or host (NumPy), exact top-k by one GEMM.

Search is exact (GEMM + partial sort). For galleries too large for that, ``index="faiss"``
answers through a FAISS HNSW index behind the same API (CPU). Writers hold a lock; searches
work on a snapshot, so one writer and several readers may share a gallery across threads.
"""
from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError

FORMAT_VERSION = 1
METRICS = ("l2", "cosine")


class Gallery:
    """Feature store with add / remove / search / save / load.

    ``metric="l2"`` returns Euclidean distances (the paper's matching, Section 3.4);
    ``"cosine"`` returns 1 - cosine similarity.
    """

    def __init__(self, dim: int = 1024, metric: str = "l2", device: str = "cpu", index: str = "exact",
                 capacity: int = 1024):
        from han_edge.cuda import array_module

        if metric not in METRICS:
            raise HanEdgeError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
        if index not in ("exact", "faiss"):
            raise HanEdgeError(f"unknown index {index!r}; 'exact' or 'faiss'")
        if index == "faiss" and device != "cpu":
            raise HanEdgeError("the FAISS index runs on the CPU here; use device='cpu' with index='faiss'")
        self.dim, self.metric, self.device, self.index = dim, metric, device, index
        self.xp = array_module(device)
        self._feats = self.xp.zeros((max(capacity, 1), dim), self.xp.float32)
        self._ids = np.zeros(max(capacity, 1), np.int64)
        self._cams = np.zeros(max(capacity, 1), np.int64)
        self._sq_norms = self.xp.zeros(max(capacity, 1), self.xp.float32)   # cached: not recomputed per search
        self._size = 0
        self._lock = threading.Lock()
        self._faiss = None

    def __len__(self) -> int:
        return self._size

    # -- writing ---------------------------------------------------------------------------------------
    def add(self, ids, feats, cams=None) -> None:
        """Append features with their identity ids (and camera ids, -1 when unknown)."""
        ids = np.asarray(ids, np.int64).ravel()
        if self.xp is np:
            feats = _to_numpy(feats)     # features computed on the GPU, gallery on the host
        feats = self.xp.asarray(feats, dtype=self.xp.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise HanEdgeError(f"gallery holds {self.dim}-D features, got an array of shape {tuple(feats.shape)}")
        if len(ids) != feats.shape[0]:
            raise HanEdgeError(f"{len(ids)} ids for {feats.shape[0]} features")
        cams = np.full(len(ids), -1, np.int64) if cams is None else np.asarray(cams, np.int64).ravel()
        if len(cams) != len(ids):
            raise HanEdgeError(f"{len(cams)} camera ids for {len(ids)} features")
        if not bool(self.xp.isfinite(feats).all()):
            raise HanEdgeError("features contain NaN or infinite values")
        with self._lock:
            n, end = self._size, self._size + len(ids)
            if end > len(self._ids):
                self._grow(end)
            # Rows past the current size are invisible to readers' snapshots: safe to write in place.
            self._feats[n:end] = feats
            self._sq_norms[n:end] = (feats * feats).sum(1)
            self._ids[n:end] = ids
            self._cams[n:end] = cams
            self._size = end
            if self._faiss is not None:
                self._faiss.add(self._prepare_faiss(feats))

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * len(self._ids))   # doubling: amortised O(1) copies per add
        feats = self.xp.zeros((capacity, self.dim), self.xp.float32)
        feats[:self._size] = self._feats[:self._size]
        sq_norms = self.xp.zeros(capacity, self.xp.float32)
        sq_norms[:self._size] = self._sq_norms[:self._size]
        ids, cams = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
        ids[:self._size], cams[:self._size] = self._ids[:self._size], self._cams[:self._size]
        self._feats, self._ids, self._cams, self._sq_norms = feats, ids, cams, sq_norms

    def remove(self, ids) -> int:
        """Remove every entry of the given identity ids; returns how many were removed."""
        drop = np.isin(self._ids[:self._size], np.asarray(ids, np.int64).ravel())
        removed = int(drop.sum())
        if removed == 0:
            return 0
        with self._lock:
            keep = np.flatnonzero(~drop)
            # New arrays rather than compaction in place: snapshots held by readers stay valid.
            capacity = len(self._ids)
            feats = self.xp.zeros((capacity, self.dim), self.xp.float32)
            feats[:len(keep)] = self._feats[self.xp.asarray(keep)]
            sq_norms = self.xp.zeros(capacity, self.xp.float32)
            sq_norms[:len(keep)] = self._sq_norms[self.xp.asarray(keep)]
            ids, cams = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
            ids[:len(keep)], cams[:len(keep)] = self._ids[keep], self._cams[keep]
            self._feats, self._ids, self._cams, self._sq_norms = feats, ids, cams, sq_norms
            self._size = len(keep)
            self._faiss = None   # HNSW cannot delete: rebuilt at the next search
        return removed

    # -- reading ---------------------------------------------------------------------------------------
    def _snapshot(self):
        with self._lock:
            n = self._size
            return self._feats[:n], self._ids[:n], self._cams[:n]

    def _search_view(self):
        """Features, ids, cameras and cached squared norms of one consistent moment."""
        with self._lock:
            n = self._size
            return self._feats[:n], self._ids[:n], self._cams[:n], self._sq_norms[:n]

    def search(self, queries, k: int = 5, query_cams=None, exclude_same_camera: bool = False):
        """(ids, distances), each (Q, min(k, size)), nearest first.

        With ``exclude_same_camera`` gallery entries from the query's camera are skipped; rows
        with fewer candidates than k are padded with id -1 and distance inf.
        """
        xp = self.xp
        feats, ids, cams, sq_norms = self._search_view()
        if len(ids) == 0:
            raise HanEdgeError("the gallery is empty: add features before searching")
        if xp is np:
            queries = _to_numpy(queries)
        queries = xp.asarray(queries, dtype=xp.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise HanEdgeError(f"queries must be (Q, {self.dim}), got shape {tuple(queries.shape)}")
        if k < 1:
            raise HanEdgeError(f"k must be at least 1, got {k}")
        k = min(k, len(ids))
        if exclude_same_camera and query_cams is None:
            raise HanEdgeError("exclude_same_camera needs query_cams")
        if self.index == "faiss" and not exclude_same_camera:
            return self._search_faiss(queries, k, ids)
        dist = self.distances(queries, feats, sq_norms)
        if exclude_same_camera:
            same = xp.asarray(np.asarray(query_cams, np.int64).ravel()[:, None] == cams[None, :])
            dist = xp.where(same, xp.inf, dist)
        if k < dist.shape[1]:
            part = xp.argpartition(dist, k - 1, axis=1)[:, :k]
        else:
            part = xp.broadcast_to(xp.arange(dist.shape[1]), dist.shape).copy()
        part_d = xp.take_along_axis(dist, part, 1)
        order = xp.argsort(part_d, axis=1)
        top = xp.take_along_axis(part, order, 1)
        top_d = xp.take_along_axis(part_d, order, 1)
        top, top_d = _to_numpy(top), _to_numpy(top_d)
        out_ids = ids[top]
        out_ids[~np.isfinite(top_d)] = -1
        return out_ids, top_d

    def distances(self, queries, feats, sq_norms=None):
        """(Q, G) distances in the gallery's metric from one GEMM (``sq_norms``: the rows' cached |g|^2)."""
        xp = self.xp
        dots = queries @ feats.T
        g_sq = (feats * feats).sum(1) if sq_norms is None else sq_norms
        q_sq = (queries * queries).sum(1)
        if self.metric == "cosine":
            return 1 - dots / xp.maximum(xp.sqrt(q_sq[:, None] * g_sq[None, :]), 1e-12)
        dots *= -2
        dots += q_sq[:, None]
        dots += g_sq[None, :]
        return xp.sqrt(xp.maximum(dots, 0, out=dots), out=dots)

    # -- FAISS -----------------------------------------------------------------------------------------
    def _prepare_faiss(self, feats: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(feats, np.float32)
        if self.metric == "cosine":
            feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        return feats

    def _search_faiss(self, queries, k, ids):
        try:
            import faiss
        except ImportError:
            raise HanEdgeError("index='faiss' needs faiss: pip install faiss-cpu") from None
        if self._faiss is None:
            feats, _, _ = self._snapshot()
            index = faiss.IndexHNSWFlat(self.dim, 32)
            index.hnsw.efSearch = 128
            index.add(self._prepare_faiss(feats))
            self._faiss = index
        dist, rows = self._faiss.search(self._prepare_faiss(queries), k)
        dist = np.sqrt(np.maximum(dist, 0))   # FAISS L2 is squared
        if self.metric == "cosine":
            dist = dist ** 2 / 2              # unit vectors: |a-b|^2 = 2 - 2cos
        out = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
        return out, np.where(rows >= 0, dist, np.inf).astype(np.float32)

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Versioned .npz, written to a temporary file then renamed: a crash keeps the old file."""
        path = Path(path)
        feats, ids, cams = self._snapshot()
        buffer = io.BytesIO()
        np.savez(buffer, format_version=np.int64(FORMAT_VERSION), dim=np.int64(self.dim),
                 metric=np.array(self.metric), feats=_to_numpy(feats), ids=ids, cams=cams)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, device: str = "cpu", index: str = "exact") -> "Gallery":
        """A saved gallery; refuses a corrupt file or one of another dimension with a clear error."""
        path = Path(path)
        if not path.is_file():
            raise HanEdgeError(f"gallery file {path} not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                stored_dim, metric = int(data["dim"]), str(data["metric"])
                feats, ids, cams = data["feats"], data["ids"], data["cams"]
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as err:
            raise HanEdgeError(f"gallery file {path} is corrupt or not a han-edge gallery ({err})") from None
        if version > FORMAT_VERSION:
            raise HanEdgeError(f"gallery file {path} has format {version}; this han-edge reads {FORMAT_VERSION}")
        if dim is not None and stored_dim != dim:
            raise HanEdgeError(f"gallery file {path} holds {stored_dim}-D features, expected {dim}-D")
        if feats.shape != (len(ids), stored_dim) or len(cams) != len(ids):
            raise HanEdgeError(f"gallery file {path} is inconsistent: {feats.shape} features, {len(ids)} ids")
        gallery = cls(stored_dim, metric, device, index, capacity=max(len(ids), 1))
        if len(ids):
            gallery.add(ids, feats, cams)
        return gallery


def _to_numpy(array) -> np.ndarray:
    from han_edge.cuda import to_host

    return to_host(array)
