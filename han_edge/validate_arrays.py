"""Input schemas for arrays: network inputs, features, queries, times, images (NumPy or any array-API array).

Above ``han_edge.validate`` (messages, ids and scalars), below every stage: imports only NumPy, the error
type, ``han_edge.validate`` and ``han_edge.arrays`` (array-API namespace and explicit device-to-host copies).
Every function returns a clean value or raises ``HanEdgeError`` with one sentence naming the offending row.

Policies:

- **Arrays of numbers** (network inputs, features, queries) must be finite: NaN or inf is refused naming
  the rows, for NumPy and any array-API array (CuPy), rather than returning NaN features or id -1.
  Features and queries are real (ints or floats; bools and complex refused, never cast; strings refused,
  never parsed) and must stay finite in float32, squared norms included (``1e300`` in a float64 array is
  refused, not stored as inf). NumPy subclasses are plain arrays (``np.matrix``); masked values are refused.
- **Times** (seconds) are real finite numbers, one per feature, 1-D; strings (even ``"1"``), bools,
  NumPy dates/durations and integers too large for a float are refused naming the index.
- **Images** (frames, crops): ``uint8`` ``H x W x 3`` arrays with 1 <= H, W <= ``MAX_IMAGE_SIDE``; ``None``
  (a failed ``cv2.imread``) is refused naming the crop.
"""
from __future__ import annotations

import numbers

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.validate import MAX_IMAGE_SIDE, _describe, _names, real_number


def _namespace(array):
    from han_edge.arrays import namespace

    return namespace(array)


def _host(array) -> np.ndarray:
    from han_edge.arrays import to_numpy      # explicit device -> host copy (only to name bad rows)

    return to_numpy(array)


def plain_array(obj, what: str):
    """A NumPy array subclass as a plain ``ndarray`` (``np.matrix`` keeps 2-D shapes through indexing and
    makes ``*`` a matrix product); a masked array with masked values is refused, not read unmasked.
    Anything else is returned as it is."""
    if isinstance(obj, np.ndarray) and type(obj) is not np.ndarray:
        if np.ma.is_masked(obj):
            raise HanEdgeError(f"{what} is a masked array with masked values; fill or drop them first")
        return np.asarray(obj)
    return obj


def finite(array, what: str = "array"):
    """``array`` unchanged if every value is finite (NumPy or any array-API array), else one sentence naming rows."""
    if not hasattr(array, "dtype") or not hasattr(array, "shape"):
        raise HanEdgeError(f"{what} must be an array; got {_describe(array)}")
    xp = _namespace(array)
    if xp.isdtype(array.dtype, ("integral", "bool")):
        return array
    if not xp.isdtype(array.dtype, ("real floating", "complex floating")):
        raise HanEdgeError(f"{what} must hold numbers; got {array.dtype}")
    ok = xp.isfinite(array)
    if bool(xp.all(ok)):
        return array
    if array.ndim >= 2:
        rows = np.flatnonzero(~_host(xp.all(xp.reshape(ok, (array.shape[0], -1)), axis=1)))
        where = f"row{'s' * (len(rows) > 1)} {_names(rows.tolist())}"
    else:
        where = f"position{'s' * (int((~_host(ok)).sum()) > 1)} {_names(np.flatnonzero(~_host(ok)).tolist())}"
    raise HanEdgeError(f"{what}: NaN or infinite values in {where}")


COSINE_MIN_NORM = 1e-5   # below it float32 cosine distances lose their meaning (|q|^2 |g|^2 underflows)


MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4   # re-id features have norm ~1 (L2-normalised branches)


def features_array(array, dim: int, what: str = "features", min_norm: float = 0.0):
    """A ``(N, dim)`` float32 array of finite real numbers (NumPy or array-API, left on its device).

    A 1-D vector is refused, not guessed to be one row; bools and complex numbers are refused (a cast
    would drop the imaginary part); values that overflow float32 (``1e300`` in a float64 array) or rows
    whose squared norm does (the distances would be inf or NaN) are refused naming the rows; so are rows
    with a norm below ``min_norm`` (a cosine gallery passes ``COSINE_MIN_NORM``: a zero row has no direction).
    """
    array = plain_array(array, what)
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        given = array
        try:   # no dtype here: a cast would read strings ("1.5") and Decimals as numbers
            array = np.asarray(array)
        except (TypeError, ValueError, OverflowError):
            array = None
        if array is None or array.dtype.kind not in "iuf":
            kinds = {"U": "strings", "S": "strings", "O": "Python objects", "b": "booleans", "c": "complex numbers"}
            held = "" if array is None or array.ndim == 0 else f" holding {kinds.get(array.dtype.kind, array.dtype)}"
            raise HanEdgeError(f"{what} must be an (N, {dim}) array of numbers; got {_describe(given)}{held}")
    if array.ndim != 2 or array.shape[1] != dim:
        raise HanEdgeError(f"{what} must have shape (N, {dim}); got {tuple(array.shape)}")
    xp = _namespace(array)
    if not xp.isdtype(array.dtype, ("integral", "real floating")):
        raise HanEdgeError(f"{what} must hold real numbers; got {array.dtype}")
    finite(array, what)
    with np.errstate(over="ignore", invalid="ignore"):          # overflow is what is checked here
        if array.dtype != xp.float32:
            array = xp.astype(array, xp.float32)
            _rows_fit(xp, xp.all(xp.isfinite(array), axis=1), what, "values too large for float32")
        if array.shape[0]:
            squared = xp.sum(array * array, axis=1)
            # |q|^2 + |g|^2 - 2 q.g, the L2 distance of any two such rows, stays finite up to a quarter of float32's max
            _rows_fit(xp, squared <= MAX_SQUARED_NORM, what, "a squared norm too large for float32 distances")
            if min_norm > 0:
                _rows_fit(xp, squared >= min_norm ** 2, what,
                          f"a norm below {min_norm:g}, where the cosine distance is undefined")
    return array


