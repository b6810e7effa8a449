"""Input schemas at the boundary: what han-edge accepts from callers and files, and one sentence for the rest.

The bottom layer: imports only NumPy and the error type, so the runtime, the gallery, the pipeline and
the CLI can all call it. Every function returns a clean value or raises ``HanEdgeError`` with one
sentence naming the offending item (box index, id index, file key); none lets a raw ``ValueError``,
``TypeError`` or ``OverflowError`` through. Tested in ``tests/test_hostile_inputs.py`` (hypothesis).

Policies (the ambiguous cases, decided once):

- **Boxes** and boxes files: ``han_edge.boxes``.
- **Ids** (identities, cameras): integers, returned as ``int64``. Floats are accepted only when
  integral (``2.0``), never truncated (``1.9`` is refused); bools, strings (even ``"12"``), ``None`` and
  values beyond int64 are refused naming the index; the length must equal the number of features.
- **Scalars** such as ``k`` or a dimension: a Python or NumPy integer >= 1; bools and floats
  (even ``5.0``) and strings are refused.
- **Arrays** (features, times, images): ``han_edge.validate_arrays``.
"""
from __future__ import annotations

import math
import numbers
import re

import numpy as np

from han_edge.errors import HanEdgeError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1   # DeepStream's config integers
MAX_BATCH = 4096        # batch sizes anywhere (CLI options, engine profiles, serving configs)
MIN_TRAIN_BATCH = 2     # BatchNorm in training mode needs two images per batch (the loader drops a last one)
MAX_FEATURE_DIM = 1 << 16
MAX_IMAGE_SIDE = 1 << 15           # pixels a frame or crop side may have (a 16K frame is 15360 x 8640)
MAX_THREADS = 1024                 # intra-op threads (the CLI's --threads bound): ONNX Runtime hangs creating 10**6
# advice to load untrusted data unsafely, as PyTorch and NumPy word it (not bare words: a file may be
# called weights_only.pt)
_UNSAFE_ADVICE = re.compile(r"weights_only`?\s*(=|set to)\s*`?False|allow_pickle\s*=|trusted source|trust the source|"
                            r"arbitrary code|can still be loaded|unpickl", re.IGNORECASE)
PYTHON_OBJECTS = "it holds Python objects, which han-edge never loads (loading them could run code)"


# -- messages ------------------------------------------------------------------------------------------------
def reason(err: BaseException | str, limit: int = 200) -> str:
    """The first useful sentence of a library's error message, without advice to do something unsafe.

    PyTorch suggests retrying with ``weights_only=False`` and NumPy suggests ``allow_pickle=True``; both
    would run code from the file, so such sentences are dropped, never passed on.
    """
    text = (str(err).strip() or type(err).__name__) if isinstance(err, BaseException) else str(err).strip()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
    safe = [s for s in sentences if not _UNSAFE_ADVICE.search(s)]
    first = safe[0] if safe else PYTHON_OBJECTS
    first = first.rstrip(".")
    return first if len(first) <= limit else first[:limit - 3].rstrip() + "..."


