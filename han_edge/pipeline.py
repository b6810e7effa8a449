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
    """The boxes file checked against its schema (``validate.boxes_file``): key -> [[x1, y1, x2, y2], ...] floats."""
    if path is None:
        return None
    from han_edge.validate import boxes_file

    return {key: value.tolist() for key, value in boxes_file(path).items()}


def _pid_cam(name: str) -> tuple[int, int]:
    """Identity and camera from a Market-style file name, -1 where the name does not say."""
    match = _PID_CAM.match(name)
    return (int(match.group(1)), int(match.group(2)) - 1) if match else (-1, -1)


def embed_sources(model_path, images: Path | None, video: Path | None, boxes_path: Path | None,
                  progress=None) -> tuple[Gallery, int]:
    """A gallery of features from an image folder (whole images or boxes) or a video with boxes."""
    from han_edge.preprocess import load_image

    embedder = Embedder(model_path)
    boxes = _read_boxes(boxes_path)
    gallery = Gallery(embedder.config.feature_dim)
    if images is not None:
        if not images.is_dir():
            raise HanEdgeError(f"image folder {images} not found")
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise HanEdgeError(f"no images in {images}")
        for path in files:
            pid, cam = _pid_cam(path.name)
            frame = load_image(path)
            frame_boxes = boxes.get(path.name, []) if boxes is not None else [[0, 0, frame.shape[1], frame.shape[0]]]
            feats = embedder.embed_frame(frame, frame_boxes)
            gallery.add(np.full(len(feats), pid), feats, np.full(len(feats), cam))
            if progress:
                progress(len(feats))
    else:
        import cv2

        if boxes is None:
            raise HanEdgeError("--video needs --boxes (frame index -> boxes)")
        if not video.is_file():
            raise HanEdgeError(f"video {video} not found")
        capture = cv2.VideoCapture(str(video))
        if not capture.isOpened():
            raise HanEdgeError(f"cannot open video {video}")
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frame_boxes = boxes.get(str(index), [])
            if frame_boxes:
                feats = embedder.embed_frame(frame, frame_boxes)
                gallery.add(np.full(len(feats), index), feats, np.full(len(feats), -1))
                if progress:
                    progress(len(feats))
            index += 1
        capture.release()
    return gallery, len(gallery)
