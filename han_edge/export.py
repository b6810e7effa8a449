"""Export: ONNX (dynamic batch, simplified, parity-checked), FP16 and calibrated INT8 Q/DQ models.

Precision lives in the ONNX, not in TensorRT builder flags (TensorRT 11 removed them): the FP16
model has FP16 weights/activations with FP32 I/O; the INT8 model has explicit Q/DQ nodes. Both are
checked here with ONNX Runtime; TensorRT (``engine``) only compiles them.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from han_edge.config import HANConfig, config_from_metadata, model_metadata
from han_edge.errors import HanEdgeError
from han_edge.onnx_io import (INPUT, OUTPUT, load_onnx, onnx_metadata, ort_session, read_config, run_ort,  # noqa: F401
                              save_onnx, set_metadata)
from han_edge.preprocess import images_to_batch, load_image

OPSET = 17


# -- FP32 ----------------------------------------------------------------------------------------------
def export_fp32(model, config: HANConfig, path: str | Path, extra_meta: dict | None = None) -> Path:
    """torch -> ONNX (opset 17, dynamic batch) -> onnxsim -> metadata -> checker."""
    import onnx
    import onnxsim
    import torch

    model = model.eval()
    dummy = torch.zeros(2, 3, *config.input_size)
    tmp = Path(str(path) + ".raw")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer warnings about the input-size check
        # The TorchScript exporter: deterministic opset-17 graphs with named dynamic axes.
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    raw = onnx.load(str(tmp))
    tmp.unlink()
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
    each way and blocks the ops without FP16 kernels (bilinear Resize here) in FP32. ModelOpt's
    AutoCast would also do, but pulls a large dependency for the same result on this graph.
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


def load_batch(paths: list[str], config: HANConfig) -> np.ndarray:
    return images_to_batch([load_image(p) for p in paths], config.input_size, config.mean, config.std)


def parity(torch_model, onnx_path: str | Path, batch: np.ndarray) -> dict:
    """Cosine (min over images) and max abs difference of ONNX Runtime vs PyTorch features."""
    import torch

    with torch.no_grad():
        expected = torch_model.eval()(torch.from_numpy(batch)).numpy()
    got = run_ort(ort_session(onnx_path), batch)
    return {"cosine_min": float(cosine_rows(expected, got).min()),
            "max_abs_diff": float(np.abs(expected - got).max())}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)


def centred_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean cosine after subtracting the reference's mean feature.

    An untrained or weak network maps every image near one point, where the plain cosine is ~1
    whatever the quantisation does; centring measures what distinguishes images.
    """
    mu = reference.mean(0, keepdims=True)
    return float(cosine_rows(reference - mu, other - mu).mean())


