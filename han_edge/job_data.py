"""What the jobs read when the user gives nothing: calibration and held-out crops, the model of a checkpoint.

Below ``han_edge.jobs`` (and the benchmarks); the synthetic set is made on first use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError


def calibration_paths(calib_dir: str | None, size: int, seed: int = 0) -> list[str]:
    """Up to ``size`` images from ``calib_dir`` (default: the synthetic set's training images)."""
    from han_edge.data import IMAGE_SUFFIXES, default_synthetic_root
    from han_edge.synthetic import ensure_synthetic

    if calib_dir is None:
        folder = ensure_synthetic(default_synthetic_root()) / "bounding_box_train"
    else:
        folder = Path(calib_dir)
        if not folder.is_dir():
            raise HanEdgeError(f"calibration folder {folder} not found")
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise HanEdgeError(f"calibration folder {folder} holds no images (.jpg/.png/.bmp); see calib/README.md")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(paths, size=min(size, len(paths)), replace=False).tolist())


def heldout_paths(limit: int = 512, offset: int = 0) -> list[str]:
    """Every n-th crop of the held-out people (``data.heldout_crops``), from ``offset``.

    They are never used for training or calibration. With ``limit`` up to half the ~1,080 crops, offsets
    0 and 1 are disjoint: the export chooses its INT8 exclusions on one set and reports accuracy on the
    other (512 crops: the nearest-neighbour agreement's sampling error ~0.01; 0.014 on 256).
    """
    from han_edge.data import heldout_crops

    if limit < 1:
        raise HanEdgeError(f"heldout_paths needs a limit of at least 1, not {limit}")
    items = heldout_crops()
    if offset and limit > len(items) // 2:
        raise HanEdgeError(f"heldout_size {limit} is more than half the {len(items)} held-out crops: "
                           "the INT8 analysis and its report would share crops")
    return items[offset:: max(1, len(items) // limit)][:limit]


def load_torch_model(variant: str, checkpoint: str | None):
    """(model, config, note) from a checkpoint, or fresh weights of the variant."""
    from han_edge.checkpoint import model_from_checkpoint
    from han_edge.config import get_config
    from han_edge.model import build_model

    if checkpoint:
        model, config, data = model_from_checkpoint(checkpoint, variant=get_config(variant).variant)
        return model, config, f"checkpoint {checkpoint} (epoch {data.get('epoch', '?')})"
    config = get_config(variant)
    import torch
    torch.manual_seed(0)
    return build_model(config).eval(), config, "fresh (untrained) weights: pass --checkpoint for a trained model"
