"""End-to-end jobs built from the stages: embedding image folders/videos, and the README's demo."""
from __future__ import annotations

import json
import re
import time
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


def run_demo(epochs: int, workdir: Path, batch: int, console, progress_bar) -> list[dict]:
    """The README's main job: synthetic data -> trained HAN(Small) -> FP32/INT8 -> gallery search table."""
    from rich.table import Table

    from han_edge.cuda import gpu_available
    from han_edge.data import default_synthetic_root, load_dataset
    from han_edge.evaluate import evaluate_rank
    from han_edge.export import ExportOptions, export_all
    from han_edge.profile import measure_throughput
    from han_edge.train import TrainOptions, train

    workdir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]1/4[/] synthetic re-id set in {default_synthetic_root()}")
    data = load_dataset("synthetic", None)
    checkpoint = workdir / "han_small.pt"
    console.print(f"[bold]2/4[/] training HAN(Small) for {epochs} epochs on {len(data.train)} images")
    with progress_bar() as bar:
        task = bar.add_task("train", total=len(data.train) // 32 * 32 * epochs, info="")
        train(data.train, data.num_train_pids, checkpoint, "small", TrainOptions(epochs=epochs), dataset_name="synthetic",
              progress=lambda epoch, epochs, loss, rate, advance: bar.update(
                  task, advance=advance, description=f"epoch {epoch}/{epochs}", info=f"loss {loss:.3f} {rate:.0f} img/s"))
    has_gpu = gpu_available()
    target = "tensorrt" if has_gpu else "cpu"
    console.print(f"[bold]3/4[/] exporting FP32 and INT8 ({target} flavour) ONNX")
    with progress_bar() as bar:
        task = bar.add_task("INT8 sensitivity", total=None, info="", visible=False)
        exported = export_all(ExportOptions(checkpoint=str(checkpoint), int8=True, int8_target=target,
                                            out_dir=str(workdir)), log=console.print,
                              progress=lambda d, t: bar.update(task, completed=d, total=t, visible=True))
    models = {"PyTorch FP32": checkpoint, "ONNX FP32": Path(exported["fp32"]), f"ONNX INT8 ({target})":
              Path(exported["int8"]["path"])}
    if has_gpu:
        try:
            from han_edge.engine import BuildOptions, build_engine
            models["TensorRT INT8"] = build_engine(exported["int8"]["path"], workdir / "han_small.int8.plan",
                                                   BuildOptions(timing_cache=workdir / "timing.cache"))
        except HanEdgeError as err:
            console.print(f"TensorRT engine skipped: {err}")
    console.print("[bold]4/4[/] gallery search through the runtime, per precision")
    q_pids, q_cams = (np.array(v) for v in zip(*[(p, c) for _, p, c in data.query]))
    g_pids, g_cams = (np.array(v) for v in zip(*[(p, c) for _, p, c in data.gallery]))
    rows = []
    for label, path in models.items():
        embedder = Embedder(path)
        start = time.perf_counter()
        g_feats = embedder.embed_files([p for p, _, _ in data.gallery])
        q_feats = embedder.embed_files([p for p, _, _ in data.query])
        gallery = Gallery(embedder.config.feature_dim)
        gallery.add(g_pids, g_feats, g_cams)
        dist = gallery.distances(q_feats, g_feats)   # every gallery entry, for the protocol's ranking
        metrics = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
        speed = measure_throughput(path, batch, iters=5)
        rows.append({"model": label, "rank1": metrics["rank1"], "mAP": metrics["mAP"],
                     "images_per_s": speed["images_per_s"], "ms_per_image": speed["ms_per_image"],
                     "size_mib": Path(path).stat().st_size / 2**20,
                     "embed_s": time.perf_counter() - start})
    table = Table(title=f"HAN(Small) on the synthetic set: {len(data.query)} queries x {len(data.gallery)} gallery "
                        f"(batch {batch} throughput)")
    for col in ("model", "rank-1", "mAP", "img/s", "ms/img", "size MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{100 * r['rank1']:.1f}", f"{100 * r['mAP']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{r['ms_per_image']:.2f}", f"{r['size_mib']:.2f}")
    console.print(table)
    (workdir / "demo.json").write_text(json.dumps(rows, indent=2))
    return rows
