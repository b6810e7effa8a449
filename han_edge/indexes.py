"""The vector-index protocol behind ``Gallery``: storage and k-nearest search of (feature, id, camera, time).

``Gallery`` (the front) validates input, assigns timestamps, pads results and bounds history; an index
only stores and searches. Implementations: ``ExactIndex`` (array API: NumPy, CuPy or PyTorch, saved as
``.npz``), ``FaissIndex`` (HNSW, CPU) and ``han_edge.milvus_index.MilvusIndex`` (Milvus Lite or a cluster).

Conventions every index keeps:
- ``metric`` "l2" returns Euclidean distances (not squared), "cosine" returns 1 - cosine similarity;
- ``search`` returns host NumPy ``(ids int64 (Q, k), distances float32 (Q, k))``, nearest first, with
  ``k <= count()``; rows with fewer candidates (same-camera exclusion) are padded with -1 / inf;
- with ``query_cams`` given, entries whose camera equals the query's are excluded (cameras -1 never match);
- one writer and many readers may use an index from several threads at once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class Entries:
    """Everything an index holds, on the host: what ``Gallery.entries()`` and ``save`` use."""

    feats: np.ndarray       # (N, dim) float32
    ids: np.ndarray         # (N,) int64 identity ids
    cams: np.ndarray        # (N,) int64 camera ids, -1 unknown
    times: np.ndarray       # (N,) float64 seconds since the epoch


class VectorIndex(ABC):
    dim: int
    metric: str

    @abstractmethod
    def add(self, feats, ids: np.ndarray, cams: np.ndarray, times: np.ndarray) -> None:
        """Append validated entries: ``feats`` (N, dim) float32 (host or the index's device), the rest host arrays."""

    @abstractmethod
    def remove(self, ids: np.ndarray | None = None, before: float | None = None) -> int:
        """Remove entries of the given identities and/or older than ``before``; returns how many."""

    @abstractmethod
    def keep_recent(self, per_id: int) -> int:
        """Keep only the ``per_id`` most recent entries of each identity; returns how many were removed."""

    @abstractmethod
    def search(self, queries, k: int, query_cams: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest ``k`` entries per query row (see the module's conventions)."""

    @abstractmethod
    def count(self) -> int:
        """Number of entries."""

    @abstractmethod
    def entries(self) -> Entries:
        """A host copy of every entry."""

    def close(self) -> None:
        """Release files, connections and device memory."""


def pad_results(ids: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded to k columns with id -1 / distance inf; infinite distances get id -1."""
    q = ids.shape[0]
    out_ids = np.full((q, k), -1, np.int64)
    out_d = np.full((q, k), np.inf, np.float32)
    width = min(k, ids.shape[1])
    out_ids[:, :width], out_d[:, :width] = ids[:, :width], dists[:, :width]
    out_ids[~np.isfinite(out_d)] = -1
    return out_ids, out_d


def recent_mask(ids: np.ndarray, times: np.ndarray, per_id: int) -> np.ndarray:
    """True for entries outside the ``per_id`` most recent of their identity (ties: later rows are newer)."""
    order = np.lexsort((np.arange(len(ids)), times, ids))          # by id, then time, then insertion
    sorted_ids = ids[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
    counts = np.diff(np.r_[starts, len(ids)])
    rank_from_end = np.repeat(counts, counts) - (np.arange(len(ids)) - np.repeat(starts, counts)) - 1
    drop = np.zeros(len(ids), bool)
    drop[order] = rank_from_end >= per_id
    return drop


def resolve_device(device):
    """(xp, device) from 'cpu', 'cuda' or an explicit (xp, device) pair (e.g. ``Embedder.placement``)."""
    from han_edge.errors import HanEdgeError

    if isinstance(device, tuple) and len(device) == 2:
        xp = device[0]
        if not all(hasattr(xp, name) for name in ("asarray", "zeros", "take", "matrix_transpose")):
            raise HanEdgeError(f"device must be an (array namespace, device) pair such as Embedder.placement; "
                               f"{xp!r:.40} is not an array namespace")
        return device
    if device == "cpu":
        import array_api_compat.numpy as xp
        return xp, "cpu"
    if device == "cuda":
        from han_edge.cuda import device_arrays
        return device_arrays()
    raise HanEdgeError(f"device must be 'cpu', 'cuda' or an (array namespace, device) pair, got {device!r}")


SEARCH_BYTES = 256 * 2**20         # temporaries of one ExactIndex search chunk (the (rows, n) distance work)
BYTES_PER_DISTANCE = 32            # float32 dots/distances/mask and int64 top-k indices per (query, entry) pair


class ExactIndex(VectorIndex):
    """Exact search by GEMM and a device top-k, written against the array API (NumPy, CuPy, PyTorch).

    Features, squared norms, ids and cameras live on the device; a search sends back only the (Q, k)
    ids and distances. Writers hold a lock; readers take a snapshot of array references under it and
    never see a half-written row (rows past the snapshot's size are invisible to them).

    Memory of a search is bounded whatever the number of queries Q: queries run in chunks of
    ``max(1, search_bytes // (BYTES_PER_DISTANCE * n))`` rows against the n entries, so the distance
    matrix and top-k work never exceed about ``search_bytes`` (256 MiB by default; one query row at a time
    when a single row is larger) plus the (Q, k) results. 100,000 queries x 100,000 entries: chunks of
    83 queries (83 x 100,000 distances, about 256 MiB of work each) instead of one 40 GB matrix (NumPy,
    measured with tracemalloc: 4,000 queries x 5,000 entries peak at 97 MiB with the 256 MiB default, 1.8 MiB
    with a 4 MiB budget, 229 MiB unchunked).
    """

    def __init__(self, dim: int, metric: str = "l2", device="cpu", capacity: int = 1024):
        import threading

        self.dim, self.metric = dim, metric
        self.xp, self.device = resolve_device(device)
        self.search_bytes = SEARCH_BYTES
        self._lock = threading.Lock()
        self._size = 0
        self._alloc_checked(max(int(capacity), 1))

    def _alloc_checked(self, capacity: int, keep: int = 0) -> None:
        """``_alloc`` with one sentence when the device cannot hold it (the old arrays stay untouched)."""
        from han_edge.errors import HanEdgeError
        from han_edge.validate import reason

        try:
            self._alloc(capacity, keep)
        except MemoryError:
            size = capacity * (self.dim + 3) * 4 / 2**30
            raise HanEdgeError(f"not enough memory for a gallery of {capacity} x {self.dim} features "
                               f"({size:.1f} GiB) on {self.device}") from None
        except (TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise HanEdgeError(f"cannot allocate the gallery on device {self.device!r:.40}: {reason(err)}") from None

    def _alloc(self, capacity: int, keep: int = 0) -> None:
        xp, dev = self.xp, self.device
        from han_edge.cuda import zeros            # CuPy ignores device=: allocated under the device's context

        feats = zeros(xp, (capacity, self.dim), xp.float32, dev)
        sq = zeros(xp, (capacity,), xp.float32, dev)
        ids_d = zeros(xp, (capacity,), xp.int64, dev)
        cams_d = zeros(xp, (capacity,), xp.int64, dev)
        ids, cams, times = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64), np.zeros(capacity)
        if keep:
            feats[:keep, ...], sq[:keep] = self._feats[:keep, ...], self._sq[:keep]
            ids_d[:keep], cams_d[:keep] = self._ids_d[:keep], self._cams_d[:keep]
            ids[:keep], cams[:keep], times[:keep] = self._ids[:keep], self._cams[:keep], self._times[:keep]
        self._feats, self._sq, self._ids_d, self._cams_d = feats, sq, ids_d, cams_d
        self._ids, self._cams, self._times = ids, cams, times

    def count(self) -> int:
        return self._size

    def add(self, feats, ids, cams, times) -> None:
        from han_edge.arrays import ensure_on, from_numpy

        xp = self.xp
        feats = ensure_on(xp, feats, self.device, xp.float32)
        with self._lock:
            n, end = self._size, self._size + len(ids)
            if end > self._ids.shape[0]:
                self._alloc_checked(max(end, 2 * self._ids.shape[0]), keep=n)   # doubling: amortised O(1) per add
            self._feats[n:end, ...] = feats
            self._sq[n:end] = xp.sum(feats * feats, axis=1)
            self._ids_d[n:end] = from_numpy(xp, ids, self.device)
            self._cams_d[n:end] = from_numpy(xp, cams, self.device)
            self._ids[n:end], self._cams[n:end], self._times[n:end] = ids, cams, times
            self._size = end

    def _keep_rows(self, drop: np.ndarray) -> int:
        """Rebuild from the kept rows into new arrays: snapshots held by readers stay valid."""
        from han_edge.arrays import from_numpy

        removed = int(drop.sum())
        if removed:
            keep = np.flatnonzero(~drop)
            rows = from_numpy(self.xp, keep, self.device)
            old = (self._feats, self._sq, self._ids_d, self._cams_d, self._ids, self._cams, self._times)
            self._alloc(self._ids.shape[0])
            take = self.xp.take
            self._feats[:len(keep), ...] = take(old[0], rows, axis=0)
            self._sq[:len(keep)], self._ids_d[:len(keep)] = take(old[1], rows, axis=0), take(old[2], rows, axis=0)
            self._cams_d[:len(keep)] = take(old[3], rows, axis=0)
            self._ids[:len(keep)], self._cams[:len(keep)], self._times[:len(keep)] = old[4][keep], old[5][keep], old[6][keep]
            self._size = len(keep)
        return removed

    def remove(self, ids=None, before=None) -> int:
        with self._lock:
            n = self._size
            drop = np.zeros(n, bool)
            if ids is not None:
                drop |= np.isin(self._ids[:n], ids)
            if before is not None:
                drop |= self._times[:n] < before
            return self._keep_rows(drop)

    def keep_recent(self, per_id: int) -> int:
        with self._lock:
            n = self._size
            return self._keep_rows(recent_mask(self._ids[:n], self._times[:n], per_id))

    def _view(self):
        with self._lock:
            n = self._size
            return n, self._feats[:n, ...], self._sq[:n], self._ids_d[:n], self._cams_d[:n]

    def search(self, queries, k, query_cams=None):
        from han_edge.arrays import ensure_on, from_numpy, smallest_k, to_numpy

        xp = self.xp
        n, feats, sq, ids_d, cams_d = self._view()
        q = queries.shape[0]
        if n == 0 or q == 0:                  # no queries, or a writer emptied the index since the caller looked
            return pad_results(np.zeros((q, 0), np.int64), np.zeros((q, 0), np.float32), k)
        queries = ensure_on(xp, queries, self.device, xp.float32)
        qc = None if query_cams is None else from_numpy(xp, np.asarray(query_cams, np.int64), self.device)
        step = max(1, int(self.search_bytes) // (BYTES_PER_DISTANCE * n))
        ids_out, dist_out = [], []
        for start in range(0, q, step):
            stop = min(start + step, q)
            chunk = queries[start:stop, ...]
            dist = distances(xp, chunk, feats, self.metric, sq)
            if qc is not None:
                qcc = qc[start:stop]
                same = (qcc[:, None] == cams_d[None, :]) & (qcc[:, None] != -1)
                dist = xp.where(same, xp.asarray(float("inf"), dtype=xp.float32, device=self.device), dist)
            rows, top_d = smallest_k(xp, dist, k)
            del dist
            flat = xp.reshape(rows, (-1,))
            top_ids = xp.reshape(xp.take(ids_d, flat, axis=0), rows.shape)
            # The GEMM form loses precision near 0 (|q|^2 + |g|^2 - 2q.g); recompute the k winners directly.
            chosen = xp.reshape(xp.take(feats, flat, axis=0), (rows.shape[0], rows.shape[1], self.dim))
            exact = pair_distances(xp, chunk[:, None, :], chosen, self.metric)
            top_d = xp.where(xp.isinf(top_d), top_d, exact)
            ids_out.append(to_numpy(top_ids))                       # only ids and distances come back
            dist_out.append(to_numpy(top_d))
        return pad_results(np.concatenate(ids_out), np.concatenate(dist_out), k)

    def entries(self) -> Entries:
        from han_edge.arrays import to_numpy

        with self._lock:
            n = self._size
            return Entries(to_numpy(self._feats[:n, ...]).copy(), self._ids[:n].copy(), self._cams[:n].copy(),
                           self._times[:n].copy())


def pair_distances(xp, a, b, metric: str):
    """Distances between matching rows of a and b (broadcast over leading axes), computed directly."""
    if metric == "cosine":
        dot = xp.sum(a * b, axis=-1)
        norms = xp.sqrt(xp.sum(a * a, axis=-1)) * xp.sqrt(xp.sum(b * b, axis=-1))   # not sqrt(|a|^2 |b|^2): overflows
        return 1 - dot / _at_least(xp, norms, 1e-12)
    diff = a - b
    return xp.sqrt(xp.sum(diff * diff, axis=-1))


def distances(xp, queries, feats, metric: str, sq_norms=None):
    """(Q, G) distances from one GEMM: Euclidean for "l2", 1 - cosine for "cosine" (``sq_norms``: cached |g|^2)."""
    dots = queries @ xp.matrix_transpose(feats)
    g_sq = xp.sum(feats * feats, axis=1) if sq_norms is None else sq_norms
    q_sq = xp.sum(queries * queries, axis=1)
    if metric == "cosine":
        # |q| |g|, not sqrt(|q|^2 |g|^2): that product overflows float32 for norms from ~4e9 (every distance 1)
        return 1 - dots / _at_least(xp, xp.sqrt(q_sq)[:, None] * xp.sqrt(g_sq)[None, :], 1e-12)
    return xp.sqrt(_at_least(xp, q_sq[:, None] + g_sq[None, :] - 2 * dots, 0.0))


def _at_least(xp, x, low: float):
    """max(x, low) elementwise (``xp.clip`` is a masked copy on CuPy's array-api-compat; maximum is one kernel)."""
    return xp.maximum(x, xp.asarray(low, dtype=x.dtype, device=getattr(x, "device", None)))
