"""Runtime: person crops in, features out — one pipeline for every backend.

frame (uploaded once) -> all boxes cropped, resized, normalised in one batched step on the backend's
device -> backend -> features stay on that device (for ``Gallery`` on the same device) unless asked
for on the host. The backend is chosen by ``han_edge.formats`` from the file (TensorRT, ONNX Runtime,
PyTorch, Triton); where its arrays live is the backend's ``xp``/``device``. On a NumPy backend the
host pre-processing (OpenCV per box) is used; on any other library the array-API gather.

Memory is bounded by one chunk: boxes are pre-processed and run ``max_batch`` at a time, so peak
memory is one chunk's input (max_batch x 3 x H x W float32: 7.9 MB at 64 x 160 x 64) plus the
(N, D) float32 features (4 KiB per box).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.arrays import ensure_on, is_numpy, to_numpy
from han_edge.backends import Backend, open_backend
from han_edge.config import HANConfig
from han_edge.errors import HanEdgeError
from han_edge.paths import require_file
from han_edge.preprocess import Normalizer, check_frame, clip_boxes, crop_batch, crop_batch_host, normalize, resize_crops


class Embedder:
    """Person crops -> (N, feature_dim) float32 features, per-branch L2-normalised (Section 3.4)."""

    def __init__(self, model: str | Path | Backend, max_batch: int | None = None, **backend_options):
        from han_edge.validate import positive_int

        if max_batch is not None:
            max_batch = positive_int(max_batch, "max_batch")
        if isinstance(model, Backend):
            if backend_options:
                raise HanEdgeError(f"backend options {sorted(backend_options)} apply when opening a model file, "
                                   f"not to an opened Backend")
            self.backend, self.source = model, model.name
        else:
            self.backend, self.source = open_backend(model, **_backend_options(backend_options)), str(model)
        self.config: HANConfig = self.backend.config
        self.precision: str = self.backend.precision
        self.max_batch = min(max_batch or self.backend.max_batch, self.backend.max_batch)
        self.xp, self.array_device = self.backend.xp, self.backend.device
        self.device = self.backend.kind
        self.on_host = is_numpy(self.xp)
        self.norm = Normalizer(self.xp, self.array_device, self.config.mean, self.config.std,
                               folded=self.backend.normalization == "folded")

    @property
    def name(self) -> str:
        return self.source if self.backend is None else self.backend.name

    @property
    def placement(self) -> tuple:
        """(xp, device) where features come out: give it to ``Gallery(device=...)`` to match on the same device."""
        return self.xp, self.array_device

    def _empty(self, on_device: bool):
        if on_device and not self.on_host:
            from han_edge.arrays import from_numpy
            return from_numpy(self.xp, np.zeros((0, self.config.feature_dim), np.float32), self.array_device)
        return np.zeros((0, self.config.feature_dim), np.float32)

    def _out(self, parts: list, on_device: bool):
        if not parts:
            return self._empty(on_device)
        out = parts[0] if len(parts) == 1 else self.xp.concat(parts)
        # broken weights or an input that overflows give NaN features: say so once per call, naming the model,
        # not later as "NaN rows" in a gallery (one scalar read back per call on the device path, not per chunk)
        if not bool(self.xp.all(self.xp.isfinite(out))):
            raise HanEdgeError(f"{self.source} gave NaN or infinite features for {out.shape[0]} crops: its weights "
                               "are broken or the input is far outside the 0..255 image range")
        return out if on_device or self.on_host else to_numpy(out)

    # -- stages ----------------------------------------------------------------------------------------
    def upload(self, frame, what: str = "frame"):
        """The frame as a uint8 array on the backend's device (a no-op for frames already there).

        A host backend copies a frame of another library (a CuPy/torch frame from a GPU decoder) to the
        host explicitly, once; a device backend refuses a frame of another library or device.
        """
        from han_edge.validate_arrays import _is_array, image

        if isinstance(frame, np.ndarray) or not _is_array(frame):
            image(frame, what)
        else:
            check_frame(frame)
        if self.on_host:
            return to_numpy(frame)
        return ensure_on(self.xp, frame, self.array_device)

    def preprocess_frame(self, frame, boxes):
        """Network input for every box of one frame (no chunking: for benchmarks and inspection)."""
        frame = self.upload(frame)
        return self._crop(frame, clip_boxes(boxes, frame.shape[:2]))

    def _crop(self, frame, boxes: np.ndarray):
        if self.on_host:
            return crop_batch_host(frame, boxes, self.config.input_size, self.norm)
        return crop_batch(self.xp, frame, boxes, self.config.input_size, self.norm)

    def close(self) -> None:
        """Release the backend (engine, session, device buffers, connection); the Embedder then refuses work."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _infer(self, batch):
        """One chunk (<= max_batch) through the backend, padded to a size its profile runs."""
        if self.backend is None:
            raise HanEdgeError(f"this Embedder of {self.source} is closed; open a new one")
        n = batch.shape[0]
        size = self.backend.padded_size(n)
        if size > n:
            from han_edge.cuda import zeros          # (CuPy needs its device context; others take device=)

            pad = zeros(self.xp, (size - n, *batch.shape[1:]), self.xp.float32, self.array_device)
            batch = self.xp.concat([batch, pad])
        return self.backend.infer(batch)[:n, ...]

    # -- public API ------------------------------------------------------------------------------------
    def embed_batch(self, batch, on_device: bool = False):
        """Network input (N, 3, H, W) float32 (host, or the backend's device) -> features, max_batch at a time."""
        from han_edge.arrays import namespace
        from han_edge.validate_arrays import finite

        expected = (3, *self.config.input_size)
        shape = tuple(getattr(batch, "shape", ()))
        if len(shape) != 4 or shape[1:] != expected:
            raise HanEdgeError(f"model input must be (N, {expected[0]}, {expected[1]}, {expected[2]}), got {shape}")
        floating = batch.dtype.kind == "f" if isinstance(batch, np.ndarray) else \
            namespace(batch).isdtype(batch.dtype, "real floating")
        if not floating:
            raise HanEdgeError(f"model input must be normalised float values, got {batch.dtype} (for uint8 images "
                               f"use embed_crops or embed_frame)")
        batch = ensure_on(self.xp, batch, self.array_device)
        with np.errstate(over="ignore"):                # float64 beyond float32 becomes inf: refused just below
            batch = batch if batch.dtype == self.xp.float32 else self.xp.astype(batch, self.xp.float32)
        if shape[0]:
            finite(batch, "model input (as float32)")
        parts = [self._infer(batch[i:i + self.max_batch, ...]) for i in range(0, shape[0], self.max_batch)]
        return self._out(parts, on_device)

    def embed_frame(self, frame, boxes, on_device: bool = False):
        """Features of the people in ``boxes`` (x1, y1, x2, y2 pixels) of a BGR uint8 frame.

        Boxes partly outside the frame are clipped to it; a box with no area inside it raises.
        An empty box list gives an empty (0, D) result.
        """
        return self.embed_frames([frame], [boxes], on_device)[0]

    def embed_frames(self, frames: list, boxes_per_frame: list, on_device: bool = False):
        """(features, frame_index): the crops of several frames (cameras) share inference batches.

        As DeepStream batches across streams: the boxes of all frames fill batches of ``max_batch``,
        and ``frame_index[i]`` says which frame feature ``i`` came from.
        """
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)                            # a stack of same-sized frames
        if not isinstance(frames, (list, tuple)):
            raise HanEdgeError(f"frames must be a list of H x W x 3 uint8 frames (for one frame use embed_frame); "
                               f"got {_describe(frames)}")
        if not isinstance(boxes_per_frame, (list, tuple)):
            raise HanEdgeError(f"boxes_per_frame must be a list with one box list per frame; got "
                               f"{_describe(boxes_per_frame)}")
        if len(frames) != len(boxes_per_frame):
            raise HanEdgeError(f"{len(frames)} frames but {len(boxes_per_frame)} box lists")
        work = []                                            # (frame on device, clipped host boxes, index)
        for i, (frame, boxes) in enumerate(zip(frames, boxes_per_frame)):
            frame = self.upload(frame, f"frame {i}")
            what = "boxes" if len(frames) == 1 else f"boxes of frame {i}"
            clipped = clip_boxes(boxes, frame.shape[:2], what)
            if len(clipped):
                work.append((frame, clipped, i))
        index = np.concatenate([np.full(len(c), i, np.int64) for _, c, i in work]) if work else np.zeros(0, np.int64)
        parts, pending, filled = [], [], 0
        for frame, clipped, _ in work:
            pos = 0
            while pos < len(clipped):            # a frame's boxes may straddle two batches
                take = clipped[pos:pos + self.max_batch - filled]
                pending.append(self._crop(frame, take))
                filled, pos = filled + len(take), pos + len(take)
                if filled == self.max_batch:
                    parts.append(self._run_pending(pending))
                    pending, filled = [], 0
        if pending:
            parts.append(self._run_pending(pending))
        return self._out(parts, on_device), index

    def _run_pending(self, pending: list):
        batch = pending[0] if len(pending) == 1 else self.xp.concat(pending)
        return self._infer(batch)

    def embed_crops(self, crops: list, on_device: bool = False):
        """Features of already-cut person crops (host BGR uint8 arrays of any size).

        Each crop is resized on the host (OpenCV), the stack uploaded once per chunk and normalised
        on the device.
        """
        from han_edge.validate_arrays import image, images

        if not isinstance(crops, (list, tuple)):
            images(crops)                                    # one sentence naming what was given instead
        parts = []
        for start in range(0, len(crops), self.max_batch):
            chunk = list(crops[start:start + self.max_batch])
            for j, crop in enumerate(chunk):
                image(crop, f"crop {start + j}")
            resized = ensure_on(self.xp, resize_crops(chunk, self.config.input_size), self.array_device)
            parts.append(self._infer(normalize(self.xp, resized, self.norm)))
        return self._out(parts, on_device)

    def embed_files(self, paths: list, chunk: int = 256, progress=None, on_device: bool = False):
        """Features of image files, read ``chunk`` at a time to bound memory."""
        import os

        from han_edge.preprocess import load_image
        from han_edge.validate import positive_int

        chunk = positive_int(chunk, "chunk")
        if progress is not None and not callable(progress):
            raise HanEdgeError(f"progress must be a function taking the images done, or None; got {_describe(progress)}")
        if not isinstance(paths, (list, tuple)):
            raise HanEdgeError(f"paths must be a list of image file names; got {_describe(paths)}")
        for i, p in enumerate(paths):
            if not isinstance(p, (str, os.PathLike)) or isinstance(p, bytes) or not str(p):
                raise HanEdgeError(f"path {i} is {_describe(p)}, not an image file name")
            require_file(Path(p), "image")
        parts = []
        for start in range(0, len(paths), chunk):
            parts.append(self.embed_crops([load_image(p) for p in paths[start:start + chunk]], on_device=True))
            if progress:
                progress(parts[-1].shape[0])
        return self._out(parts, on_device)


def _describe(value) -> str:
    from han_edge.validate import _describe as describe

    return describe(value)


def _backend_options(options: dict) -> dict:
    """The options every backend shares, checked before any file is opened (one sentence each)."""
    import math

    from han_edge.validate import positive_int, real_number, thread_count

    out = dict(options)
    if out.get("max_batch") is not None:
        out["max_batch"] = positive_int(out["max_batch"], "max_batch")
    if "threads" in out:
        out["threads"] = thread_count(out["threads"])
    if "timeout_s" in out:
        timeout = real_number(out["timeout_s"], "timeout_s")
        if not timeout > 0 or math.isinf(timeout):
            raise HanEdgeError(f"timeout_s must be a positive number of seconds; got {timeout}")
        out["timeout_s"] = timeout
    return out
