"""FP16 for the float part of a Q/DQ graph (the TensorRT INT8 flavour): opset 19, FP16 Q/DQ scales.

A strongly typed TensorRT network executes the ONNX's types, so every tensor that is not INT8
must be FP16 in the file, or it runs and moves in FP32 on the GPU. Opset 13-18 QuantizeLinear
takes an FP32 input and scale only; opset 19 lets ``x``/``y_scale`` (and DequantizeLinear's
``x_scale``/``y``) be FP16, so the Q/DQ pairs sit directly between FP16 tensors, with no Casts for
TensorRT to fold. The conversion itself is onnxconverter-common's (``convert_float_to_float16``
with an empty op block list: Resize, GridSample, the reductions and the Q/DQ scales all go to
FP16); the opset is raised by ONNX's version converter. Only the checks and the sensitivity
analysis below are ours.
"""
from __future__ import annotations

import warnings

import numpy as np

FP16_OPSET = 19
# Inputs that stay FP32 by their op's definition or onnxconverter-common's choice (Resize roi/scales).
_ALWAYS_FLOAT_INPUTS = {"Resize": (1, 2)}


def to_opset(model, opset: int = FP16_OPSET):
    """The model at ``opset`` (ReduceMean/ReduceL2 get their axes as inputs from 18 on)."""
    from onnx import version_converter

    current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model if current >= opset else version_converter.convert_version(model, opset)


def qdq_to_fp16(model, keep_fp32_nodes=()):
    """Every float tensor of a Q/DQ model to FP16 except graph I/O and ``keep_fp32_nodes`` (names)."""
    from onnxconverter_common import float16

    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < FP16_OPSET:
        model = to_opset(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "values truncated to fp16" notices
        return float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=[],
                                                node_block_list=list(keep_fp32_nodes))


def as_fp16_stored(array) -> np.ndarray:
    """``array`` as float32 holding the values ``qdq_to_fp16``'s file stores (onnxconverter-common's rounding).

    ``int8_shift`` computes its bias corrections from these, so they are exact in the FP16 file too: from
    the FP32 weight scales, the file's rounding of them left ``c * sum(W)`` off by up to 0.1.
    """
    from onnxconverter_common.float16 import convert_np_to_float16

    array = np.asarray(array, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "values truncated to fp16" notices
        return convert_np_to_float16(np.atleast_1d(array)).astype(np.float32).reshape(array.shape)


def float32_tensors(model, allowed_nodes=()) -> list[str]:
    """Names of FP32 tensors outside the graph I/O, its boundary Casts and ``allowed_nodes``.

    Types come from ONNX shape inference over the whole graph (initializers, Constants, node
    outputs). An empty list means: every float tensor of the model is FP16.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    io = {v.name for v in (*graph.input, *graph.output)}
    exempt = set(io)
    allowed = set(allowed_nodes)
    for node in graph.node:
        touches_io = any(t in io for t in (*node.input, *node.output))
        if node.name in allowed or (node.op_type == "Cast" and touches_io):
            exempt.update(node.input)
            exempt.update(node.output)
        for index in _ALWAYS_FLOAT_INPUTS.get(node.op_type, ()):
            if index < len(node.input):
                exempt.add(node.input[index])
    return sorted(name for name, t in types.items() if t == onnx.TensorProto.FLOAT and name and name not in exempt)


def float_op_types(model) -> list[str]:
    """Op types that compute on float tensors (the FP16 sensitivity analysis' candidates)."""
    skip = {"QuantizeLinear", "DequantizeLinear", "Cast", "Shape", "Gather", "Unsqueeze", "Concat", "Constant",
            "Reshape", "Flatten", "Slice", "Equal", "Where", "Expand", "Transpose"}
    return sorted({n.op_type for n in model.graph.node if n.op_type not in skip})


def fp16_sensitivity(qdq_model, score, tolerance: float, max_kept: int = 4) -> tuple[list[str], dict[str, float]]:
    """Op types to keep in FP32 so that FP16 costs at most ``tolerance`` of the score.

    ``score(model)`` is the centred cosine of a model's features against FP32. All-FP16 is tried
    first; only when it loses more than ``tolerance`` against the FP32-float model is each op type
    kept in FP32 alone and scored, and the types that recover most are kept until the loss is within
    ``tolerance``. Returns (kept node names, {op type: score gained by keeping it FP32}).
    """
    baseline, full = score(qdq_model), score(qdq_to_fp16(qdq_model))
    if baseline - full <= tolerance:
        return [], {}
    nodes_of = {op: [n.name for n in qdq_model.graph.node if n.op_type == op] for op in float_op_types(qdq_model)}
    gains = {op: score(qdq_to_fp16(qdq_model, names)) - full for op, names in nodes_of.items()}
    kept: list[str] = []
    for op in sorted(gains, key=gains.get, reverse=True)[:max_kept]:
        kept += nodes_of[op]
        if baseline - score(qdq_to_fp16(qdq_model, kept)) <= tolerance:
            break
    return kept, gains
