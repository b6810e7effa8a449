"""Crop, resize and normalise person boxes: one array-API function for NumPy (CPU) and CuPy (GPU).

The same code runs in CPU tests and on the device, so what is tested is what the Jetson runs.
Resizing follows OpenCV's ``INTER_LINEAR`` sampling (pixel-centre aligned, no anti-aliasing):
on uint8 images it agrees with ``cv2.resize`` to within one grey level (OpenCV rounds its
weights to 11-bit fixed point; we keep float32).
"""
from __future__ import annotations

import numpy as np

from han_edge.errors import HanEdgeError


def check_frame(frame, xp=np) -> None:
    if not hasattr(frame, "shape") or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", type(frame).__name__)
        raise HanEdgeError(f"frame must be an H x W x 3 BGR image array, got shape {shape}")
    if frame.dtype != xp.uint8:
        raise HanEdgeError(f"frame must be uint8 (as read by OpenCV), got dtype {frame.dtype}")
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise HanEdgeError(f"frame is empty: shape {frame.shape}")


def clip_boxes(boxes, frame_hw: tuple[int, int]) -> np.ndarray:
    """Integer pixel boxes clipped to the frame.

    Policy: a box partly outside the frame is clipped to it (detectors often overshoot the
    border); a box with no area inside the frame is rejected with an error naming it.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise HanEdgeError(f"boxes must be an (N, 4) array of x1, y1, x2, y2, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise HanEdgeError("boxes contain NaN or infinite coordinates")
    h, w = frame_hw
    x1 = np.clip(np.floor(arr[:, 0]), 0, w)
    y1 = np.clip(np.floor(arr[:, 1]), 0, h)
    x2 = np.clip(np.ceil(arr[:, 2]), 0, w)
    y2 = np.clip(np.ceil(arr[:, 3]), 0, h)
    empty = np.flatnonzero((x2 <= x1) | (y2 <= y1))
    if empty.size:
        i = int(empty[0])
        raise HanEdgeError(f"box {i} {arr[i].tolist()} has no area inside the {w}x{h} frame "
                           f"({empty.size} such box(es)); drop it before embedding")
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


def _source_coords(xp, start, length, out_len: int):
    """OpenCV INTER_LINEAR source indices and weights for each output pixel, per box."""
    scale = length.astype(xp.float32) / out_len                          # (N,)
    dst = xp.arange(out_len, dtype=xp.float32)
    src = (dst[None, :] + 0.5) * scale[:, None] - 0.5                    # (N, out)
    src = xp.maximum(src, 0)
    low = xp.floor(src)
    frac = src - low
    low = low.astype(xp.int64)
    limit = (length - 1)[:, None]
    low = xp.minimum(low, limit)
    high = xp.minimum(low + 1, limit)
    frac = xp.where(low == limit, 0, frac).astype(xp.float32)
    return start[:, None] + low, start[:, None] + high, frac


def crop_batch(xp, frame, boxes, out_hw: tuple[int, int], mean, std):
    """(N, 3, H, W) float32 network input from a uint8 BGR frame and clipped integer boxes.

    All boxes are resampled in one gather, so on the GPU it is a handful of kernels whatever N is.
    """
    boxes = xp.asarray(boxes)
    out_h, out_w = out_hw
    ylo, yhi, wy = _source_coords(xp, boxes[:, 1], boxes[:, 3] - boxes[:, 1], out_h)
    xlo, xhi, wx = _source_coords(xp, boxes[:, 0], boxes[:, 2] - boxes[:, 0], out_w)
    img = frame.astype(xp.float32)

    def gather(ys, xs):
        return img[ys[:, :, None], xs[:, None, :]]                       # (N, H, W, 3)

    wy = wy[:, :, None, None]
    wx = wx[:, None, :, None]
    top = gather(ylo, xlo) * (1 - wx) + gather(ylo, xhi) * wx
    bottom = gather(yhi, xlo) * (1 - wx) + gather(yhi, xhi) * wx
    rgb = (top * (1 - wy) + bottom * wy)[..., ::-1]                      # BGR -> RGB
    return normalize(xp, rgb, mean, std)


def normalize(xp, rgb, mean, std):
    """(N, H, W, 3) RGB values in 0..255 -> (N, 3, H, W) float32, normalised by mean/std on [0, 1]."""
    mean = xp.asarray(mean, dtype=xp.float32) * 255
    inv_std = 1 / (xp.asarray(std, dtype=xp.float32) * 255)
    out = (rgb.astype(xp.float32) - mean) * inv_std
    return xp.ascontiguousarray(out.transpose(0, 3, 1, 2))


def load_image(path) -> np.ndarray:
    """A BGR uint8 image from disk, or a clear error naming the file."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise HanEdgeError(f"cannot read image {path}: missing, corrupt or not an image")
    return image


def images_to_batch(images: list[np.ndarray], out_hw, mean, std) -> np.ndarray:
    """Whole images (each its own box) -> network input, through the same sampling as frames."""
    if not images:
        raise HanEdgeError("no images to embed")
    parts = []
    for image in images:
        check_frame(image)
        box = np.array([[0, 0, image.shape[1], image.shape[0]]], dtype=np.int64)
        parts.append(crop_batch(np, image, box, out_hw, mean, std))
    return np.concatenate(parts)
