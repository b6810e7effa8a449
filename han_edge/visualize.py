"""Attention pictures (the paper's Fig. 7): hard-attention regions and soft spatial attention per level."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.preprocess import images_to_batch, load_image

LEVEL_COLOURS = [(0, 0, 255), (0, 200, 0), (255, 128, 0)]   # BGR: level 1, 2, 3
SCALE = 3


def region_boxes(theta: np.ndarray, regions: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes of the T regions: centre (tx, ty) in [-1, 1], full width, 1/T of the height."""
    boxes = []
    for tx, ty in theta:
        x1, x2 = (tx - 1 + 1) / 2 * width, (tx + 1 + 1) / 2 * width
        y1, y2 = (ty - 1 / regions + 1) / 2 * height, (ty + 1 / regions + 1) / 2 * height
        boxes.append((int(x1), int(y1), int(x2), int(y2)))
    return boxes


def attention_figure(checkpoint: str | Path, image_path: str | Path, out: str | Path) -> Path:
    """Write the figure as PNG to ``out`` (atomically; the destination is checked before the model is loaded)."""
    import torch

    from han_edge.checkpoint import model_from_checkpoint
    from han_edge.fileio import atomic_write_bytes
    from han_edge.paths import check_destination, ensure_folder

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise HanEdgeError(f"the attention picture is written as PNG; name it *.png, not {out.name}")
    if not out.parent.exists():
        ensure_folder(out.parent, "picture folder")
    check_destination(out, "attention picture")
    model, config, _ = model_from_checkpoint(checkpoint)
    image = load_image(image_path)
    x = images_to_batch([image], config.input_size, config.mean, config.std)
    with torch.no_grad():
        _, _, levels = model.features(torch.from_numpy(x))
    if not all(bool(torch.isfinite(t).all()) for level in levels for t in level.values() if torch.is_tensor(t)):
        raise HanEdgeError(f"checkpoint {checkpoint} gives NaN or infinite attention for {image_path}: its weights "
                           "overflow (a diverged or damaged checkpoint)")
    h, w = config.input_size
    resized = cv2.resize(image, (w * SCALE, h * SCALE), interpolation=cv2.INTER_LINEAR)
    panels = []
    boxes_panel = resized.copy()
    for level, colour in zip(levels, LEVEL_COLOURS):
        for box in region_boxes(level["theta"][0].numpy(), config.regions, h * SCALE, w * SCALE):
            cv2.rectangle(boxes_panel, box[:2], box[2:], colour, 2)
    panels.append(boxes_panel)
    for level in levels:   # soft attention averaged over channels, min-max stretched for display
        soft = level["soft"][0].mean(0).numpy()
        soft = (soft - soft.min()) / max(float(soft.max() - soft.min()), 1e-6)
        heat = cv2.applyColorMap((cv2.resize(soft, (w * SCALE, h * SCALE)) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        panels.append(cv2.addWeighted(resized, 0.5, heat, 0.5, 0))
    figure = np.concatenate([np.pad(p, ((4, 4), (4, 4), (0, 0)), constant_values=255) for p in panels], axis=1)
    ok, png = cv2.imencode(".png", figure)
    if not ok:
        raise HanEdgeError(f"cannot encode the attention picture for {out}")
    return atomic_write_bytes(out, png.tobytes(), "attention picture")
