"""Fold the input normalisation into a han-edge ONNX: the model then takes RGB pixels 0..255 as float.

The one pre-processing contract, stated in every file's metadata:

- ``han_edge.normalization`` absent or ``"external"``: the input is ``(x/255 - mean)/std`` per RGB channel
  (what ``export`` writes by default);
- ``"folded"``: the input is ``x`` itself (RGB, float32, 0..255) and the graph starts with
  ``Mul(x, 1/(255*std)) -> Add(., -mean/std)``, so a consumer (DeepStream's nvinfer or tracker, Triton
  clients, the ``Embedder``) needs scale 1 and offset 0;
- ``han_edge.color_order``: ``"RGB"`` (the channel order of the input, in both forms).

A graph transform on the ONNX, so it works on every precision ``export`` writes: FP32, FP16 (FP32
I/O, the two new nodes run in FP32 before the first Cast) and INT8 Q/DQ (the nodes run before the
first QuantizeLinear, whose scale was calibrated on normalised input, so quantisation is unchanged).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from han_edge.config import FOLDED, NORMALIZATION_KEY, HANConfig, normalization_of
from han_edge.errors import HanEdgeError
from han_edge.onnx_io import FOLD_SCALE, INPUT, load_onnx, onnx_metadata, save_onnx, set_metadata, validate_han_model
from han_edge.paths import as_path, not_the_input

COLOR_ORDER_KEY = "han_edge.color_order"
_NORMALISED = "han_edge_fold/normalised"


def fold_constants(config: HANConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias), each (1, 3, 1, 1) float32: ``scale * x + bias == (x/255 - mean)/std``."""
    mean = np.asarray(config.mean, np.float64)
    std = np.asarray(config.std, np.float64)
    scale = 1.0 / (255.0 * std)
    bias = -mean / std
    return scale.astype(np.float32).reshape(1, 3, 1, 1), bias.astype(np.float32).reshape(1, 3, 1, 1)


def fold_model(model):
    """A copy of an (unfolded) han-edge ONNX ``ModelProto`` that normalises inside the graph."""
    import onnx
    from onnx import helper, numpy_helper

    meta = onnx_metadata(model)
    config, _ = validate_han_model(model, meta, "the model")   # the graph is the HAN its metadata describes
    if normalization_of(meta) == FOLDED:
        raise HanEdgeError("the model's normalisation is already folded into the graph")
    graph_inputs = [i.name for i in model.graph.input]
    if INPUT not in graph_inputs:
        raise HanEdgeError(f"the model has no input named {INPUT!r} (inputs: {', '.join(graph_inputs)})")
    elem = next(i for i in model.graph.input if i.name == INPUT).type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise HanEdgeError(f"the model's input {INPUT!r} is {onnx.TensorProto.DataType.Name(elem)}, "
                           "not FLOAT; only float32-input models can be folded")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    taken = {n.name for n in graph.node} | {t.name for t in graph.initializer}
    if FOLD_SCALE in taken or _NORMALISED in {o for n in graph.node for o in n.output}:
        raise HanEdgeError("the model already contains han-edge's folding nodes")
    # Every consumer of the raw input now reads the normalised tensor.
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == INPUT:
                node.input[i] = _NORMALISED
    for out in graph.output:
        if out.name == INPUT:
            raise HanEdgeError(f"the model outputs its input {INPUT!r}; cannot fold")
    scale, bias = fold_constants(config)
    graph.initializer.extend([numpy_helper.from_array(scale, FOLD_SCALE),
                              numpy_helper.from_array(bias, "han_edge_fold/bias")])
    nodes = [helper.make_node("Mul", [INPUT, FOLD_SCALE], ["han_edge_fold/scaled"],
                              name="han_edge_fold/Mul"),
             helper.make_node("Add", ["han_edge_fold/scaled", "han_edge_fold/bias"], [_NORMALISED],
                              name="han_edge_fold/Add")]
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    height, width = config.input_size
    set_metadata(folded, {
        NORMALIZATION_KEY: FOLDED,
        COLOR_ORDER_KEY: "RGB",
        "han_edge.input": f"images float32 [N,3,{height},{width}] RGB 0..255 (normalisation folded into the graph)",
        "han_edge.fold": json.dumps({"scale": scale.ravel().tolist(), "bias": bias.ravel().tolist()}),
    })
    try:
        onnx.checker.check_model(folded)
    except Exception as err:     # a bug here, not the user's input, but say it in one sentence
        raise HanEdgeError(f"the folded model does not pass the ONNX checker: {str(err).splitlines()[0][:200]}") from None
    return folded


def folded_name(path: str | Path) -> Path:
    """``han_small.int8.onnx`` -> ``han_small.int8.folded.onnx`` beside it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".onnx") + ".folded.onnx")


def fold_file(src: str | Path, dst: str | Path | None = None) -> Path:
    """Write the folded form of ``src`` to ``dst`` (default: ``<stem>.folded.onnx``; may equal ``src``), atomically."""
    src = as_path(src, "model file")
    if src.suffix.lower() != ".onnx":
        raise HanEdgeError(f"{src.name} is not an .onnx file; folding works on ONNX models (fold before `han-edge build`)")
    dst = as_path(dst, "folded ONNX") if dst is not None else folded_name(src)
    if dst.suffix.lower() != ".onnx":
        raise HanEdgeError(f"the folded model is an ONNX file: give --out a name ending in .onnx, not {dst.name!r}")
    if os.path.abspath(dst) != os.path.abspath(src):   # in place on purpose (fold_export), never through a link
        not_the_input(dst, src, "folded ONNX")
    folded = fold_model(load_onnx(src))
    return save_onnx(folded, dst)


def fold_export(result: dict, log=print) -> list[str]:
    """Fold, in place, every ONNX an ``export_all`` result names (``fp32``: path; ``fp16``/``int8``: {"path": ...}).

    In place, so the rest of ``export`` (the engine build, the JSON report) uses the folded files.
    """
    folded = []
    for key in ("fp32", "fp16", "int8"):
        entry = result.get(key)
        path = entry.get("path") if isinstance(entry, dict) else entry
        if not path or not str(path).endswith(".onnx"):
            continue
        fold_file(path, path)
        folded.append(str(path))
        log(f"folded the normalisation into {path} (input: RGB 0..255 float)")
    return folded
