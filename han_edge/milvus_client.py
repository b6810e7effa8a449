"""The Milvus client environment for ``milvus_index``: the lazy pymilvus import, URI kinds, one-line
errors, quiet client logs, and the per-file bookkeeping of Milvus Lite's embedded server.

pymilvus (and milvus-lite for local files) are imported here only: ``pip install 'han-edge[milvus]'``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from han_edge.errors import HanEdgeError, MissingDependencyError


def import_pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise MissingDependencyError("the Milvus gallery needs pymilvus and milvus-lite: "
                                     "pip install 'han-edge[milvus]'") from None
    return pymilvus


def is_remote(uri: str) -> bool:
    return str(uri).startswith(("http://", "https://", "tcp://", "grpc://"))


def check_uri(uri) -> str:
    """A Milvus server URI as is, or a Milvus Lite ``.db`` path in an existing folder; else one sentence."""
    text = str(uri)
    if not text:
        raise HanEdgeError("the Milvus URI is empty; give a local .db file (Milvus Lite) or http://host:19530")
    if is_remote(text):
        return text
    path = Path(text)
    if path.suffix != ".db":
        raise HanEdgeError(f"a Milvus Lite gallery is a file ending in .db, not {path.name!r} "
                           "(or give http://host:19530 for a Milvus server)")
    if not path.parent.is_dir():
        raise HanEdgeError(f"cannot open Milvus Lite file {path}: folder {path.parent} does not exist")
    return str(path)


def connect(pymilvus, uri: str, token: str, timeout_s: float, lite_path: str | None):
    """A ``MilvusClient`` (a Milvus Lite file is held for this process until ``lite_release``), or one sentence."""
    lite_acquire(lite_path)
    try:
        with quiet_pymilvus():
            return pymilvus.MilvusClient(uri=uri, token=token, timeout=timeout_s)
    except Exception as err:
        lite_release(lite_path)
        if lite_path and Path(lite_path).is_file():   # Milvus Lite 3 keeps a folder of that name
            raise HanEdgeError(f"{uri} is a file, not a Milvus Lite database (Milvus Lite keeps its data in a "
                               "folder of that name); choose another name") from None
        if lite_path:
            raise HanEdgeError(f"cannot open Milvus Lite file {uri} ({first_line(err)}); Milvus Lite lets "
                               "one process open a file at a time: is another process using it?") from None
        raise HanEdgeError(f"cannot reach Milvus at {uri}: {first_line(err)}") from None


def call(uri: str, what: str, fn, *args, **kwargs):
    """A client call; any client/server error becomes one sentence naming the operation."""
    try:
        with quiet_pymilvus():
            return fn(*args, **kwargs)
    except HanEdgeError:
        raise
    except Exception as err:
        raise HanEdgeError(f"Milvus at {uri} failed to {what}: {first_line(err)}") from None


def first_line(err) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return str(text).strip().splitlines()[0][:200]


# Milvus Lite runs its server in threads of this process, one per file, until process exit unless released:
# count the open indexes per file and release the server (and its file lock) when the last one closes,
# so a reopened index (or another process) sees the file as written.
_LITE_USERS: dict[str, int] = {}
_LITE_LOCK = threading.Lock()


def lite_acquire(path: str | None) -> None:
    if path is not None:
        with _LITE_LOCK:
            _LITE_USERS[path] = _LITE_USERS.get(path, 0) + 1


def lite_release(path: str | None) -> None:
    if path is None:
        return
    with _LITE_LOCK:
        left = _LITE_USERS.get(path, 0) - 1
        if left > 0:
            _LITE_USERS[path] = left
            return
        _LITE_USERS.pop(path, None)
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:
            return
        with quiet_pymilvus():
            server_manager_instance.release_server(path)


@contextlib.contextmanager
def quiet_pymilvus():
    """pymilvus / milvus-lite log each failed call with a traceback (we raise one sentence instead), and a
    query-iterator scan on Milvus Lite logs a warning and an unimplemented-RPC error (AllocTimestamp)."""
    loggers = [logging.getLogger(name) for name in ("pymilvus", "milvus_lite", "grpc._server")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
