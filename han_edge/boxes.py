"""Boxes at the boundary: box lists and boxes files (JSON), checked with one sentence naming the box or key.

Policies:

- **Boxes** are ``[[x1, y1, x2, y2], ...]`` in pixels: a list/tuple of 4-sequences or an ``(N, 4)``
  real array, returned as ``float64 (N, 4)``. Refused, naming the box: a box that is not a sequence of
  exactly four numbers (ragged, nested, a string, a dict, a scalar), a bool or a string or ``None``
  as a coordinate, NaN/inf or a number too large for a float. A flat ``[x1, y1, x2, y2]`` is refused
  (box 0 is a number) rather than guessed to be one box. An empty list is ``(0, 4)``. Inverted or
  zero-area boxes are *not* judged here: only the runtime knows the frame and clips/rejects them.
- **Boxes files** (JSON): UTF-8 (a BOM is allowed), at most ``MAX_BOXES_FILE`` bytes, one object
  ``{"image name" or "frame index": boxes}``; NaN/Infinity literals and duplicate keys are refused.
  Frame keys (video) are decimal integers >= 0 (``"007"`` is frame 7; two keys for one frame are
  refused). Keys that match no image, and frames the video does not have, are errors naming them
  (``unmatched_keys``, ``missing_frames``): a silent "0 features" would hide a wrong file.
"""
from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.paths import require_file
from han_edge.validate import _describe, _names, _real, reason
from han_edge.validate_arrays import _host, _is_array, plain_array

MAX_BOXES_FILE = 256 * 2**20          # bytes; a boxes file larger than this is refused before reading
_FRAME_KEY = re.compile(r"[0-9]{1,18}", re.ASCII)   # int64; int() refuses > 4300 digits


def boxes_array(obj, what: str = "boxes") -> np.ndarray:
    """``[[x1, y1, x2, y2], ...]`` (sequence or ``(N, 4)`` array) as ``float64 (N, 4)``; see the module policy."""
    obj = plain_array(obj, what)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "iuf":
        if obj.size == 0 and obj.ndim in (1, 2) and (obj.ndim == 1 or obj.shape[1] == 4):
            return np.zeros((0, 4), np.float64)
        if obj.ndim != 2 or obj.shape[1] != 4:
            raise HanEdgeError(f"{what} must be an (N, 4) array of [x1, y1, x2, y2]; got shape {obj.shape}")
        out = obj.astype(np.float64)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise HanEdgeError(f"{what}: box {int(np.argmax(bad))} has a NaN or infinite coordinate")
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "O":
            raise HanEdgeError(f"{what} must hold numbers; got an array of {obj.dtype}")
        obj = list(obj)
    if not isinstance(obj, (list, tuple)) and _is_array(obj):
        return boxes_array(_host(obj), what)        # boxes from a GPU detector: one small explicit copy
    if not isinstance(obj, (list, tuple)):
        raise HanEdgeError(f"{what} must be a list of [x1, y1, x2, y2] boxes; got {_describe(obj)}")
    out = np.empty((len(obj), 4), np.float64)
    for i, box in enumerate(obj):
        if isinstance(box, np.ndarray):
            box = box.tolist() if box.ndim == 1 else box
        if not isinstance(box, (list, tuple)):
            raise HanEdgeError(f"{what}: box {i} is {_describe(box)}, not [x1, y1, x2, y2]")
        if len(box) != 4:
            raise HanEdgeError(f"{what}: box {i} has {len(box)} values, not 4 (x1, y1, x2, y2)")
        for j, value in enumerate(box):
            number = _real(value)
            if number is None:
                kind = "not a number"
                if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_, np.timedelta64)):
                    kind = "too large for a coordinate"
                elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_, np.timedelta64)):
                    kind = "not finite"
                raise HanEdgeError(f"{what}: box {i} coordinate {j} is {_describe(value)}, {kind}")
            out[i, j] = number
    return out


