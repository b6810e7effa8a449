"""Every file han-edge writes goes through here: destination checked first, temp file beside it, fsync, rename.

The bottom layer: imports nothing of han-edge but the error type.

Guarantees (tested in ``tests/test_fileio.py``):

- the destination is checked before any work with one sentence naming the problem: a directory,
  a missing or non-folder parent, a read-only folder or file, a name ending in a separator, something
  that is not a regular file (FIFO, device, socket: never renamed over, never written into), this
  process's own standard output (``/dev/stdout`` redirected to a file), a symlink loop, and
  (when the size is known) not enough free space;
- the bytes go to ``.<name>.<pid>@<host>.<random>.tmp[suffix]`` beside the destination, are fsynced and renamed
  over it, so readers see the old file or the new one, never a mix, and a failed write (full disk,
  I/O error, exception in the caller's code, Ctrl-C) leaves the previous file unchanged and no
  temporary file behind;
- a writer killed outright (SIGKILL, power loss) cannot clean up, so every write first sweeps the
  temporary files of *dead* writers of the same destination (the pid in the name is not running on this
  host; temps of other hosts on a shared file system are left alone):
  a stray temp never eats the space the next save needs;
- the new file gets the previous file's permission bits, or the umask's default for a new one
  (not ``mkstemp``'s 0600); a symlinked destination updates the file it points to.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

from han_edge.errors import HanEdgeError

_UMASK_LOCK = threading.Lock()
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)
# Below this many free bytes an error from a library that hides errno (torch.save raises RuntimeError)
# is reported as a full disk.
_NEARLY_FULL = 1 << 20
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
            _check(_target(path), what, size)
    except OSError as err:    # e.g. a name too long to stat, a symlink loop
        raise HanEdgeError(f"cannot write {what} {path}: {_reason(err)}") from None
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


def _target(path: Path) -> Path:
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
        free = _free_bytes(parent)
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
        raise HanEdgeError(f"cannot create {what} {path}: {_reason(err)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise HanEdgeError(f"cannot write into {what} {path}: it is read-only")
    return path


def _reason(err: OSError) -> str:
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


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mib(size: int) -> str:
    if size < 2**10:
        return f"{size} bytes"
    return f"{size / 2**10:.1f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True       # someone else's live process (or a pid we cannot judge): leave its file alone
    return True


def _writer_tag() -> str:
    """``<pid>@<host>`` in temporary names: a pid is only judged on the machine that owns it (shared file systems)."""
    host = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:16] or "host"
    return f"{os.getpid()}@{host}"


def sweep_stale_temps(path: str | Path) -> list[Path]:
    """Remove ``.<name>.<pid>@<host>.*.tmp[suffix]`` beside ``path`` left by writers of this machine that are gone."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f"{_glob_escape(_stem(path))}*.tmp*"))
    except OSError:
        return removed
    own_pid, host = _writer_tag().split("@")
    for tmp in candidates:
        pid_text, _, tmp_host = tmp.name[len(_stem(path)):].split(".", 1)[0].partition("@")
        if tmp_host != host or not pid_text.isdigit() or pid_text == own_pid or _pid_alive(int(pid_text)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _stem(path: Path) -> str:
    """Start of a temporary name: hidden, the destination's name (cut to stay within NAME_MAX)."""
    return f".{path.name[:120]}."


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _default_mode(existing: Path) -> int:
    try:
        return existing.stat().st_mode & 0o7777
    except OSError:
        pass
    try:   # Linux: read the umask without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output", size: int | None = None, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    For libraries that write by file name (``torch.save``, ``onnx.save``). ``suffix`` ends the
    temporary name (``cv2.imwrite`` picks the format from it). ``size``: expected bytes, checked
    against the free space first. Any failure removes the temporary file and leaves ``path`` as
    it was; an ``OSError`` (or a library error on a file system that is now full) becomes one
    sentence, a ``HanEdgeError`` passes through, anything else is re-raised unchanged.
    """
    path = _target(check_destination(path, what, size))
    sweep_stale_temps(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_stem(path)}{_writer_tag()}.", suffix=f".tmp{suffix}",
                                        dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise HanEdgeError(f"cannot write {what} {path}: {_reason(err)}") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(path))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except HanEdgeError:
        raise
    except OSError as err:
        raise HanEdgeError(f"cannot write {what} {path}: {_reason(err)}; the previous file is unchanged") from None
    except Exception:
        free = _free_bytes(path.parent)
        if free is not None and free < _NEARLY_FULL:
            raise HanEdgeError(f"cannot write {what} {path}: no space left on the device; "
                               f"the previous file is unchanged") from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, what, size=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_json(path: str | Path, data, what: str = "JSON report") -> Path:
    """A JSON file written atomically: strict JSON (RFC 8259), so NaN and infinities become ``null``.

    NumPy arrays and scalars become lists and numbers; anything else unknown is written as its ``str``.
    """
    text = json.dumps(_strict(data), indent=2, default=_jsonable, allow_nan=False)
    return atomic_write_bytes(path, text.encode(), what)


def _strict(value):
    """Non-finite floats (also inside NumPy arrays and scalars) replaced by None."""
    import numpy as np

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k.item() if isinstance(k, np.generic) else k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return _strict(value.tolist())
    return value


def _jsonable(value):
    return _strict(value.tolist()) if hasattr(value, "tolist") else str(value)


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
