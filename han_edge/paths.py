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
        raise HanEdgeError(f"cannot write {what} {shown_path(path)}: {os_reason(err)}") from None
    except ValueError:        # a NUL byte in the name
        raise HanEdgeError(f"cannot write {what} {shown_path(path)!r}: the name holds a NUL byte") from None
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "folder"):
    """Hold ``folder/.han-edge.lock`` for one writer at a time (POSIX ``flock``; nothing where it is missing).

    The lock file is opened without following a link and without blocking (a FIFO put there would
    hang ``open``); anything there but a regular file is one sentence.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = Path(folder) / ".han-edge.lock"
    not_a_file = f"the lock file {lock} of {what} {folder} is not a regular file; remove it"
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(lock).st_mode):      # a link, folder, FIFO, ...
            raise HanEdgeError(not_a_file)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(lock, flags, 0o666)
    except OSError as err:
        raise HanEdgeError(f"cannot open the lock file {lock} of {what} {folder}: {os_reason(err)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):      # swapped in since the check above
            raise HanEdgeError(not_a_file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HanEdgeError(f"another han-edge process is writing into {what} {folder}; wait for it or use "
                               "another folder") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def as_path(value, what: str) -> Path:
    """A file name given to the API (``str`` or ``os.PathLike``, not empty, not bytes) as a ``Path``."""
    try:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    except TypeError:      # a PathLike whose __fspath__ returns neither str nor bytes
        text = None
    if not isinstance(text, str) or not text:
        raise HanEdgeError(f"a {what} name must be a non-empty str or Path; got {value!r:.40}")
    if "\0" in text:
        raise HanEdgeError(f"{what} name {shown_path(value)!r} holds a NUL byte, which no file name can")
    return Path(value)


def shown_path(path, limit: int = 160) -> str:
    """``path`` for a message: a name over ``limit`` characters keeps its start and end (``...`` between)."""
    text = os.fspath(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-(limit // 2 - 3):]}"


def not_the_input(out: Path, source: Path, what: str) -> None:
    """Refuse an output that is the input file under another name (a symbolic or hard link to it)."""
    try:
        same = out.exists() and os.path.samefile(out, source)
    except (OSError, ValueError):
        return               # unreadable names: the write's own checks say why
    if same:
        raise HanEdgeError(f"{what} {shown_path(out)} is the input {shown_path(source)} under another name (a link); "
                           "remove the link or write elsewhere")


def require_file(path: Path, what: str) -> None:
    """``what path`` must be an existing regular file; a folder, a pipe/device/socket, a missing file or a
    name the OS refuses (too long, a loop of links) is one sentence (``Path.is_file`` raises on some)."""
    shown = shown_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise HanEdgeError(f"{what} {shown} not found") from None
    except OSError as err:
        raise HanEdgeError(f"cannot read {what} {shown}: {os_reason(err)}") from None
    except ValueError:   # a NUL byte in the name
        raise HanEdgeError(f"cannot read {what} {shown!r}: the name holds a NUL byte") from None
    if stat.S_ISDIR(mode):
        raise HanEdgeError(f"{what} {shown} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise HanEdgeError(f"{what} {shown} is not a regular file")


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
        raise HanEdgeError(f"cannot create {what} {shown_path(path)}: {os_reason(err)}") from None
    except ValueError:
        raise HanEdgeError(f"cannot create {what} {shown_path(path)!r}: the name holds a NUL byte") from None
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
