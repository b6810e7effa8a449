"""Every file han-edge writes goes through here: destination checked first, temp file beside it, fsync, rename.

The bottom layer: imports nothing of han-edge but the error type and ``han_edge.paths`` (the checks).

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
import json
import math
import os
import re
import socket
import tempfile
import threading
from pathlib import Path

from han_edge.errors import HanEdgeError
from han_edge.paths import check_destination, free_bytes, os_reason, write_target

_UMASK_LOCK = threading.Lock()
# Below this many free bytes an error from a library that hides errno (torch.save raises RuntimeError)
# is reported as a full disk.
_NEARLY_FULL = 1 << 20


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
    path = write_target(check_destination(path, what, size))
    sweep_stale_temps(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_stem(path)}{_writer_tag()}.", suffix=f".tmp{suffix}",
                                        dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise HanEdgeError(f"cannot write {what} {path}: {os_reason(err)}") from None
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
        raise HanEdgeError(f"cannot write {what} {path}: {os_reason(err)}; the previous file is unchanged") from None
    except Exception:
        free = free_bytes(path.parent)
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