def _rows_fit(xp, ok, what: str, problem: str) -> None:
    if not bool(xp.all(ok)):
        rows = np.flatnonzero(~_host(ok)).tolist()
        raise HanEdgeError(f"{what}: row{'s' * (len(rows) > 1)} {_names(rows)} {'have' if len(rows) > 1 else 'has'} "
                           f"{problem}")


def times_array(times, n: int, what: str = "times") -> np.ndarray:
    """Times in seconds as ``float64 (n,)``: real, finite numbers (ints or floats; bools and strings refused)."""
    if times is None or isinstance(times, (str, bytes, dict, set, numbers.Number, np.generic)):
        raise HanEdgeError(f"{what} must be a list or 1-D array of {n} numbers (seconds); got {_describe(times)}")
    if _is_array(times) and not isinstance(times, np.ndarray):
        times = _host(times)
    if isinstance(times, np.ndarray) and times.dtype.kind in "iuf":
        if times.ndim != 1:
            raise HanEdgeError(f"{what} must be 1-D; got shape {times.shape}")
        out = times.astype(np.float64)
        bad = ~np.isfinite(out)
        if bad.any():
            raise HanEdgeError(f"{what}: time {int(np.argmax(bad))} is not a finite number")
    else:
        try:
            items = list(times)
        except TypeError:
            raise HanEdgeError(f"{what} must be a list or 1-D array of numbers (seconds); got {_describe(times)}") \
                from None
        out = np.empty(len(items), np.float64)
        for i, value in enumerate(items):
            out[i] = real_number(value, f"{what}: time {i}")
    if len(out) != n:
        raise HanEdgeError(f"{len(out)} {what} for {n} features; give one per feature")
    return out


def _is_array(obj) -> bool:
    """An array of some library (NumPy, CuPy, torch, array-API), not a Python container."""
    return hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__array_namespace__") or \
        hasattr(obj, "__dlpack__") or isinstance(obj, np.ndarray)


def image(array, what: str = "frame") -> np.ndarray:
    """A ``uint8`` ``H x W x 3`` (BGR) image; ``None`` is refused naming it (e.g. a failed ``cv2.imread``)."""
    if array is None:
        raise HanEdgeError(f"{what} is None (an image that failed to load?)")
    array = plain_array(array, what)
    if not isinstance(array, np.ndarray):
        raise HanEdgeError(f"{what} must be a NumPy uint8 H x W x 3 image; got {_describe(array)}")
    if array.dtype != np.uint8:
        raise HanEdgeError(f"{what} must be uint8; got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise HanEdgeError(f"{what} must be H x W x 3 with H, W >= 1; got shape {array.shape}")
    image_size(array.shape, what)
    return array


def image_size(shape, what: str = "frame") -> None:
    """Refuse an image side above ``MAX_IMAGE_SIDE`` (OpenCV copies such a view whole, or crashes)."""
    if max(shape[0], shape[1]) > MAX_IMAGE_SIDE:
        raise HanEdgeError(f"{what} is {shape[1]} x {shape[0]} pixels; han-edge takes at most {MAX_IMAGE_SIDE} "
                           f"on a side")


def images(crops, what: str = "crop") -> list[np.ndarray]:
    """A list of images (see ``image``), naming the index of a bad one."""
    if isinstance(crops, np.ndarray) and crops.ndim == 4:
        crops = list(crops)
    if not isinstance(crops, (list, tuple)):
        raise HanEdgeError(f"{what}s must be a list of uint8 H x W x 3 images; got {_describe(crops)}")
    return [image(c, f"{what} {i}") for i, c in enumerate(crops)]
