"""INT8 stage: calibrated Q/DQ models in two flavours, with the sensitivity analysis.

ONNX Runtime's static quantiser (``quantize_static``, QDQ format, per-channel symmetric S8
weights, biases in float) places the Q/DQ nodes; the flavours differ in where:

* ``tensorrt``: symmetric S8 activations (zero point 0), Q/DQ on the *inputs* of Conv/Gemm only
  (activations and weights), Conv/Gemm outputs left unquantised — NVIDIA's explicit-quantization
  placement rules: quantise all inputs of weighted layers, leave their outputs alone, and let
  TensorRT fuse each DQ into its Conv/Gemm together with the bias and ReLU after it; no float Concat
  carries Q/DQ. Everything that is not INT8 is FP16 (``han_edge.half``), the file opset 19. Non-negative
  activations read by unpadded convs are shifted onto all 256 levels (``han_edge.int8_shift``).
* ``cpu``: U8 activations with a zero point, Q/DQ also on Conv/Gemm outputs, and the ReLU, Sigmoid,
  Mul and Add between them quantised, so ONNX Runtime's CPU provider fuses every convolution into
  ``QLinearConv`` (integer in, integer out, ReLU folded into the output range), the attention into
  ``QLinearSigmoid``/``QLinearMul`` and the local stream's residual sums into ``QLinearAdd``. With
  Conv outputs excluded from quantisation (the earlier placement), ORT could fuse only 22 of the 40
  convolutions and ran slower than FP32.

In both, the hard attention's sampling grid (``sampling_grid_nodes``: the regression layer of the
transform, its Tanh and the grid arithmetic) stays in float: it is a few hundred FLOPs per image,
and 8-bit sampling positions move every regional crop (quantising the grid's Add into ``QLinearAdd``
cost centred cosine and ran slower). The embedding heads (``embedding_heads``) stay in float too:
under 0.1% of the multiply-adds, about a quarter of the INT8 error.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from han_edge.config import config_from_metadata, model_metadata
from han_edge.equalize import equalize_conv_inputs
from han_edge.errors import HanEdgeError
from han_edge.evaluate import centred_cosine, clear_neighbour_agreement, neighbour_agreement
from han_edge.exporter import ort_optimized_op_counts
from han_edge.fileio import atomic_write_bytes
from han_edge.half import FP16_OPSET, fp16_sensitivity, qdq_to_fp16, to_opset
from han_edge.int8_layers import (
    agreement_floor,
    check_exclusions,
    choose_exclusions,
    embedding_heads,
    sampling_grid_nodes,
)
from han_edge.int8_shift import shift_non_negative
from han_edge.onnx_io import (
    ORT_FP16_ARTEFACTS,
    load_onnx,
    onnx_metadata,
    ort_session,
    run_ort,
    save_onnx,
    set_metadata,
)
from han_edge.ort_quantize import CALIBRATION_METHODS, calibration_cache_paths, calibration_key, key_line, quantize
from han_edge.paths import as_path
from han_edge.qdq_finetune import check_steps, finetune_qdq
from han_edge.validate import real_number, reason
from han_edge.validate_arrays import finite


@dataclass(frozen=True)
class Int8Flavour:
    """Q/DQ conventions of one consumer of the INT8 model."""

    name: str
    precision: str
    activation_symmetric: bool
    unsigned_activations: bool
    op_types: tuple[str, ...]
    quantize_outputs: bool       # Q/DQ on Conv/Gemm outputs too (ORT's integer kernels need them)
    fp16_float: bool             # the non-INT8 part in FP16 (opset 19)
    shift_non_negative: bool     # non-negative activations shifted onto all 256 levels (int8_shift.py)


INT8_FLAVOURS = {
    "tensorrt": Int8Flavour("tensorrt", "int8", activation_symmetric=True, unsigned_activations=False, op_types=(
        "Conv", "Gemm"), quantize_outputs=False, fp16_float=True, shift_non_negative=True),
    "cpu": Int8Flavour("cpu", "int8-cpu", activation_symmetric=False, unsigned_activations=True,
                       op_types=("Conv", "Gemm", "Relu", "Sigmoid", "Mul", "Add"), quantize_outputs=True,
                       fp16_float=False, shift_non_negative=False),
}
FP16_TOLERANCE = 1e-3   # centred-cosine loss FP16 may add to INT8 before op types are kept in FP32


def scoring_session(path, without_fp16_artefacts: bool):
    """ORT CPU session for accuracy scores; optionally without ``onnx_io.ORT_FP16_ARTEFACTS``'s rewrite."""
    return ort_session(path, disabled_optimizers=list(ORT_FP16_ARTEFACTS) if without_fp16_artefacts else None)


