"""Gallery: the front over a vector index — validation, timestamps, same-camera exclusion, padding, bounded history.

Indexes (``han_edge.indexes.VectorIndex``): ``"exact"`` (GEMM + top-k on the device: NumPy, CuPy or
PyTorch), ``"faiss"`` (HNSW on the CPU) and ``"milvus"`` (Milvus Lite in-process for a file path, a
Milvus server or cluster for ``http://host:19530``). One writer and several readers may share a
gallery across threads. Galleries of the exact and FAISS indexes save to a versioned ``.npz``.
"""
from __future__ import annotations

import io
import math
import time
import zipfile
from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.paths import as_path, require_file
from han_edge.indexes import Entries, VectorIndex
from han_edge.validate_arrays import COSINE_MIN_NORM

FORMAT_VERSION = 2                 # 2 added per-entry timestamps
METRICS = ("l2", "cosine")
INDEXES = ("exact", "faiss", "milvus")


class Gallery:
    """Feature store with add / remove / search / save / load.

    ``metric="l2"`` returns Euclidean distances (the paper's matching, Section 3.4); ``"cosine"``
    returns 1 - cosine similarity (``None`` with ``index="milvus"``: the stored collection's metric, l2 for a new
    one). ``device`` is 'cpu', 'cuda' or ``Embedder.placement`` (features
    then never leave the device the embedder produced them on). ``max_per_id`` keeps only the N most
    recent entries of each identity (DeepStream's ``reidHistorySize``), so a 24/7 gallery stays bounded.
    """

    def __init__(self, dim: int = 1024, metric: str = "l2", device="cpu", index: str = "exact", capacity: int = 1024,
                 uri: str | None = None, index_type: str = "flat", max_per_id: int | None = None, clock=time.time):
        from han_edge.validate import feature_dim, positive_int

        self.dim = feature_dim(dim)
        if not (metric is None and index == "milvus") and (not isinstance(metric, str) or metric not in METRICS):
            raise HanEdgeError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
        if not isinstance(index, str) or index not in INDEXES:
            raise HanEdgeError(f"unknown index {index!r}; one of {', '.join(INDEXES)}")
        self.metric, self.index = metric, index
        self.max_per_id = None if max_per_id is None else positive_int(max_per_id, "max_per_id")
        capacity = positive_int(capacity, "capacity")
        if not callable(clock):
            raise HanEdgeError(f"clock must be a function returning seconds (like time.time); got {clock!r:.40}")
        self._clock = clock
        self._index: VectorIndex = self._open_index(device, capacity, uri, index_type)
        self.metric = self._index.metric   # metric=None (milvus): the stored collection's
        self._min_norm = COSINE_MIN_NORM if self.metric == "cosine" else 0.0   # a zero row has no direction

    def _open_index(self, device, capacity, uri, index_type) -> VectorIndex:
        if self.index != "exact" and device not in ("cpu", None) and not isinstance(device, tuple):
            raise HanEdgeError(f"the {self.index} index runs on the CPU here; use device='cpu'")
        if self.index == "exact":
            from han_edge.indexes import ExactIndex
            return ExactIndex(self.dim, self.metric, device, capacity)
        if self.index == "faiss":
            from han_edge.faiss_index import FaissIndex
            return FaissIndex(self.dim, self.metric)
        if uri is None:
            raise HanEdgeError("the milvus index needs uri= (a local file for Milvus Lite, or http://host:19530)")
        from han_edge.milvus_index import MilvusIndex
        return MilvusIndex(dim=self.dim, metric=self.metric, uri=uri, index_type=index_type)

    def __len__(self) -> int:
        return self._index.count()

    def close(self) -> None:
        """Release the index's files, connections and device memory (Milvus Lite: the embedded server)."""
        self._index.close()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend(self) -> VectorIndex:
        return self._index

    # -- writing ---------------------------------------------------------------------------------------
    def add(self, ids, feats, cams=None, times=None) -> None:
        """Append features with their identity ids, camera ids (-1 unknown) and times (default: now)."""
        from han_edge.validate import ids_array, real_number
        from han_edge.validate_arrays import features_array, times_array

        feats = features_array(feats, self.dim, min_norm=self._min_norm)
        n = feats.shape[0]
        ids = ids_array(ids, n)
        cams = np.full(n, -1, np.int64) if cams is None else ids_array(cams, n, "camera ids")
        if times is None:
            times = np.full(n, real_number(self._clock(), "the gallery's clock"), np.float64)
        else:
            times = times_array(times, n)
        if n:
            self._index.add(feats, ids, cams, times)
            if self.max_per_id is not None:
                self._index.keep_recent(self.max_per_id)

    def remove(self, ids) -> int:
        """Remove every entry of the given identity ids; returns how many were removed."""
        from han_edge.validate import ids_array

        try:
            one = np.ndim(ids) == 0
        except ValueError:                  # a ragged list: ids_array names its bad item
            one = False
        if one:
            ids = [ids[()] if isinstance(ids, np.ndarray) else ids]
        return self._index.remove(ids=ids_array(ids))

    def remove_older_than(self, when: float) -> int:
        """Remove entries added before ``when`` (seconds since the epoch); returns how many."""
        from han_edge.validate import _describe, real_number

        try:
            when = real_number(when, "time")
        except HanEdgeError:
            raise HanEdgeError(f"remove_older_than needs a finite time in seconds, got {_describe(when)}") from None
        return self._index.remove(before=when)

    def keep_recent(self, per_id: int) -> int:
        """Keep the ``per_id`` most recent entries of each identity; returns how many were removed."""
        from han_edge.validate import positive_int

        return self._index.keep_recent(positive_int(per_id, "per_id"))

    # -- reading ---------------------------------------------------------------------------------------
    def search(self, queries, k: int = 5, query_cams=None, exclude_same_camera: bool = False):
        """(ids, distances) as host arrays, each (Q, min(k, size)), nearest first.

        A 1-D query is one query. With ``exclude_same_camera`` entries from the query's camera are
        skipped (a query camera of -1 excludes nothing); rows with fewer candidates than k are padded
        with id -1 and distance inf.
        """
        from han_edge.validate import ids_array, positive_int
        from han_edge.validate_arrays import features_array

        k = positive_int(k, "k")
        if not isinstance(exclude_same_camera, (bool, np.bool_)):
            raise HanEdgeError(f"exclude_same_camera must be True or False; got {exclude_same_camera!r:.40}")
        if getattr(queries, "ndim", None) == 1 or (isinstance(queries, (list, tuple)) and queries
                                                   and np.ndim(queries[0]) == 0):
            queries = queries[None, ...] if hasattr(queries, "ndim") else [queries]
        queries = features_array(queries, self.dim, "queries", self._min_norm)
        size = len(self)
        if size == 0:
            raise HanEdgeError("the gallery is empty: add features before searching")
        cams = None if query_cams is None else ids_array(query_cams, queries.shape[0], "query camera ids")
        if exclude_same_camera and cams is None:
            raise HanEdgeError("exclude_same_camera needs query_cams")
        if not exclude_same_camera:
            cams = None                                  # checked (a wrong length is a bug), but not used
        return self._index.search(queries, min(k, size), cams)

    def entries(self) -> Entries:
        """A host copy of every entry: features, ids, cameras, times."""
        return self._index.entries()

    def distances(self, queries, feats=None):
        """(Q, G) host distances in the gallery's metric, to ``feats`` or to every entry (for evaluation).

        Both are checked as ``search`` checks its queries: (N, dim), real and finite.
        """
        import array_api_compat.numpy as xp

        from han_edge.arrays import to_numpy
        from han_edge.indexes import distances
        from han_edge.validate_arrays import features_array

        queries = to_numpy(features_array(queries, self.dim, "queries", self._min_norm))
        feats = self.entries().feats if feats is None else to_numpy(features_array(feats, self.dim, min_norm=self._min_norm))
        return distances(xp, queries, feats, self.metric)

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Versioned .npz, written atomically: a crash or a full disk keeps the old file."""
        from han_edge.fileio import atomic_write_bytes

        path = as_path(path, "gallery file")
        e = self.entries()
        buffer = io.BytesIO()
        np.savez(buffer, format_version=np.int64(FORMAT_VERSION), dim=np.int64(self.dim),
                 metric=np.array(self.metric), feats=e.feats, ids=e.ids, cams=e.cams, times=e.times)
        atomic_write_bytes(path, buffer.getvalue(), "gallery file")

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None, device="cpu", index: str = "exact") -> "Gallery":
        """A saved gallery; refuses a corrupt file or one of another dimension with a clear error."""
        from han_edge.validate import MAX_FEATURE_DIM, feature_dim

        path = as_path(path, "gallery file")
        if dim is not None:
            dim = feature_dim(dim)
        require_file(path, "gallery file")
        try:
            with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:   # closed on any error
                _check_claims(data, path)
                data_version = _scalar(data, "format_version", "iuf")     # 2.5 is refused below, True here
                version = int(data_version)
                stored_dim, metric = int(_scalar(data, "dim", "iu")), str(_scalar(data, "metric", "U"))
                feats, ids, cams = data["feats"], data["ids"], data["cams"]
                times = data["times"] if "times" in data.files else np.zeros(len(ids))
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, TypeError, OverflowError):
            raise HanEdgeError(f"gallery file {path} is corrupt or not a han-edge gallery") from None
        if not 1 <= version <= FORMAT_VERSION or version != float(data_version):
            raise HanEdgeError(f"gallery file {path} has format {data_version}; this han-edge reads 1 to {FORMAT_VERSION}")
        if dim is not None and stored_dim != dim:
            raise HanEdgeError(f"gallery file {path} holds {stored_dim}-D features, expected {dim}-D")
        if ids.ndim != 1 or cams.shape != ids.shape or times.shape != ids.shape or \
                feats.shape != (len(ids), stored_dim) or feats.dtype.kind != "f" or ids.dtype.kind not in "iu" \
                or cams.dtype.kind not in "iu" or times.dtype.kind not in "iuf":
            raise HanEdgeError(f"gallery file {path} is inconsistent: {feats.shape} {feats.dtype} features, "
                               f"ids {ids.shape} {ids.dtype}, cameras {cams.shape} {cams.dtype}, "
                               f"times {times.shape} {times.dtype}")
        if metric not in METRICS or not 1 <= stored_dim <= MAX_FEATURE_DIM:
            raise HanEdgeError(f"gallery file {path} is inconsistent: metric {metric!r:.20}, dimension {stored_dim}")
        gallery = cls(stored_dim, metric, device, index, capacity=max(len(ids), 1))
        try:
            if len(ids):
                gallery.add(ids, feats, cams, times)
        except HanEdgeError as err:
            raise HanEdgeError(f"gallery file {path}: {err}") from None
        return gallery


def _scalar(data, key: str, kinds: str):
    """A 0-d member of one of the dtype kinds, else ValueError (the file is corrupt): no bool or string coerced."""
    value = data[key]
    if value.ndim != 0 or value.dtype.kind not in kinds:
        raise ValueError(f"{key} is {value.dtype} {value.shape}")
    return value[()]


_ZIP_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


def _check_claims(data, path: Path) -> None:
    """Refuse a member whose .npy header claims more bytes than the member holds, before NumPy allocates them."""
    from numpy.lib import format as npy

    names, archive = set(data.zip.namelist()), path.stat().st_size
    for key in ("format_version", "dim", "metric", "feats", "ids", "cams", "times"):
        if f"{key}.npy" not in names:
            continue                                              # missing: a KeyError when read
        info = data.zip.getinfo(f"{key}.npy")
        with data.zip.open(info) as member:
            read_header = getattr(npy, "read_array_header_{}_{}".format(*npy.read_magic(member)), None)
            if read_header is None:
                raise ValueError(f"{key}: unknown .npy version")
            shape, _, dtype = read_header(member)
            # the zip's own sizes are claims too: bounded by the archive's size (deflate expands at most 1032:1)
            ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}.get(info.compress_type)
            if ratio is None:   # bzip2, LZMA: no bound on what a member expands to, and np.savez writes neither
                raise HanEdgeError(f"gallery file {path} is not a han-edge gallery: its {key} is compressed with a "
                                   f"method han-edge never writes ({_ZIP_METHODS.get(info.compress_type, info.compress_type)})")
            held = min(info.file_size, min(info.compress_size, archive) * ratio)
            claimed = math.prod(shape) * dtype.itemsize
            if claimed > held - member.tell():
                raise HanEdgeError(f"gallery file {path} is corrupt or not a han-edge gallery: its {key} claim "
                                   f"{_size(claimed)} in a {_size(archive)} file")


def _size(n: int) -> str:
    for unit, power in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << power:
            return f"{n / (1 << power):.1f} {unit}"
    return f"{n} bytes"