def _strict_object(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise HanEdgeError(f"key {duplicate!r} appears more than once")
    return dict(pairs)


def _no_constant(name):
    raise HanEdgeError(f"{name} is not a JSON number")


def boxes_file(path: str | Path) -> dict[str, np.ndarray]:
    """A boxes JSON file ``{"name" or "frame index": [[x1, y1, x2, y2], ...]}`` as key -> ``float64 (N, 4)``."""
    path = Path(path)
    try:
        require_file(path, "boxes file")
        size = path.stat().st_size
        if size > MAX_BOXES_FILE:
            raise HanEdgeError(f"boxes file {path} is {size / 2**20:.0f} MiB; at most {MAX_BOXES_FILE // 2**20} MiB "
                               f"is read")
        raw = path.read_bytes()
    except OSError as err:
        raise HanEdgeError(f"cannot read boxes file {path}: {reason(err.strerror or err)}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise HanEdgeError(f"boxes file {path} is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x})") from None
    try:
        data = json.loads(text, object_pairs_hook=_strict_object, parse_constant=_no_constant)
    except HanEdgeError as err:
        raise HanEdgeError(f"boxes file {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise HanEdgeError(f"boxes file {path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") \
            from None
    except RecursionError:
        raise HanEdgeError(f"boxes file {path} is nested too deeply to be boxes") from None
    if not isinstance(data, dict):
        raise HanEdgeError(f"boxes file {path} must hold one object {{name or frame index: [[x1, y1, x2, y2], ...]}}, "
                           f"not {_describe(data)}")
    return {key: boxes_array(value, f"boxes file {path}, key {key!r}") for key, value in data.items()}


def frame_keys(boxes: dict[str, np.ndarray], source: str = "boxes file") -> dict[int, np.ndarray]:
    """Boxes keyed by video frame index: every key a decimal integer >= 0, one key per frame."""
    frames: dict[int, np.ndarray] = {}
    for key, value in boxes.items():
        text = str(key).strip()
        if not _FRAME_KEY.fullmatch(text):
            raise HanEdgeError(f"{source}: key {str(key)[:40]!r} is not a frame index (a whole number from 0 to 18 digits)")
        index = int(text)
        if index in frames:
            raise HanEdgeError(f"{source}: frame {index} is given twice (keys {key!r} and another)")
        frames[index] = value
    return frames


def unmatched_keys(boxes: dict, available: Iterable[str], source: str = "boxes file", where: str = "the images") -> None:
    """Refuse box keys that name no image: a wrong or stale boxes file must not yield "0 features"."""
    names = set(available)
    missing = sorted(str(k) for k in boxes if k not in names)
    if missing:
        raise HanEdgeError(f"{source} names {len(missing)} image{'s' * (len(missing) > 1)} not among {where}: "
                           f"{_names(missing)}")


def boxes_by_file(boxes: dict, files: list, root, source: str = "boxes file") -> dict:
    """{file: its boxes} for the image ``files`` under folder ``root`` that ``boxes`` names.

    A key is the image's path under ``root`` (``cam1/0001.jpg``) or its bare name where that name is
    unique; a bare name shared by images in several subfolders is refused, never applied to all of them.
    Keys naming no image are refused (``unmatched_keys``).
    """
    from collections import Counter

    root = Path(root)
    relative = {f: Path(f).relative_to(root).as_posix() for f in files}
    counts = Counter(Path(f).name for f in files)
    exact = set(relative.values())   # a key that is some image's path is that image's, never a bare name
    found = {}
    for f in files:
        name = Path(f).name
        by_name = name in boxes and name != relative[f] and name not in exact
        if relative[f] in boxes:
            if by_name:
                raise HanEdgeError(f"{source} keys image {relative[f]!r} twice ({relative[f]!r} and {name!r}); keep one")
            found[f] = boxes[relative[f]]
        elif by_name:
            if counts[name] > 1:
                same = sorted(r for g, r in relative.items() if Path(g).name == name)
                raise HanEdgeError(f"{source} key {name!r} matches {counts[name]} images under {root} "
                                   f"({_names(same)}); key their boxes by the path under {root}, e.g. {same[0]!r}")
            found[f] = boxes[name]
    unmatched_keys(boxes, [*relative.values(), *counts], source, f"the images in {root}")
    return found


def missing_frames(frames: Iterable[int], frame_count: int, source: str = "boxes file", video: str = "the video") -> None:
    """Refuse frame indices at or beyond the number of frames the video had."""
    missing = sorted(int(f) for f in frames if int(f) >= frame_count)
    if missing:
        raise HanEdgeError(f"{source} has boxes for frame{'s' * (len(missing) > 1)} {_names(missing)} but {video} "
                           f"has {frame_count} frames")
