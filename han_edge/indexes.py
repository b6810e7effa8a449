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
