"""Where han-edge may read and write: one sentence for every path it cannot use, before any work.

The bottom layer with ``han_edge.fileio`` (which writes through these checks): imports nothing of
han-edge but the error type. Tested in ``tests/test_fileio.py``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from han_edge.errors import HanEdgeError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)
_NOT_FILES = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
              (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def check_destination(path: str | Path, what: str = "output", size: int | None = None) -> Path:
    """The path as a ``Path`` if a file can be written there, else one sentence naming the problem.

    ``size``: bytes about to be written; refused up front when the file system has less free.
    """
    text = os.fspath(path)
    if not text:
        raise HanEdgeError(f"the {what} path is empty; give a file name")
    if text.endswith(("/", os.sep)) and not Path(text).is_dir():
        raise HanEdgeError(f"{what} {text} ends in a path separator; give a file name, not a folder")
    path = Path(text)
    try:
        _check(path, what, size)
        if path.is_symlink():                # the write replaces the file the link points to
            _check(write_target(path), what, size)
    except OSError as err:    # e.g. a name too long to stat, a symlink loop
        raise HanEdgeError(f"cannot write {what} {path}: {os_reason(err)}") from None
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "folder"):
    """Hold ``folder/.han-edge.lock`` for one writer at a time (POSIX ``flock``; nothing where it is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(Path(folder) / ".han-edge.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HanEdgeError(f"another han-edge process is writing into {what} {folder}; wait for it or use "
                               "another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def require_file(path: Path, what: str) -> None:
    """``what path`` must be an existing regular file: missing, or a pipe/device/socket, is one sentence."""
    if not path.is_file():
        raise HanEdgeError(f"{what} {path} is not a regular file" if path.exists() and not path.is_dir()
                           else f"{what} {path} not found")


def write_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: a symlink's final target, so that the link stays a link."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _check(path: Path, what: str, size: int | None) -> None:
    if path.is_dir():
        raise HanEdgeError(f"{what} {path} is a directory; give a file name")
    try:
        st = os.stat(path)                   # follows links, /dev/stdout's included (ELOOP: a symlink loop)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):   # a rename would destroy it; writing into it is no file
        kind = next((k for test, k in _NOT_FILES if test(st.st_mode)), "special file")
        raise HanEdgeError(f"{what} {path} is a {kind}, not a regular file; han-edge replaces files whole, "
                           f"so give a file name")
    for fd, name in enumerate(("input", "output", "error") if st is not None else ()):
        with contextlib.suppress(OSError):            # /dev/stdout redirected to a file: the rename would lose it
            if os.path.samestat(st, os.fstat(fd)):
                raise HanEdgeError(f"{what} {path} is this process's standard {name}; give a file name")
    parent = path.parent
    if not parent.exists():
        raise HanEdgeError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise HanEdgeError(f"cannot write {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HanEdgeError(f"cannot write {what} {path}: folder {parent} is read-only")
    if path.exists() and not os.access(path, os.W_OK):
        raise HanEdgeError(f"cannot write {what} {path}: the file is read-only")
    if size is not None:
        free = free_bytes(parent)
        if free is not None and free < size:
            raise HanEdgeError(f"cannot write {what} {path}: it needs {_mib(size)} and only {_mib(free)} is free "
                               f"on that file system")


def ensure_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create a folder (and parents) or say in one sentence why it cannot be."""
    if not os.fspath(path):
        raise HanEdgeError(f"the {what} path is empty; give a folder")
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise HanEdgeError(f"{what} {path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HanEdgeError(f"cannot create {what} {path}: {os_reason(err)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HanEdgeError(f"cannot write into {what} {path}: it is read-only")
    return path


def os_reason(err: OSError) -> str:
    if err.errno in _NO_SPACE:
        return "no space left on the device"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only)"
    if err.errno == errno.ENAMETOOLONG:
        return "the file name is too long"
    if err.errno == errno.EISDIR:
        return "it is a directory"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is not a folder"
    if err.errno == errno.ELOOP:
        return "its symbolic links form a loop"
    return (err.strerror or type(err).__name__).lower()


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(size: int) -> str:
    if size < 2**10:
        return f"{size} bytes"
    return f"{size / 2**10:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"
