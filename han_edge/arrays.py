"""Host/device discipline: the few things the Python array API standard leaves to each library.

Pre-processing and the gallery are written against the array API (``array-api-compat``) and run
unchanged on NumPy, CuPy and PyTorch (CPU or CUDA). Every move between host and device goes through
``to_numpy`` / ``from_numpy`` here, so nothing converts silently: CPU tests run the same code on
``array-api-strict`` arrays on a non-default device, which refuse implicit mixing as CuPy does.
"""
from __future__ import annotations

import numpy as np

from han_edge.errors import HanEdgeError


def namespace(*arrays):
    """The array-API namespace of the arrays (NumPy, CuPy, torch via array-api-compat, strict, ...)."""
    from array_api_compat import array_namespace

    try:
        return array_namespace(*arrays)
    except TypeError as err:
        raise HanEdgeError(f"expected arrays of one library on one device: {err}") from None


def device_of(array):
    from array_api_compat import device

    return device(array)


def is_numpy(xp) -> bool:
    from array_api_compat import is_numpy_namespace

    return xp is np or is_numpy_namespace(xp)


def to_numpy(array) -> np.ndarray:
    """An explicit device -> host copy (no copy for NumPy input)."""
    from array_api_compat import is_cupy_array, is_numpy_array, is_torch_array

    if isinstance(array, np.ndarray) or is_numpy_array(array):
        return np.asarray(array)
    if is_cupy_array(array):
        return array.get()
    if is_torch_array(array):
        return array.detach().cpu().numpy()
    xp = namespace(array)                       # any other standard library: through its CPU device
    host = array.to_device(_cpu_device(xp))
    return np.asarray(host)


def from_numpy(xp, array, device=None, dtype=None):
    """An explicit host -> device copy of a NumPy (or nested-list) value into ``xp`` on ``device``."""
    if is_numpy(xp):
        return np.asarray(array, dtype=dtype)
    out = xp.asarray(np.asarray(array), device=device)
    return out if dtype is None or out.dtype == dtype else xp.astype(out, dtype)


def ensure_on(xp, array, device, dtype=None):
    """``array`` as an ``xp`` array on ``device``: host values are uploaded, device arrays must already be there.

    A device array of another library or device is refused with one sentence rather than copied
    behind the caller's back.
    """
    if isinstance(array, (np.ndarray, list, tuple, int, float)):
        return from_numpy(xp, np.asarray(array), device, dtype)
    other = namespace(array)
    if other is not xp and not (is_numpy(xp) and is_numpy(other)):
        raise HanEdgeError(f"got a {type(array).__module__}.{type(array).__name__} array but this pipeline runs "
                           f"on {xp.__name__}; convert it explicitly (e.g. with DLPack) first")
    if device is not None and not same_device(device_of(array), device):
        raise HanEdgeError(f"array is on device {device_of(array)} but this pipeline runs on {device}")
    return array if dtype is None else xp.astype(array, dtype, copy=False)     # no copy when already dtype


def same_device(actual, wanted) -> bool:
    """Whether two devices are the same one: equal objects or names, or torch ``cuda`` vs ``cuda:<current>``.

    ``str`` alone is not enough: a torch tensor reports ``cuda:0`` while ``torch.device("cuda")``
    prints ``cuda`` (CuPy ``Device`` objects compare by ordinal and print ``<CUDA Device 0>``).
    """
    try:
        if actual == wanted:
            return True
    except Exception:          # a library whose __eq__ refuses foreign objects
        pass
    if str(actual) == str(wanted):
        return True
    try:
        import torch
    except ImportError:
        return False
    if not all(isinstance(d, (str, torch.device)) for d in (actual, wanted)):
        return False
    try:
        a, b = torch.device(actual), torch.device(wanted)
    except (RuntimeError, TypeError, ValueError):
        return False
    if a.type != b.type:
        return False
    if a.type == "cuda" and (a.index is None) != (b.index is None):
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index == b.index


def _cpu_device(xp):
    from array_api_compat import is_array_api_strict_namespace

    if is_array_api_strict_namespace(xp):
        return xp.Device("CPU_DEVICE")
    return "cpu"


def smallest_k(xp, dist, k: int):
    """(indices, values) of the k smallest entries of each row, nearest first, on the rows' device.

    The standard has no top-k: NumPy uses ``argpartition``, PyTorch ``topk``, CuPy hands its memory
    to PyTorch through DLPack when PyTorch is present (CuPy's ``argpartition`` is a full sort) and
    sorts otherwise; any other library sorts.
    """
    from array_api_compat import is_cupy_namespace, is_torch_namespace

    n = dist.shape[1]
    k = min(k, n)
    if is_numpy(xp):
        part = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), dist.shape)
        values = np.take_along_axis(dist, part, 1)
        order = np.argsort(values, axis=1, kind="stable")
        return np.take_along_axis(part, order, 1), np.take_along_axis(values, order, 1)
    if is_torch_namespace(xp):
        import torch

        values, index = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        return index, values
    if is_cupy_namespace(xp):
        torch = _torch_cuda()
        if torch is not None:
            values, index = torch.topk(torch.from_dlpack(dist), k, dim=1, largest=False, sorted=True)
            return xp.from_dlpack(index), xp.from_dlpack(values)
    order = xp.argsort(dist, axis=1, stable=True)[:, :k]
    return order, xp.take_along_axis(dist, order, axis=1)


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None