def neighbour_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of images whose nearest other image is the same under both feature sets."""
    def nearest(f):
        d = -f @ f.T
        np.fill_diagonal(d, np.inf)
        return d.argmin(1)
    return float((nearest(reference) == nearest(other)).mean())


# -- INT8 ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Flavour:
    """Q/DQ conventions of one consumer of the INT8 model."""

    name: str
    precision: str
    activation_symmetric: bool
    unsigned_activations: bool


INT8_FLAVOURS = {
    # TensorRT: symmetric S8 activations (zero point 0), per-channel symmetric S8 weights,
    # Q/DQ only on the inputs of Conv/Gemm (TensorRT fuses them), biases left in float.
    "tensorrt": Int8Flavour("tensorrt", "int8", activation_symmetric=True, unsigned_activations=False),
    # ONNX Runtime CPU: U8 activations with a zero point and S8 weights run the fastest kernels.
    "cpu": Int8Flavour("cpu", "int8-cpu", activation_symmetric=False, unsigned_activations=True),
}
CALIBRATION_METHODS = ("percentile", "entropy", "minmax")
QUANTIZED_OPS = ["Conv", "Gemm"]


class ImageReader:
    """ONNX Runtime CalibrationDataReader over pre-processed batches."""

    def __init__(self, batch: np.ndarray, chunk: int = 32):
        self.batch, self.chunk, self.pos = batch, chunk, 0

    def get_next(self):
        if self.pos >= len(self.batch):
            return None
        item = {INPUT: self.batch[self.pos:self.pos + self.chunk]}
        self.pos += self.chunk
        return item

    def rewind(self):
        self.pos = 0

    def __len__(self):
        return len(self.batch)


def layer_groups(model) -> dict[str, list[str]]:
    """Quantisable nodes grouped by network part and conv kind, e.g. ``blocks.1:dw``, ``attention.2``."""
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        part = node.name.strip("/").split("/")[0] or node.name
        if part.startswith(("blocks.", "local_units.")) and node.op_type == "Conv":
            depthwise = any(a.name == "group" and a.i > 1 for a in node.attribute)
            part += ":dw" if depthwise else ":pw"
        groups.setdefault(part, []).append(node.name)
    return groups


def _calibration_key(fp32_path: Path, calib_batch: np.ndarray, method: str, flavour: Int8Flavour) -> str:
    digest = hashlib.sha256(Path(fp32_path).read_bytes())
    digest.update(np.ascontiguousarray(calib_batch).tobytes())
    digest.update(f"{method}/{flavour.name}".encode())
    return digest.hexdigest()[:16]


def quantize(fp32_path: Path, out_path: Path, calib_batch: np.ndarray, flavour: Int8Flavour, method: str,
             exclude_nodes: list[str], cache_path: Path) -> Path:
    """One ORT static quantisation; ranges come from ``cache_path`` after the first calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
               "minmax": CalibrationMethod.MinMax}
    extra = {
        "ActivationSymmetric": flavour.activation_symmetric,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS,
        "CalibPercentile": 99.999,
        "CalibTensorRangeSymmetric": flavour.activation_symmetric,
    }
    # ORT prints calibration chatter and pre-processing advice through print() and the root logger.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
        warnings.simplefilter("ignore")
        quantize_static(
            str(fp32_path), str(out_path), ImageReader(calib_batch), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
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


@dataclass
class Int8Report:
    flavour: str
    method: str
    calibration_images: int
    excluded_groups: list[str]
    sensitivity: dict[str, float] = field(default_factory=dict)   # group -> centred-cosine loss alone
    centred_cosine: float = 0.0
    neighbour_agreement: float = 0.0
    calibration_cache: str = ""
    cache_reused: bool = False


def export_int8(fp32_path: str | Path, path: str | Path, calib_batch: np.ndarray, heldout_batch: np.ndarray,
                flavour: str = "tensorrt", method: str = "percentile", exclude: list[str] | None = None,
                target: float = 0.99, max_excluded: int = 8, progress=None) -> Int8Report:
    """Calibrated INT8 Q/DQ model; layer groups that hurt most stay in float (sensitivity analysis).

    ``exclude`` (group names from ``layer_groups``) overrides the analysis.
    """
    import onnx

    fp32_path, path = Path(fp32_path), Path(path)
    if flavour not in INT8_FLAVOURS:
        raise HanEdgeError(f"unknown INT8 target {flavour!r}; one of {', '.join(INT8_FLAVOURS)}")
    if method not in CALIBRATION_METHODS:
        raise HanEdgeError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
    if len(calib_batch) == 0:
        raise HanEdgeError("no calibration images")
    spec = INT8_FLAVOURS[flavour]
    fp32_model = load_onnx(fp32_path)
    meta = onnx_metadata(fp32_model)
    config, _ = config_from_metadata(meta, str(fp32_path))
    groups = layer_groups(fp32_model)
    cache = path.with_name(path.name.removesuffix(".onnx") + ".calib.json")
    key_file = cache.with_suffix(".key")
    key = _calibration_key(fp32_path, calib_batch, method, spec)
    reused = cache.is_file() and key_file.is_file() and key_file.read_text() == key
    if not reused:   # the cache belongs to other weights/images/method: recalibrate
        cache.unlink(missing_ok=True)
    reference = run_ort(ort_session(fp32_path), heldout_batch)
    scratch = path.with_name(path.name + ".try.onnx")

    def score(excluded_groups: list[str]) -> float:
        nodes = [n for g in excluded_groups for n in groups[g]]
        quantize(fp32_path, scratch, calib_batch, spec, method, nodes, cache)
        return centred_cosine(reference, run_ort(ort_session(scratch), heldout_batch))

    report = Int8Report(flavour, method, len(calib_batch), [], calibration_cache=str(cache), cache_reused=reused)
    if exclude is not None:
        unknown = sorted(set(exclude) - set(groups))
        if unknown:
            raise HanEdgeError(f"--int8-exclude names unknown layer groups {unknown}; known: {', '.join(groups)}")
        report.excluded_groups = list(exclude)
    else:
        full = score([])
        key_file.write_text(key)
        if full < target:
            choose_exclusions(score, list(groups), target, max_excluded, report, progress)
    nodes = [n for g in report.excluded_groups for n in groups[g]]
    quantize(fp32_path, scratch, calib_batch, spec, method, nodes, cache)
    key_file.write_text(key)
    quantized = onnx.load(str(scratch))
    scratch.unlink(missing_ok=True)
    set_metadata(quantized, {**meta, **model_metadata(config, spec.precision, calibration=method,
                                                       int8_target=flavour,
                                                       int8_excluded=report.excluded_groups)})
    save_onnx(quantized, path)
    got = run_ort(ort_session(path), heldout_batch)
    report.centred_cosine = centred_cosine(reference, got)
    report.neighbour_agreement = neighbour_agreement(reference, got)
    return report


def choose_exclusions(score, groups: list[str], target: float, max_excluded: int, report: Int8Report,
                      progress=None) -> None:
    """Sensitivity analysis: quantise each group alone, then keep the worst in float until ``target``.

    ``score(excluded_groups)`` is the centred cosine against FP32 with those groups left in float.
    """
    for i, group in enumerate(groups):
        report.sensitivity[group] = 1 - score([g for g in groups if g != group])
        if progress:
            progress(i + 1, len(groups))
    ranked = sorted(report.sensitivity, key=report.sensitivity.get, reverse=True)
    for group in ranked[:max_excluded]:
        report.excluded_groups.append(group)
        if score(report.excluded_groups) >= target:
            break


def op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# -- the `han-edge export` pipeline ------------------------------------------------------------------------
@dataclass
class ExportOptions:
    variant: str = "small"
    checkpoint: str | None = None
    fp16: bool = False
    int8: bool = False
    int8_target: str = "tensorrt"
    int8_exclude: list[str] | None = None
    calibration: str = "percentile"
    calib_dir: str | None = None
    calib_size: int = 256
    out_dir: str = "export"
    seed: int = 0


def calibration_paths(calib_dir: str | None, size: int, seed: int = 0) -> list[str]:
    """Up to ``size`` images from ``calib_dir`` (default: the synthetic set's training images)."""
    from han_edge.data import default_synthetic_root, IMAGE_SUFFIXES
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


def heldout_paths(limit: int = 256) -> list[str]:
    """Images never used for calibration: the synthetic set's query + gallery, for accuracy checks."""
    from han_edge.data import load_dataset

    data = load_dataset("synthetic", None)
    items = [p for p, pid, _ in data.query + data.gallery if pid > 0]
    return items[:: max(1, len(items) // limit)][:limit]


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


def export_all(options: ExportOptions, log=print, progress=None) -> dict:
    """Write the FP32 ONNX (+ FP16, + INT8) and report parity and accuracy figures."""
    model, config, source = load_torch_model(options.variant, options.checkpoint)
    log(f"HAN({config.variant}) from {source}")
    out = Path(options.out_dir)
    stem = f"han_{config.variant}"
    fp32_path = export_fp32(model, config, out / f"{stem}.onnx")
    held = load_batch(heldout_paths(), config)
    result = {"source": source, "fp32": str(fp32_path), "parity": parity(model, fp32_path, held[:32])}
    log(f"wrote {fp32_path}: parity vs PyTorch cosine_min={result['parity']['cosine_min']:.7f} "
        f"max_abs_diff={result['parity']['max_abs_diff']:.2e}")
    reference = run_ort(ort_session(fp32_path), held)
    if options.fp16:
        fp16_path = export_fp16(fp32_path, out / f"{stem}.fp16.onnx")
        got = run_ort(ort_session(fp16_path), held)
        result["fp16"] = {"path": str(fp16_path), "cosine_min": float(cosine_rows(reference, got).min()),
                          "centred_cosine": centred_cosine(reference, got)}
        log(f"wrote {fp16_path}: cosine vs FP32 min={result['fp16']['cosine_min']:.5f} "
            f"centred={result['fp16']['centred_cosine']:.5f}")
    if options.int8:
        suffix = ".int8.onnx" if options.int8_target == "tensorrt" else ".int8-cpu.onnx"
        int8_path = out / f"{stem}{suffix}"
        calib = load_batch(calibration_paths(options.calib_dir, options.calib_size, options.seed), config)
        log(f"calibrating INT8 ({options.int8_target} flavour, {options.calibration}) on {len(calib)} images")
        report = export_int8(fp32_path, int8_path, calib, held[:96], flavour=options.int8_target,
                             method=options.calibration, exclude=options.int8_exclude, progress=progress)
        # Accuracy on the whole held-out set (the analysis above used a subset).
        got = run_ort(ort_session(int8_path), held)
        report.centred_cosine = centred_cosine(reference, got)
        report.neighbour_agreement = neighbour_agreement(reference, got)
        result["int8"] = {"path": str(int8_path), **report.__dict__,
                          "retrieval": compare_retrieval(fp32_path, int8_path)}
        log(f"wrote {int8_path}: centred cosine vs FP32 {report.centred_cosine:.4f}, nearest-neighbour agreement "
            f"{report.neighbour_agreement:.3f}, kept in float: {', '.join(report.excluded_groups) or 'none'}"
            f"{' (calibration cache reused)' if report.cache_reused else ''}")
        r = result["int8"]["retrieval"]
        log(f"synthetic test set: FP32 rank-1 {100 * r['fp32']['rank1']:.1f} mAP {100 * r['fp32']['mAP']:.1f} | "
            f"INT8 rank-1 {100 * r['int8']['rank1']:.1f} mAP {100 * r['int8']['mAP']:.1f}")
    return result


def compare_retrieval(fp32_path: Path, other_path: Path) -> dict:
    """Rank-1/mAP of two exported models on the synthetic test set (same code path as `han-edge eval`)."""
    from han_edge.data import load_dataset
    from han_edge.evaluate import evaluate_model

    data = load_dataset("synthetic", None)
    keys = ("rank1", "rank5", "mAP")
    out = {}
    for name, path in (("fp32", fp32_path), ("int8", other_path)):
        metrics = evaluate_model(path, data)
        out[name] = {k: metrics[k] for k in keys}
    return out
