"""`han-edge deepstream MODEL --out DIR`: DeepStream configs for a HAN model, every value from its metadata.

Writes into DIR:

- ``config_infer_secondary_<name>.txt``: a Gst-nvinfer secondary GIE (``process-mode=2``) that runs the
  model on the objects of a primary detector and attaches the raw features as tensor meta
  (``network-type=100`` "other", ``output-tensor-meta=1``);
- ``config_tracker_reid_<name>.yml``: the ``ReID:`` section of an NvDCF tracker config (merge it into
  e.g. ``config_tracker_NvDCF_accuracy.yml``), so the tracker's re-association / NvDeepSORT uses HAN;
- the model file itself (or its folded form, see below), referenced by file name: nvinfer and the
  tracker resolve relative paths against the config file's folder.

Keys and enumerations checked against NVIDIA's DeepStream 9.2 documentation (Gst-nvinfer "File
Configuration Specifications" and Gst-nvtracker "ReID" parameters; docs.nvidia.com/deepstream, 9.2
is the default version there) and the 9.2 API reference (``ReIDConfigParams``,
``gstnvinfer_property_parser.h``). Not run here: this workplace has no GPU, TensorRT or DeepStream.

**Pre-processing.** Both nvinfer and the tracker compute ``y = net-scale-factor * (x - offsets[c])`` on
RGB/BGR pixels 0..255, with ONE scale factor for all channels. han-edge's models take
``(x/255 - mean[c]) / std[c]``, whose per-channel ``std`` one scalar cannot represent exactly (ImageNet
std 0.229/0.224/0.225: about 1.3% error on some channel whatever scalar is chosen). So by default an
unfolded ONNX is folded first (``han_edge.fold``: mean/std inside the graph) and the configs say
scale 1, offsets 0 — exact. ``fold=False`` (or a TensorRT engine built from an unfolded ONNX, which
cannot be folded) writes the best single-scale approximation instead and says so in the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from han_edge.config import HANConfig, config_from_metadata, normalization_of
from han_edge.errors import HanEdgeError
from han_edge.fileio import atomic_write_bytes
from han_edge.paths import as_path, check_destination, ensure_folder, not_the_input, require_file
from han_edge.validate import INT32_MAX, MAX_BATCH, safe_text, whole_number

DEEPSTREAM_VERSION = "9.2"
# nvinfer network-mode: 0=FP32, 1=INT8, 2=FP16; tracker ReID networkMode: 0=FP32, 1=FP16, 2=INT8
NVINFER_MODE = {"fp32": 0, "int8": 1, "int8-cpu": 1, "fp16": 2}
TRACKER_MODE = {"fp32": 0, "fp16": 1, "int8": 2, "int8-cpu": 2}
MODE_TAG = {0: "fp32", 1: "int8", 2: "fp16"}


@dataclass
class DeepStreamOptions:
    batch_size: int | None = None        # default: the engine's profile max, else 16
    fold: bool = True                    # fold an unfolded ONNX (exact pre-processing) instead of approximating
    gie_unique_id: int = 2               # user's choice: this GIE's id
    operate_on_gie_id: int = 1           # user's choice: the primary detector's gie-unique-id
    operate_on_class_ids: tuple[int, ...] = (0,)   # user's choice: the detector's person class id(s)
    reid_type: int = 2                   # user's choice: 1 NvDeepSORT, 2 re-association, 3 both
    reid_history_size: int = 100         # user's choice: features kept per target (cf. Gallery.keep_recent)
    workspace_mib: int = 1024
    gpu_id: int = 0

    def check(self) -> "DeepStreamOptions":
        """Self, or one sentence naming the first option of the wrong kind or out of range (before any work)."""
        if self.batch_size is not None:
            whole_number(self.batch_size, "batch size", 1, MAX_BATCH)
        if not isinstance(self.fold, bool):
            raise HanEdgeError(f"fold must be True or False; got {self.fold!r:.40}")
        for name in ("gie_unique_id", "operate_on_gie_id", "gpu_id"):   # DeepStream parses them as 32-bit ints
            whole_number(getattr(self, name), name, 0, INT32_MAX)
        ids = self.operate_on_class_ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise HanEdgeError(f"operate_on_class_ids must be a non-empty list of class ids; got {ids!r:.40}")
        for class_id in ids:
            whole_number(class_id, "a class id in operate_on_class_ids", 0, INT32_MAX)
        whole_number(self.reid_type, "reidType (1 NvDeepSORT, 2 re-association, 3 both)", 1, 3)
        whole_number(self.reid_history_size, "reidHistorySize", 1, INT32_MAX)
        whole_number(self.workspace_mib, "workspace (MiB)", 1, 1 << 20)
        return self


@dataclass
class Preprocessing:
    scale: float                 # net-scale-factor / netScaleFactor
    offsets: tuple[float, float, float]
    exact: bool
    max_rel_error: float         # worst per-channel relative error of the scale
    note: str


def preprocessing(config: HANConfig, normalization: str) -> Preprocessing:
    """nvinfer's (scale, offsets) for a model taking ``normalization`` ('folded' or 'external') input."""
    if normalization == "folded":
        return Preprocessing(1.0, (0.0, 0.0, 0.0), True, 0.0,
                             "the model normalises inside its graph (folded): scale 1, offsets 0 are exact")
    std = np.asarray(config.std, np.float64)
    mean = np.asarray(config.mean, np.float64)
    scale = float(1.0 / (255.0 * std.mean()))
    offsets = tuple(float(v) for v in 255.0 * mean)
    error = float(np.max(np.abs(scale * 255.0 * std - 1.0)))
    exact = error < 1e-6
    note = ("exact: the model's std is the same on every channel" if exact else
            f"APPROXIMATE: nvinfer has one scale factor for all channels, the model has per-channel std "
            f"{list(config.std)}; 1/(255*mean(std)) is off by up to {100 * error:.2f}% on a channel. "
            f"Use the folded model (han-edge fold / deepstream without --no-fold) for exact pre-processing")
    return Preprocessing(scale, offsets, exact, error, note)


