"""ONNX files at the bottom of the stack: read (checked), write (atomic), metadata, one ONNX Runtime CPU session helper.

Imports no stage of han-edge, so the exporter, the TensorRT builder, the runtime and the CLI can all
use it without import cycles.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.config import HANConfig, config_from_metadata
from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.fileio import atomic_path

INPUT, OUTPUT = "images", "features"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("reading ONNX files needs the onnx package: pip install 'han-edge[ort]'") from None
    return onnx


def load_onnx(path: str | Path):
    onnx = _onnx()
    path = Path(path)
    if path.is_dir():
        raise HanEdgeError(f"{path} is a directory, not an ONNX file")
    if not path.is_file():
        raise HanEdgeError(f"ONNX file {path} not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:
        raise HanEdgeError(f"{path} is not a valid ONNX model: {str(err).splitlines()[0][:200]}") from None
    return model


def onnx_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model, meta: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in meta.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def save_onnx(model, path: str | Path) -> Path:
    """Atomic write: a failed export never leaves a truncated .onnx behind."""
    onnx = _onnx()
    with atomic_path(path, "ONNX file") as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def read_config(path: str | Path) -> tuple[HANConfig, str]:
    return config_from_metadata(onnx_metadata(load_onnx(path)), str(path))


def ort_session(path: str | Path, threads: int = 0, providers: list[str] | None = None):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise), or one sentence why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("running .onnx models needs ONNX Runtime: pip install 'han-edge[ort]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:
        raise HanEdgeError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0][:200]}") from None


def run_ort(session, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT], {INPUT: batch[i:i + chunk]})[0]
                           for i in range(0, len(batch), chunk)])
