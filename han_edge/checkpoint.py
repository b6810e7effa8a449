"""Checkpoints: weights + model config + training state, saved atomically, loaded as data only."""
from __future__ import annotations

import os
from pathlib import Path

from han_edge.config import HANConfig
from han_edge.errors import HanEdgeError

FORMAT = "han-edge-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, model, config: HANConfig, **state) -> None:
    """Write to a temporary file then rename, so a crash never leaves a half-written checkpoint."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
               "num_classes": model.num_classes, "state_dict": model.state_dict(), **state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict; ``weights_only=True`` so a checkpoint can never run code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise HanEdgeError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code...
        raise HanEdgeError(f"checkpoint {path} cannot be read as a han-edge checkpoint: {err}".split("\n")[0]) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HanEdgeError(f"{path} is not a han-edge checkpoint (no '{FORMAT}' marker)")
    if data.get("version", 0) > VERSION:
        raise HanEdgeError(f"checkpoint {path} has format version {data['version']}; this han-edge reads {VERSION}")
    return data


def model_from_checkpoint(path: str | Path, variant: str | None = None, map_location="cpu"):
    """(model in eval mode, config, checkpoint dict); ``variant`` guards against the wrong file."""
    from han_edge.model import HAN

    data = load_checkpoint(path, map_location)
    config = HANConfig.from_dict(data["config"])
    if variant is not None and config.variant != variant:
        raise HanEdgeError(f"checkpoint {path} holds HAN({config.variant}), not HAN({variant})")
    model = HAN(config, data.get("num_classes", 0))
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as err:
        raise HanEdgeError(f"checkpoint {path} does not fit HAN({config.variant}): {str(err).splitlines()[0]}") from None
    return model.eval(), config, data