def _read_model(path: Path) -> tuple[HANConfig, str, dict, int | None]:
    """(config, precision, metadata, engine max batch or None)."""
    if path.suffix.lower() == ".onnx":
        from han_edge.onnx_io import load_onnx, onnx_metadata, validate_han_model

        model = load_onnx(path)
        meta = onnx_metadata(model)
        config, precision = validate_han_model(model, meta, str(path))   # the graph is what its metadata says
        return config, precision, meta, None
    if path.suffix.lower() in (".plan", ".engine"):
        from han_edge.engine import read_engine_metadata

        side = read_engine_metadata(path)
        meta = side.get("metadata") or {}
        config, precision = config_from_metadata(meta, str(path))
        return config, side.get("precision", precision), meta, int((side.get("batch") or {}).get("max", 0)) or None
    raise HanEdgeError(f"{path.name}: DeepStream configs are written for .onnx or .plan/.engine files from han-edge")


def _fmt(value: float) -> str:
    return repr(float(value))


def write_configs(model: str | Path, out: str | Path, options: DeepStreamOptions | None = None) -> dict:
    """Write the nvinfer config, the tracker ReID section and the model into ``out``; returns what was written."""
    options = (options or DeepStreamOptions()).check()
    model = as_path(model, "model file")
    require_file(model, "model file")
    safe_text(model.name, "the model's file name (it goes into the configs)")
    config, precision, meta, engine_max = _read_model(model)
    from han_edge.fold import fold_model, folded_name

    normalization = normalization_of(meta, str(model))
    is_engine = model.suffix.lower() in (".plan", ".engine")
    batch = options.batch_size if options.batch_size is not None else (engine_max or 16)
    if engine_max is not None and batch > engine_max:
        raise HanEdgeError(f"{model.name} was built for batches up to {engine_max}; batch size {batch} would not run")
    if precision not in NVINFER_MODE:
        raise HanEdgeError(f"unknown precision {precision!r} in {model.name}")
    if precision == "int8-cpu":
        raise HanEdgeError(f"{model.name} is the ONNX Runtime CPU flavour of INT8 (U8 activations); "
                           "give DeepStream the TensorRT flavour (`han-edge export --int8`) or FP32/FP16")
    out = ensure_folder(out, "DeepStream output folder")
    name = model.name
    for suffix in (".onnx", ".plan", ".engine"):
        name = name.removesuffix(suffix)
    name = name.replace(".", "_")
    fold = not is_engine and normalization != "folded" and options.fold
    target = out / (folded_name(model).name if fold else model.name)
    infer_out, tracker_out = out / f"config_infer_secondary_{name}.txt", out / f"config_tracker_reid_{name}.yml"
    for path, what in ((target, "model copy"), (infer_out, "nvinfer config"), (tracker_out, "tracker config")):
        check_destination(path, what)            # all three before the first is replaced
        if fold or path is not target:           # a copy onto the model itself is skipped below; a write is not
            not_the_input(path, model, what)

    # The model DeepStream gets: folded when possible (exact pre-processing), copied beside the configs.
    if fold:
        from han_edge.onnx_io import load_onnx, save_onnx

        save_onnx(fold_model(load_onnx(model)), target)
        normalization = "folded"
    elif target.resolve() != model.resolve():
        atomic_write_bytes(target, model.read_bytes(), "model copy")
    pre = preprocessing(config, normalization)
    height, width = config.input_size
    nv_mode, tr_mode = NVINFER_MODE[precision], TRACKER_MODE[precision]
    if is_engine:
        onnx_line = "# onnx-file: none, the engine below is used as is (built by han-edge build for this GPU)"
        engine_file = target.name
        tracker_model = f"  modelEngineFile: {json.dumps(engine_file)}"
    else:
        onnx_line = f"onnx-file={target.name}"
        # nvinfer serialises the engine it builds under this name beside the ONNX and reuses it next time.
        engine_file = f"{target.name}_b{batch}_gpu{options.gpu_id}_{MODE_TAG[nv_mode]}.engine"
        tracker_model = (f"  onnxFile: {json.dumps(target.name)}\n"
                         f"  modelEngineFile: {json.dumps(target.name.removesuffix('.onnx') + f'.reid_b{batch}_{MODE_TAG[nv_mode]}.engine')}"
                         "   # built by the tracker on first run")
    classes = ";".join(str(c) for c in options.operate_on_class_ids)
    header = (f"# han-edge: HAN({config.variant}) {precision}, input 3x{height}x{width} RGB, {config.feature_dim}-D features "
              f"({meta.get('han_edge.feature_layout', 'per-branch L2-normalised')}).\n"
              f"# Written from {model.name} by han-edge {meta.get('han_edge.version', '?')} for DeepStream "
              f"{DEEPSTREAM_VERSION} (keys checked against the {DEEPSTREAM_VERSION} Gst-nvinfer / Gst-nvtracker docs).\n"
              f"# Pre-processing: {pre.note}.\n")
    int8_note = ("# INT8: the ONNX carries explicit Q/DQ scales (calibrated by han-edge export); no calibration\n"
                 "# table is needed. Check your TensorRT accepts network-mode=1 without int8-calib-file.\n"
                 if nv_mode == 1 else "")
    nvinfer = (
        header + int8_note +
        "[property]\n"
        f"gpu-id={options.gpu_id}\n"
        f"{onnx_line}\n"
        f"model-engine-file={engine_file}\n"
        f"# mode: 0=FP32, 1=INT8, 2=FP16 (from the model's precision)\n"
        f"network-mode={nv_mode}\n"
        f"batch-size={batch}\n"
        f"infer-dims=3;{height};{width}\n"
        f"# y = net-scale-factor * (x - offsets[c]) on RGB 0..255\n"
        f"net-scale-factor={_fmt(pre.scale)}\n"
        f"offsets={';'.join(_fmt(v) for v in pre.offsets)}\n"
        "# 0=RGB (han_edge.color_order)\n"
        "model-color-format=0\n"
        "# han-edge stretches each crop to the input size (no letterbox)\n"
        "maintain-aspect-ratio=0\n"
        "symmetric-padding=0\n"
        "# 100 = other: no parser, the raw features go out as tensor meta (NvDsInferTensorMeta)\n"
        "network-type=100\n"
        "output-tensor-meta=1\n"
        f"output-blob-names=features\n"
        f"workspace-size={options.workspace_mib}\n"
        "# 2 = secondary: runs on the objects of the GIE below\n"
        "process-mode=2\n"
        "# --- your choices: this GIE's id, the detector's id and its person class id(s) ---\n"
        f"gie-unique-id={options.gie_unique_id}\n"
        f"operate-on-gie-id={options.operate_on_gie_id}\n"
        f"operate-on-class-ids={classes}\n"
    )
    tracker = (
        header.replace("# Written", "# ReID section of an NvDCF tracker config (merge into e.g. config_tracker_NvDCF_accuracy.yml).\n# Written") +
        "ReID:\n"
        f"  reidType: {options.reid_type}   # your choice: 1 NvDeepSORT, 2 re-association, 3 both\n"
        f"  batchSize: {batch}\n"
        f"  workspaceSize: {options.workspace_mib}   # MiB\n"
        f"  reidFeatureSize: {config.feature_dim}\n"
        f"  reidHistorySize: {options.reid_history_size}   # your choice: features kept per target\n"
        f"  inferDims: [3, {height}, {width}]\n"
        f"  networkMode: {tr_mode}   # 0=FP32, 1=FP16, 2=INT8 (tracker's own enumeration)\n"
        "  inputOrder: 0   # NCHW\n"
        "  colorFormat: 0   # RGB\n"
        f"  offsets: [{', '.join(_fmt(v) for v in pre.offsets)}]\n"
        f"  netScaleFactor: {_fmt(pre.scale)}\n"
        "  keepAspc: 0   # han-edge stretches crops to the input size\n"
        "  # HAN's two 512-D halves are each L2-normalised (norm sqrt(2)); the tracker's similarity is a dot\n"
        "  # product of unit vectors, so let it normalise the whole vector (cosine is unchanged)\n"
        "  addFeatureNormalization: 1\n"
        f"{tracker_model}\n"
    )
    infer_path = atomic_write_bytes(infer_out, nvinfer.encode(), "nvinfer config")
    tracker_path = atomic_write_bytes(tracker_out, tracker.encode(), "tracker config")
    return {"nvinfer": str(infer_path), "tracker": str(tracker_path), "model": str(target),
            "normalization": normalization, "exact": pre.exact, "max_rel_error": pre.max_rel_error,
            "net_scale_factor": pre.scale, "offsets": list(pre.offsets), "batch_size": batch,
            "deepstream": DEEPSTREAM_VERSION}