def _describe(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return f"the bool {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the string {shown!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    text = " ".join(repr(value).split())   # a tensor's repr spans lines: one sentence stays one line
    return text if len(text) <= 30 else text[:27] + "..."


def _real(value) -> float | None:
    """A finite float from a real number that is not a bool (nor a NumPy date/duration), else None."""
    if isinstance(value, (bool, np.bool_, np.timedelta64, np.datetime64)) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def _names(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# -- ids, scalars --------------------------------------------------------------------------------------------
def ids_array(ids, n: int | None = None, what: str = "ids") -> np.ndarray:
    """Integer ids (identities, cameras) as ``int64 (n,)``; see the module policy."""
    if ids is None or isinstance(ids, (str, bytes, dict, set, numbers.Number, np.generic)):
        raise HanEdgeError(f"{what} must be a list or 1-D array of integers; got {_describe(ids)}")
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        if ids.ndim != 1:
            raise HanEdgeError(f"{what} must be 1-D; got shape {ids.shape}")
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > INT64_MAX:
            raise HanEdgeError(f"{what}: id {int(np.argmax(ids > INT64_MAX))} is beyond the 64-bit integer range")
        out = ids.astype(np.int64)
    elif isinstance(ids, np.ndarray) and ids.dtype.kind == "f":
        if ids.ndim != 1:
            raise HanEdgeError(f"{what} must be 1-D; got shape {ids.shape}")
        wide = ids.astype(np.float64)   # float16 cannot hold INT64_MIN (a cast warning, not an error)
        bad = ~np.isfinite(wide) | (wide != np.round(wide)) | (wide < INT64_MIN) | (wide >= 2.0**63)
        if bad.any():
            i = int(np.argmax(bad))
            raise HanEdgeError(f"{what}: id {i} is {ids[i].item()!r}, not an integer (ids are never rounded)")
        out = ids.astype(np.int64)
    else:
        try:
            items = list(ids)
        except TypeError:
            raise HanEdgeError(f"{what} must be a list or 1-D array of integers; got {_describe(ids)}") from None
        out = np.empty(len(items), np.int64)
        for i, value in enumerate(items):
            out[i] = _integer(value, f"{what}: id {i}")
    if n is not None and len(out) != n:
        raise HanEdgeError(f"{len(out)} {what} for {n} features; give one per feature")
    return out


def _integer(value, label: str) -> int:
    if isinstance(value, (bool, np.bool_, np.timedelta64, np.datetime64)):
        raise HanEdgeError(f"{label} is {_describe(value)}, not an integer")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real):
        number_f = float(value)
        if not math.isfinite(number_f) or number_f != round(number_f):
            raise HanEdgeError(f"{label} is {_describe(value)}, not an integer (ids are never rounded)")
        number = int(number_f)
    else:
        raise HanEdgeError(f"{label} is {_describe(value)}, not an integer")
    if not INT64_MIN <= number <= INT64_MAX:
        raise HanEdgeError(f"{label} is beyond the 64-bit integer range")
    return number


def whole_number(value, name: str, low: int = 0, high: int | None = None) -> int:
    """A Python/NumPy integer from ``low`` to ``high`` (an option of an API dataclass); bools, floats, strings refused."""
    bounds = f"from {low} to {high}" if high is not None else f">= {low}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or not low <= int(value) <= (high if high is not None else int(value)):
        raise HanEdgeError(f"{name} must be a whole number {bounds}; got {_describe(value)}")
    return int(value)


def safe_text(value, name: str) -> str:
    """A non-empty string without control characters: it goes into a config file line (DeepStream, Triton)."""
    if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise HanEdgeError(f"{name} must be a non-empty string without line breaks or control characters; got "
                           f"{_describe(value)}")
    return value


def positive_int(value, name: str, maximum: int | None = None) -> int:
    """A Python/NumPy integer >= 1 (and <= ``maximum``); bools, floats and strings refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise HanEdgeError(f"{name} must be a whole number >= 1; got {_describe(value)}")
    value = int(value)
    if value < 1:
        raise HanEdgeError(f"{name} must be at least 1; got {value}")
    if maximum is not None and value > maximum:
        raise HanEdgeError(f"{name} must be at most {maximum}; got {value}")
    return value


def thread_count(value) -> int:
    """Intra-op threads: a whole number from 0 (the library's default) to ``MAX_THREADS``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or \
            not 0 <= int(value) <= MAX_THREADS:
        raise HanEdgeError(f"threads must be a whole number >= 0 and at most {MAX_THREADS} (0: the library's default); "
                           f"got {_describe(value)}")
    return int(value)


def feature_dim(dim) -> int:
    """A feature width: an integer from 1 to ``MAX_FEATURE_DIM``."""
    return positive_int(dim, "the feature dimension", MAX_FEATURE_DIM)


def real_number(value, name: str) -> float:
    """A finite real number (Python or NumPy, not a bool or a string) as a float."""
    number = _real(value)
    if number is None:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_, np.timedelta64)):
            raise HanEdgeError(f"{name} is too large; got an integer of {len(str(abs(int(value))))} digits")
        raise HanEdgeError(f"{name} must be a finite number; got {_describe(value)}")
    return number