def file_scoring_session(path) -> tuple:
    """(ORT session scoring the INT8 file ``path`` as TensorRT computes it, whether its float part is FP16)."""
    fp16 = onnx_metadata(load_onnx(path)).get("han_edge.float_precision") == "fp16"
    return scoring_session(path, fp16), fp16


def held_out_accuracy(reference: np.ndarray, path: Path, batch: np.ndarray) -> dict[str, float]:
    """Centred cosine and nearest-neighbour agreement (all crops; clear neighbours) of ``path`` against ``reference``.

    Run as han-edge's runtime runs the file: for FP16-float files without ``ORT_FP16_ARTEFACTS``'s
    rewrite, whose FP16 arithmetic TensorRT does not do; those files also get the ``*_ort_default``
    figures, ONNX Runtime with every default optimisation.
    """
    session, fp16 = file_scoring_session(path)
    got = run_ort(session, batch)
    clear, share = clear_neighbour_agreement(reference, got)
    scores = {"centred_cosine": centred_cosine(reference, got), "neighbour_agreement": neighbour_agreement(reference, got),
              "clear_neighbour_agreement": clear, "clear_neighbour_share": share}
    if fp16:
        got = run_ort(ort_session(path), batch)
        scores.update(centred_cosine_ort_default=centred_cosine(reference, got),
                      neighbour_agreement_ort_default=neighbour_agreement(reference, got))
    return scores


def _check_batch(batch, input_size: tuple[int, int], what: str, least: int) -> None:
    """``batch`` must be the model's pre-processed input: float32 ``(N, 3, H, W)``, N >= ``least``, finite."""
    shape = (3, *input_size)
    if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != shape:
        got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
        raise HanEdgeError(f"{what} must be a float32 (N, {', '.join(map(str, shape))}) batch as load_batch makes it; "
                           f"got {got}")
    if len(batch) < least:
        raise HanEdgeError(f"{what}: {len(batch)} given, at least {least} needed")
    finite(batch, what)


@dataclass
class Int8Report:
    flavour: str
    method: str
    calibration_images: int
    excluded_groups: list[str]
    sensitivity: dict[str, float] = field(default_factory=dict)   # group -> centred-cosine loss alone
    agreement_floor: float = 0.0                                    # the analysis's agreement bar (see export_int8)
    equalized_pairs: int = 0                                        # conv -> ReLU -> conv ranges equalised (equalize.py)
    shifted_activations: int = 0                                    # non-negative, on all 256 levels (int8_shift.py)
    centred_cosine: float = 0.0
    neighbour_agreement: float = 0.0
    clear_neighbour_agreement: float = 0.0                          # over crops whose FP32 neighbour leads by > 1%
    clear_neighbour_share: float = 0.0                              # ... and their share of the crops
    calibration_cache: str = ""
    cache_reused: bool = False
    fp32_nodes: list[str] = field(default_factory=list)            # TensorRT flavour: kept FP32 (FP16 hurt)
    # TensorRT flavour through ORT with all its default rewrites, FP16 bias rewrite included (the figures
    # above are what the file holds: ORT as han-edge's runtime configures it, and what TensorRT computes)
    centred_cosine_ort_default: float | None = None
    neighbour_agreement_ort_default: float | None = None
    fp16_sensitivity: dict[str, float] = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)                   # qdq_finetune.FinetuneResult of the final model
    ort_ops: dict[str, int] = field(default_factory=dict)          # ONNX Runtime's optimised graph (CPU flavour)


