"""ONNX Runtime's static quantiser, driven one calibration batch at a time and kept quiet.

The call itself and its data reader, apart from the INT8 export that decides what to quantise
(``han_edge.quantize``) and where (``han_edge.int8_layers``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from han_edge.int8_layers import WEIGHTED_OPS
from han_edge.onnx_io import INPUT

CALIBRATION_METHODS = ("percentile", "entropy", "minmax")


class ImageReader:
    """ONNX Runtime CalibrationDataReader over pre-processed images, one batch of ``chunk`` at a time.

    ``len()`` counts batches and ``set_range`` selects batches: with ORT's ``CalibStridedMinMax=1``
    ``quantize_static`` collects one batch per call, so calibration holds one batch's activations
    instead of every image's (256 images of HAN-S: ~7 GB resident; the histogram calibrators merge
    batch by batch). All batches have one size (the last ends at the last image and overlaps the
    one before), which ORT's histogram collectors also need.
    """

    def __init__(self, batch: np.ndarray, chunk: int = 32):
        self.batch, self.chunk = batch, max(1, min(chunk, len(batch)))
        self.starts = [min(i, len(batch) - self.chunk) for i in range(0, len(batch), self.chunk)]
        self.range, self.pos = (0, len(self.starts)), 0

    def set_range(self, start_index: int, end_index: int):
        self.range, self.pos = (start_index, min(end_index, len(self.starts))), start_index

    def get_next(self):
        if self.pos >= self.range[1]:
            return None
        start = self.starts[self.pos]
        self.pos += 1
        return {INPUT: self.batch[start:start + self.chunk]}

    def rewind(self):
        self.pos = self.range[0]

    def __len__(self):
        return len(self.starts)


def calibration_cache_paths(int8_path: Path) -> tuple[Path, Path]:
    """The calibration cache and its key file written beside an INT8 model (``<stem>.calib.json``/``.calib.key``)."""
    cache = int8_path.with_name(int8_path.name.removesuffix(".onnx") + ".calib.json")
    return cache, cache.with_suffix(".key")


def calibration_key(source_model, calib_batch: np.ndarray, method: str, flavour) -> str:
    """Digest of what the ranges depend on: the graph calibrated (the equalised one), images, method, flavour."""
    digest = hashlib.sha256(source_model.SerializeToString())
    digest.update(np.ascontiguousarray(calib_batch).tobytes())
    digest.update(f"{method}/{flavour.name}".encode())
    return digest.hexdigest()[:16]


def key_line(key: str, cache: bytes) -> bytes:
    return f"{key} {hashlib.sha256(cache).hexdigest()[:32]}".encode()


def quantize(source: Path, out_path: Path, calib_batch: np.ndarray, flavour, method: str,
             exclude_nodes: list[str], cache_path: Path) -> Path:
    """One ORT static quantisation; ranges come from ``cache_path`` after the first calibration.

    ``flavour`` is a ``han_edge.quantize.Int8Flavour`` (the Q/DQ conventions of one consumer).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
               "minmax": CalibrationMethod.MinMax}
    extra = {"ActivationSymmetric": flavour.activation_symmetric, "WeightSymmetric": True, "QuantizeBias": False,
             "CalibPercentile": 99.999, "CalibTensorRangeSymmetric": flavour.activation_symmetric,
             "CalibStridedMinMax": 1}   # one batch per collection (see ImageReader), for every method
    if not flavour.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(WEIGHTED_OPS)
    # ORT prints calibration chatter and pre-processing advice through print() and the root logger.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_static(
            str(source), str(out_path), ImageReader(calib_batch), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(flavour.op_types), per_channel=True,
            activation_type=QuantType.QUInt8 if flavour.unsigned_activations else QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=exclude_nodes, calibrate_method=methods[method],
            extra_options=extra, calibration_cache_path=str(cache_path))
    return out_path


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
