"""Embedding image folders/videos into a gallery (the demo and the export job are in ``han_edge.jobs``)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from han_edge.data import IMAGE_SUFFIXES
from han_edge.errors import HanEdgeError
from han_edge.gallery import Gallery
from han_edge.runtime import Embedder

_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)")


def _read_boxes(path: Path | None) -> dict | None:
    """The boxes file checked against its schema (``boxes.boxes_file``): key -> float64 (N, 4)."""
    if path is None:
        return None
    from han_edge.boxes import boxes_file

    return boxes_file(path)


def _pid_cam(name: str) -> tuple[int, int]:
    """Identity and camera from a Market-style file name; (-1, -1) where the name does not say.

    A number beyond the gallery's 64-bit range is not an identity either: such a name says nothing.
    """
    match = _PID_CAM.match(name)
    if not match:
        return -1, -1
    pid, cam = int(match.group(1)), int(match.group(2)) - 1
    limit = np.iinfo(np.int64)
    return (pid, cam) if limit.min <= pid <= limit.max and cam <= limit.max else (-1, -1)


def _check_video_name(video: Path) -> None:
    """OpenCV's video reader takes a UTF-8 name (it crashes the process on any other: Linux names are bytes) and
    reads '%' as a printf pattern."""
    try:
        str(video).encode("utf-8")
    except UnicodeEncodeError:
        raise HanEdgeError(f"cannot open video {str(video)!r}: its name is not valid UTF-8, which OpenCV cannot "
                           "open; rename the file") from None
    if re.search(r"%0?[0-9]*d", video.name):   # OpenCV reads "f%d.jpg" as the image sequence f0.jpg, f1.jpg, ...
        raise HanEdgeError(f"cannot open video {video}: OpenCV reads a name with '%d' as an image-sequence pattern "
                           "and would read other files; rename it")


def embed_sources(model_path, images: Path | None, video: Path | None, boxes_path: Path | None,
                  progress=None, gallery: Gallery | None = None, frames_per_batch: int = 16) -> tuple[Gallery, int]:
    """A gallery of features from an image folder (whole images or boxes) or a video with boxes.

    Crops of several images / frames share inference batches (``Embedder.embed_frames``); features go
    into the gallery on the embedder's device (or into ``gallery``, e.g. a Milvus one).
    """
    from han_edge.boxes import boxes_by_file, frame_keys, missing_frames

    embedder = Embedder(model_path)
    boxes = _read_boxes(boxes_path)
    if gallery is None:
        gallery = Gallery(embedder.config.feature_dim, device=embedder.placement)
    elif gallery.dim != embedder.config.feature_dim:
        raise HanEdgeError(f"the gallery holds {gallery.dim}-D features but {model_path} gives "
                           f"{embedder.config.feature_dim}-D ones")
    if images is not None:
        if not images.is_dir():
            raise HanEdgeError(f"image folder {images} not found")
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise HanEdgeError(f"no images in {images}")
        if boxes is not None:
            boxes = boxes_by_file(boxes, files, images, str(boxes_path))
            files = [p for p in files if p in boxes]
        for start in range(0, len(files), frames_per_batch):
            _embed_images(embedder, gallery, files[start:start + frames_per_batch], boxes, progress)
    else:
        import cv2

        if boxes is None:
            raise HanEdgeError("--video needs --boxes (frame index -> boxes)")
        if not video.is_file():
            raise HanEdgeError(f"video {video} not found")
        by_frame = frame_keys(boxes, str(boxes_path))
        _check_video_name(video)
        capture = cv2.VideoCapture(str(video))
        if not capture.isOpened():
            raise HanEdgeError(f"cannot open video {video}")
        index, pending = 0, []
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if index in by_frame and len(by_frame[index]):
                    pending.append((index, frame, by_frame[index]))
                if len(pending) == frames_per_batch:
                    _embed_frames(embedder, gallery, pending, progress)
                    pending = []
                index += 1
            if pending:
                _embed_frames(embedder, gallery, pending, progress)
        finally:
            capture.release()
        missing_frames(by_frame, index, str(boxes_path), f"video {video}")
    return gallery, len(gallery)


def _embed_images(embedder: Embedder, gallery: Gallery, files: list[Path], boxes: dict | None, progress) -> None:
    from han_edge.preprocess import load_image

    pid_cam = np.array([_pid_cam(p.name) for p in files], np.int64).reshape(-1, 2)
    if boxes is None:                        # each image is one crop
        feats = embedder.embed_crops([load_image(p) for p in files], on_device=True)
        pids, cams = pid_cam[:, 0], pid_cam[:, 1]
    else:
        frames = [load_image(p) for p in files]
        feats, which = embedder.embed_frames(frames, [boxes[p] for p in files], on_device=True)
        pids, cams = pid_cam[which, 0], pid_cam[which, 1]
    gallery.add(pids, feats, cams)
    if progress:
        progress(len(pids))


def _embed_frames(embedder: Embedder, gallery: Gallery, pending: list, progress) -> None:
    """Frames of a video: the identity column holds the frame index (no identities are known yet)."""
    indices = np.array([i for i, _, _ in pending], np.int64)
    feats, which = embedder.embed_frames([f for _, f, _ in pending], [b for _, _, b in pending], on_device=True)
    gallery.add(indices[which], feats, np.full(len(which), -1))
    if progress:
        progress(len(which))