def export_int8(fp32_path: str | Path, path: str | Path, calib_batch: np.ndarray, heldout_batch: np.ndarray,
                flavour: str = "tensorrt", method: str = "percentile", exclude: list[str] | None = None,
                target: float = 0.99, min_agreement: float = 0.95, max_excluded: int = 8,
                report_batch: np.ndarray | None = None, finetune_steps: int = 0, progress=None) -> Int8Report:
    """Calibrated INT8 Q/DQ model; layer groups that hurt most stay out of INT8 (sensitivity analysis).

    The analysis runs when the fully quantised model misses either bar on ``heldout_batch``:
    centred cosine against FP32 ``target``, or nearest-neighbour agreement ``min_agreement`` by
    more than its sampling error on these crops (``agreement_floor``; the cosine alone let through
    models whose neighbours, and so rank-1, moved, but within that error the agreement cannot tell
    quantisations apart and chasing it kept layers out of INT8 by chance). Groups are ranked by
    the cosine each loses quantised alone, then kept in float, worst first, until both bars are met
    or ``max_excluded`` groups are out. ``exclude`` (group names from ``layer_groups``) overrides
    the analysis. The report's accuracy is measured on ``report_batch`` (crops the analysis did not
    see; default ``heldout_batch``). In the TensorRT flavour excluded groups run in FP16, not FP32;
    op types stay FP32 only where ``han_edge.half``'s FP16 sensitivity analysis shows FP16 costs
    more than ``FP16_TOLERANCE`` (named in the metadata). ``progress(done, total, what)`` follows the
    analysis (layer groups) and the fine-tune (steps).
    """
    import onnx

    fp32_path, path = as_path(fp32_path, "source ONNX"), as_path(path, "quantised ONNX")
    if not isinstance(flavour, str) or flavour not in INT8_FLAVOURS:
        raise HanEdgeError(f"unknown INT8 target {flavour!r}; one of {', '.join(INT8_FLAVOURS)}")
    if not isinstance(method, str) or method not in CALIBRATION_METHODS:
        raise HanEdgeError(f"unknown calibration method {method!r}; one of {', '.join(CALIBRATION_METHODS)}")
    if path.resolve() == fp32_path.resolve():
        raise HanEdgeError(f"the INT8 model would replace its FP32 source {fp32_path}; give another file name")
    for name, value, low, high in (("target", target, 0, 1), ("min_agreement", min_agreement, 0, 1)):
        if not low <= real_number(value, name) <= high:
            raise HanEdgeError(f"{name} must be a number from {low} to {high}; got {value!r}")
    if exclude is not None and (not isinstance(exclude, (list, tuple)) or not all(isinstance(g, str) for g in exclude)):
        raise HanEdgeError(f"exclude must be a list of layer-group names; got {exclude!r:.80}")
    if isinstance(max_excluded, bool) or not isinstance(max_excluded, int) or max_excluded < 0:
        raise HanEdgeError(f"max_excluded must be a whole number >= 0; got {max_excluded!r:.40}")
    check_steps(finetune_steps)
    spec = INT8_FLAVOURS[flavour]
    fp32_model = load_onnx(fp32_path)
    meta = onnx_metadata(fp32_model)
    config, _ = config_from_metadata(meta, str(fp32_path))
    for what, batch, least in (("calibration images", calib_batch, 1), ("held-out images", heldout_batch, 2),
                               ("report images", heldout_batch if report_batch is None else report_batch, 2)):
        _check_batch(batch, config.input_size, what, least)
    groups = check_exclusions(fp32_model, exclude or [])
    cache, key_file = calibration_cache_paths(path)
    equalized, equalized_pairs = equalize_conv_inputs(fp32_model, calib_batch)
    key = calibration_key(equalized, calib_batch, method, spec)
    # the key file also holds the cache's own digest: a cache edited, damaged or paired with another run's
    # key is recalibrated, never trusted (its ranges become the model's scales)
    reused = (cache.is_file() and key_file.is_file()
              and key_file.read_bytes() == key_line(key, cache.read_bytes()))
    teacher = ort_session(fp32_path)
    reference = run_ort(teacher, heldout_batch)
    report = Int8Report(flavour, method, len(calib_batch), [], equalized_pairs=equalized_pairs,
                        calibration_cache=str(cache), cache_reused=reused)

    with tempfile.TemporaryDirectory() as tmp:   # scratch models and the working calibration cache
        tmp = Path(tmp)
        work_cache = tmp / "calib.json"
        if reused:   # otherwise the cache belongs to other weights/images/method: recalibrate
            work_cache.write_bytes(cache.read_bytes())
        source = tmp / "source.onnx"
        onnx.save(to_opset(equalized, FP16_OPSET) if spec.fp16_float else equalized, str(source))

        always_float = sampling_grid_nodes(fp32_model) + embedding_heads(fp32_model)

        def build(excluded_groups: list[str]):
            nodes = always_float + [n for g in excluded_groups for n in groups[g]]
            try:
                return onnx.load(str(quantize(source, tmp / "q.onnx", calib_batch, spec, method, nodes, work_cache)))
            except (ValueError, RuntimeError) as err:   # ORT's quantiser on a graph that is not han-edge's HAN
                raise HanEdgeError(f"ONNX Runtime cannot quantise {fp32_path}: {reason(err)}") from None

        def shifted(model):   # after the fine-tune: learning under the shift moved c * sum(W) with every weight step
            if spec.shift_non_negative:
                model, scales = shift_non_negative(model)
                report.shifted_activations = len(scales)
            return model

        def features(model) -> np.ndarray:
            onnx.save(model, str(tmp / "score.onnx"))
            return run_ort(scoring_session(tmp / "score.onnx", spec.fp16_float), heldout_batch)

        def score_model(model) -> float:
            return centred_cosine(reference, features(model))

        def scores(model) -> tuple[float, float]:
            got = features(qdq_to_fp16(model) if spec.fp16_float else model)
            return centred_cosine(reference, got), neighbour_agreement(reference, got)

        def finetuned(model):
            if not finetune_steps:
                return model
            def distance(candidate) -> float:   # as the file runs: ONNX Runtime, FP16 float part for TensorRT
                got = features(qdq_to_fp16(shifted(candidate)) if spec.fp16_float else shifted(candidate))
                return float(((got - reference) ** 2).sum(axis=1).mean())

            tuned, result = finetune_qdq(model, calib_batch, lambda b: run_ort(teacher, b), heldout_batch, reference,
                                         steps=finetune_steps, judge=distance,
                                         progress=progress and (lambda d, t: progress(d, t, "fine-tune steps")))
            report.finetune = result.__dict__
            return tuned

        report.agreement_floor = agreement_floor(min_agreement, len(heldout_batch))
        bars = (target, report.agreement_floor)
        final = None
        if exclude is not None:
            report.excluded_groups = list(exclude)
        else:
            final = shifted(finetuned(build([])))
            if not all(got >= want for got, want in zip(scores(final), bars)):
                final = None   # the analysis ranks groups on the plain calibration (fine-tuning each is too slow)
                report.sensitivity, report.excluded_groups = choose_exclusions(
                    lambda excluded: scores(shifted(build(excluded))), list(groups), bars, max_excluded, progress)
        if final is None:
            final = shifted(finetuned(build(report.excluded_groups)))
        if spec.fp16_float:
            report.fp32_nodes, report.fp16_sensitivity = fp16_sensitivity(final, score_model, FP16_TOLERANCE)
            final = qdq_to_fp16(final, report.fp32_nodes)
        ranges = work_cache.read_bytes()
        atomic_write_bytes(cache, ranges, "calibration cache")
        atomic_write_bytes(key_file, key_line(key, ranges), "calibration cache key")

    extra = {"calibration": method, "int8_target": flavour, "int8_excluded": report.excluded_groups,
             "int8_equalized_pairs": report.equalized_pairs, "int8_shifted_activations": report.shifted_activations,
             "int8_finetune_steps": report.finetune["steps"] if report.finetune.get("kept") else 0}
    if spec.fp16_float:
        extra.update(float_precision="fp16", fp32_nodes=report.fp32_nodes, opset=FP16_OPSET)
    set_metadata(final, {**meta, **model_metadata(config, spec.precision, **extra)})
    save_onnx(final, path)
    if report_batch is not None:
        heldout_batch, reference = report_batch, run_ort(ort_session(fp32_path), report_batch)
    for key, value in held_out_accuracy(reference, path, heldout_batch).items():
        setattr(report, key, value)
    if not spec.fp16_float:
        counts = ort_optimized_op_counts(path)
        report.ort_ops = {op: counts.get(op, 0) for op in ("QLinearConv", "QGemm", "QLinearAdd", "Conv", "FusedConv")}
    return report
