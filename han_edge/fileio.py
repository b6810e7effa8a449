"""Every file han-edge writes goes through here: destination checked first, temp file beside it, fsync, rename.

The bottom layer: imports nothing of han-edge but the error type. A failed or killed write leaves
the previous file intact and no stray temporary file behind (on any exception the temp file is
removed; a process killed mid-write leaves ``.<name>.<random>.tmp``, hidden and never reused).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from han_edge.errors import HanEdgeError


def check_destination(path: str | Path, what: str = "output") -> Path:
    """The path as a ``Path`` if a file can be written there, else one sentence naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise HanEdgeError(f"{what} {path} is a directory; give a file name")
    parent = path.parent
    if not parent.exists():
        raise HanEdgeError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise HanEdgeError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HanEdgeError(f"cannot write {what} {path}: folder {parent} is read-only")
    if path.exists() and not os.access(path, os.W_OK):
        raise HanEdgeError(f"cannot write {what} {path}: the file is read-only")
    return path


def ensure_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create a folder (and parents) or say in one sentence why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HanEdgeError(f"{what} {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HanEdgeError(f"cannot create {what} {path}: {_reason(err)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HanEdgeError(f"cannot write into {what} {path}: it is read-only")
    return path


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only)"
    return err.strerror or type(err).__name__


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output"):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    For libraries that write by file name (``torch.save``, ``onnx.save``, ``cv2.imwrite``).
    """
    path = check_destination(path, what)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise HanEdgeError(f"cannot write {what} {path}: {_reason(err)}; the previous file is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_json(path: str | Path, data, what: str = "JSON report") -> Path:
    """A JSON file written atomically (NumPy arrays and scalars become lists and numbers)."""
    return atomic_write_bytes(path, json.dumps(data, indent=2, default=_jsonable).encode(), what)


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
