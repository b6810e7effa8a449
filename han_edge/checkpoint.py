"""Checkpoints: weights + model config + training state, saved atomically, loaded as data only."""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

from han_edge.config import HANConfig
from han_edge.errors import HanEdgeError
from han_edge.fileio import atomic_path
from han_edge.paths import as_path, require_file
from han_edge.validate import PYTHON_OBJECTS, reason

FORMAT = "han-edge-checkpoint"
VERSION = 1
CLASSIFIERS = ("global_classifier.", "local_classifier.")   # training-only state_dict entries


def save_checkpoint(path: str | Path, model, config: HANConfig, **state) -> None:
    """Atomic (``fileio.atomic_path``): a crash, a full disk or Ctrl-C never leaves a half-written checkpoint.

    A missing parent folder is created (checkpoints go to ``runs/`` by default); any other problem
    with the destination is one sentence before anything is written.
    """
    import torch

    from han_edge.paths import ensure_folder

    from han_edge.model import HAN

    path = as_path(path, "checkpoint")
    if not isinstance(model, HAN) or not isinstance(config, HANConfig):
        raise HanEdgeError(f"save_checkpoint needs a HAN model and its HANConfig; got {type(model).__name__} and "
                           f"{type(config).__name__}")
    if not path.parent.exists():
        ensure_folder(path.parent, "checkpoint folder")
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
               "num_classes": model.num_classes, "state_dict": model.state_dict(), **state}
    refused = HanEdgeError(f"checkpoint {path} not written: the training state given holds Python objects, which "
                           "load_checkpoint refuses; pass tensors, numbers, strings, lists and dicts")
    with atomic_path(path, "checkpoint") as tmp:
        try:
            torch.save(payload, tmp)
        except (pickle.PicklingError, AttributeError, TypeError):
            raise refused from None
        try:   # what cannot be loaded back as data is never written (the previous checkpoint stays)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(tmp, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise refused from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint dict; ``weights_only=True`` so a checkpoint can never run code."""
    import torch

    path = as_path(path, "checkpoint")
    require_file(path, "checkpoint")
    if not zipfile.is_zipfile(path) and not _starts_with(path, b"\x80"):   # a zip (torch.save) or a pickle (legacy)
        raise HanEdgeError(f"checkpoint {path} cannot be read as a han-edge checkpoint: it is not a file written by torch.save")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's message advises retrying with weights_only=False, i.e. running the file's code: never passed on
        raise HanEdgeError(f"checkpoint {path} cannot be read as a han-edge checkpoint: {PYTHON_OBJECTS}") from None
    except Exception as err:  # truncated zip, not a torch file, unreadable...
        raise HanEdgeError(f"checkpoint {path} cannot be read as a han-edge checkpoint: {reason(err)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HanEdgeError(f"{path} is not a han-edge checkpoint (no '{FORMAT}' marker)")
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise HanEdgeError(f"checkpoint {path} has a format version of the wrong type ({type(version).__name__})")
    if version > VERSION:
        raise HanEdgeError(f"checkpoint {path} has format version {data['version']}; this han-edge reads {VERSION}")
    if not isinstance(data.get("state_dict"), dict):
        raise HanEdgeError(f"checkpoint {path} holds no weights (state_dict)")
    checkpoint_config(data, path)
    return data


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def checkpoint_config(data: dict, path: str | Path) -> HANConfig:
    """The model config stored in a loaded checkpoint, or one sentence saying what is wrong with it."""
    if not isinstance(data.get("config"), dict):
        raise HanEdgeError(f"checkpoint {path} holds no model config")
    return HANConfig.from_dict(data["config"], f"checkpoint {path}")


def model_from_checkpoint(path: str | Path, variant: str | None = None, map_location="cpu"):
    """(model in eval mode, config, checkpoint dict); ``variant`` guards against the wrong file."""
    from han_edge.model import HAN

    data = load_checkpoint(path, map_location)
    config = checkpoint_config(data, path)
    if variant is not None and config.variant != variant:
        raise HanEdgeError(f"checkpoint {path} holds HAN({config.variant}), not HAN({variant})")
    num_classes = data.get("num_classes", 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= 10**7:
        raise HanEdgeError(f"checkpoint {path} has an invalid number of identities ({num_classes!r})")
    # the identity classifiers (up to 10**7 rows) are training state: inference never builds them
    weights = {k: v for k, v in data["state_dict"].items() if not str(k).startswith(CLASSIFIERS)}
    model = HAN(config, 0)
    floats = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    cast = sorted(k for k, v in weights.items() if k in floats and hasattr(v, "is_floating_point") and not v.is_floating_point())
    if cast:   # load_state_dict would cast complex (dropping the imaginary part), bool or integer weights silently
        raise HanEdgeError(f"checkpoint {path} stores {len(cast)} weight tensor{'s' * (len(cast) > 1)} ({', '.join(cast[:2])}"
                           f"{', ...' if len(cast) > 2 else ''}) as {weights[cast[0]].dtype}, not floating point")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines or ["?"])[0]
        raise HanEdgeError(f"checkpoint {path} does not fit HAN({config.variant}): {reason(detail, 200)}") from None
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        raise HanEdgeError(f"checkpoint {path} has NaN or infinite weights in {len(broken)} tensors "
                           f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): the training diverged "
                           "or the file is damaged")
    return model.eval(), config, data
