"""ONNX files at the bottom of the stack: read (checked), write (atomic), metadata, one ONNX Runtime CPU session helper.

Imports no stage of han-edge, so the exporter, the TensorRT builder, the runtime and the CLI can all
use it without import cycles.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.config import FOLDED, HANConfig, config_from_metadata, normalization_of
from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.fileio import atomic_path
from han_edge.paths import require_file

INPUT, OUTPUT = "images", "features"
FOLD_SCALE = "han_edge_fold/scale"   # the initializer `han-edge fold` adds (fold.py)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("reading ONNX files needs the onnx package: pip install 'han-edge[ort]'") from None
    return onnx


def load_onnx(path: str | Path):
    onnx = _onnx()
    path = Path(path)
    require_file(path, "ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:
        raise HanEdgeError(f"{path} is not a valid ONNX model: {str(err).splitlines()[0][:200]}") from None
    return model


def onnx_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def node_attributes(node) -> dict:
    """An ONNX node's attributes as ``{name: Python value}``."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
    """(config, precision) of a han-edge ONNX file whose graph agrees with its metadata (``validate_han_model``)."""
    model = load_onnx(path)
    return validate_han_model(model, onnx_metadata(model), str(path))


_FLOAT = 1   # onnx.TensorProto.FLOAT


def _dims(value_info) -> list:
    """A graph input/output's shape: ints for fixed axes, the axis name (or None) for dynamic ones."""
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _shape_text(dims: list) -> str:
    return "x".join("N" if not isinstance(d, int) else str(d) for d in dims) or "unknown"


def validate_han_model(model, meta: dict[str, str] | None = None, source: str = "the model") -> tuple[HANConfig, str]:
    """(config, precision) if the graph is what its han-edge metadata describes, else one sentence naming the difference.

    Checked: the metadata parses (``config_from_metadata``); exactly one graph input ``images`` and one output
    ``features``, both float32; input ``(N, 3, H, W)`` with (H, W) = ``config.input_size`` and output
    ``(N, feature_dim)``, the batch axis dynamic in both. An ONNX of another network carrying copied han-edge
    metadata, or metadata of another input size or feature width, is refused here instead of failing inside
    ONNX Runtime or TensorRT later.
    """
    meta = onnx_metadata(model) if meta is None else meta
    config, precision = config_from_metadata(meta, source)
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    outputs = list(graph.output)
    if [i.name for i in inputs] != [INPUT] or [o.name for o in outputs] != [OUTPUT]:
        raise HanEdgeError(f"{source}: the graph takes {[i.name for i in inputs]} and gives {[o.name for o in outputs]}, "
                           f"but a han-edge model takes ['{INPUT}'] and gives ['{OUTPUT}']")
    for role, value in (("input", inputs[0]), ("output", outputs[0])):
        elem = value.type.tensor_type.elem_type
        if elem != _FLOAT:
            raise HanEdgeError(f"{source}: the graph's {role} '{value.name}' is {_elem_name(elem)}, not float32")
    h, w = config.input_size
    got_in, got_out = _dims(inputs[0]), _dims(outputs[0])
    want_in, want_out = ["N", 3, h, w], ["N", config.feature_dim]
    if len(got_in) != 4 or got_in[1:] != want_in[1:]:
        raise HanEdgeError(f"{source}: the graph's input is {_shape_text(got_in)} but its metadata says "
                           f"HAN({config.variant}) takes Nx3x{h}x{w}")
    if len(got_out) != 2 or got_out[1:] != want_out[1:]:
        raise HanEdgeError(f"{source}: the graph's output is {_shape_text(got_out)} but its metadata says "
                           f"{config.feature_dim}-D features (Nx{config.feature_dim})")
    for role, dims in (("input", got_in), ("output", got_out)):
        if isinstance(dims[0], int):
            raise HanEdgeError(f"{source}: the graph's {role} has a fixed batch of {dims[0]}; han-edge models have a "
                               f"dynamic batch axis (re-export it with `han-edge export`)")
    check_folding(model, meta, source)
    return config, precision


def check_folding(model, meta: dict[str, str], source: str) -> None:
    """The metadata's normalisation form must be the graph's: the runtime normalises on the host exactly when the
    graph does not (a lie either way normalises twice or never)."""
    folded_graph = any(init.name == FOLD_SCALE for init in model.graph.initializer)
    folded_meta = normalization_of(meta, source) == FOLDED
    if folded_graph != folded_meta:
        raise HanEdgeError(f"{source}: its metadata says the input normalisation is {'' if folded_meta else 'not '}"
                           f"folded into the graph, but the graph {'lacks' if folded_meta else 'has'} "
                           "`han-edge fold`'s nodes")


def _elem_name(elem: int) -> str:
    try:
        import onnx

        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except Exception:
        return f"element type {elem}"


# ONNX Runtime's basic-level rewrite WeightBiasQuantization turns each DQ->Conv float bias into int32 by
# Round(bias / (input scale x weight scale)); in a file with FP16 Q/DQ scales (the TensorRT INT8 + FP16
# flavour, opset 19) that arithmetic runs in FP16 and overflows for small scales, costing accuracy the file
# does not have (TensorRT never quantises biases). Sessions on such files run without it.
ORT_FP16_ARTEFACTS = ("WeightBiasQuantization",)


def ort_workarounds(meta: dict[str, str]) -> list[str]:
    """ONNX Runtime optimisers to disable for a han-edge file, from its metadata."""
    return list(ORT_FP16_ARTEFACTS) if meta.get("han_edge.float_precision") == "fp16" else []


def ort_session(path, threads: int = 0, providers: list | None = None,
                disabled_optimizers: list[str] | None = None, spinning: bool = True):
    """An ONNX Runtime session (CPU unless ``providers`` says otherwise), or one sentence why not.

    ``path`` is a file or an in-memory ``onnx.ModelProto``. ``spinning=False`` lets the intra-op
    threads sleep between runs: where several sessions take turns on few cores, spinning threads of
    one eat the next one's run.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("running .onnx models needs ONNX Runtime: pip install 'han-edge[ort]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    name = "the in-memory model" if isinstance(source, bytes) else path
    try:
        extra = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"], **extra)
    except Exception as err:
        raise HanEdgeError(f"ONNX Runtime cannot load {name}: {str(err).splitlines()[0][:200]}") from None


def run_ort(session, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT], {INPUT: batch[i:i + chunk]})[0]
                           for i in range(0, len(batch), chunk)])
