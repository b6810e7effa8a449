"""Export stage: PyTorch -> ONNX, one function per format (the table of formats is ``han_edge.formats.ARTEFACTS``).

Precision lives in the ONNX, not in TensorRT builder flags (TensorRT 11 removed them). This module
writes the float formats (FP32, FP16) and checks them with ONNX Runtime; the INT8 formats are
``han_edge.quantize``; the job that writes a whole set of files is ``han_edge.jobs.export_all``.
File I/O and metadata are ``han_edge.onnx_io``.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from han_edge.config import HANConfig, config_from_metadata, model_metadata
from han_edge.errors import HanEdgeError
from han_edge.evaluate import cosine_rows
from han_edge.onnx_io import (
    INPUT,
    OUTPUT,
    load_onnx,
    onnx_metadata,
    ort_session,
    run_ort,
    save_onnx,
    set_metadata,
)
from han_edge.preprocess import images_to_batch, load_image

OPSET = 17   # FP32/FP16/CPU-INT8 files; the TensorRT INT8 + FP16 file is raised to 19 (FP16 Q/DQ scales)


# -- FP32 ----------------------------------------------------------------------------------------------
def export_fp32(model, config: HANConfig, path: str | Path, extra_meta: dict | None = None) -> Path:
    """torch -> ONNX (opset 17, dynamic batch) -> onnxsim -> metadata -> checker."""
    import onnx
    import onnxsim
    import torch

    model = model.eval()
    dummy = torch.zeros(2, 3, *config.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # tracer warnings about the input-size check
            # The TorchScript exporter: deterministic opset-17 graphs with named dynamic axes.
            torch.onnx.export(model, (dummy,), str(raw_path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        raw = onnx.load(str(raw_path))
    simplified, ok = onnxsim.simplify(raw)
    if not ok:
        raise HanEdgeError("onnxsim could not validate the simplified model")
    if any(n.op_type == "AffineGrid" for n in simplified.graph.node):
        raise HanEdgeError("exported graph contains AffineGrid, which TensorRT's ONNX parser lacks")
    set_metadata(simplified, model_metadata(config, "fp32", **(extra_meta or {})))
    onnx.checker.check_model(simplified)
    return save_onnx(simplified, path)


# -- FP16 ----------------------------------------------------------------------------------------------
def export_fp16(fp32_path: str | Path, path: str | Path) -> Path:
    """FP16 weights and activations, FP32 inputs/outputs.

    onnxconverter-common's converter: pure ONNX, runs on CPU, keeps I/O in FP32 with one Cast
    each way and blocks the ops without FP16 kernels (bilinear Resize here) in FP32.
    """
    from onnxconverter_common import float16

    model = load_onnx(fp32_path)
    meta = onnx_metadata(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "values truncated to fp16" notices
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    config, _ = config_from_metadata(meta, str(fp32_path))
    set_metadata(half, {**meta, **model_metadata(config, "fp16")})
    return save_onnx(half, path)


# -- checks ------------------------------------------------------------------------------------------------
def load_batch(paths: list[str], config: HANConfig) -> np.ndarray:
    """Images -> the model's pre-processed float32 batch (the runtime's own pre-processing)."""
    return images_to_batch([load_image(p) for p in paths], config.input_size, config.mean, config.std)


PARITY_MIN_COSINE = 0.999   # ONNX Runtime against PyTorch, FP32, every image


def torch_features(torch_model, batch: np.ndarray, source: str = "the model") -> np.ndarray:
    """PyTorch features of ``batch``; NaN or infinite ones (weights that overflow) are one sentence."""
    import torch

    with torch.no_grad():
        features = torch_model.eval()(torch.from_numpy(batch)).numpy()
    if not np.isfinite(features).all():
        raise HanEdgeError(f"{source} gives NaN or infinite features for finite images: its weights are broken")
    return features


def parity(torch_model, onnx_path: str | Path, batch: np.ndarray) -> dict:
    """Cosine (min over images) and max abs difference of ONNX Runtime vs PyTorch features.

    Below ``PARITY_MIN_COSINE`` (or NaN) the export is wrong: one sentence naming the file.
    """
    expected = torch_features(torch_model, batch)
    got = run_ort(ort_session(onnx_path), batch)
    result = {"cosine_min": float(cosine_rows(expected, got).min()), "max_abs_diff": float(np.abs(expected - got).max())}
    if not result["cosine_min"] >= PARITY_MIN_COSINE:
        raise HanEdgeError(f"{onnx_path} does not reproduce the PyTorch model (cosine {result['cosine_min']:.4f} on "
                           f"some image, needs {PARITY_MIN_COSINE}): do not use it")
    return result


def op_counts(model) -> dict[str, int]:
    """Node count per op type of an ONNX graph."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def ort_optimized_op_counts(path: str | Path, threads: int = 1) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime CPU actually executes (after its fusions).

    Uses ``SessionOptions.optimized_model_filepath``: ORT writes its optimised graph to a scratch
    file, where fused integer kernels show up as ``QLinearConv``/``QGemm``/``QLinear*`` nodes and
    convolutions left in float between Q/DQ pairs as ``Conv``/``FusedConv``.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath))
