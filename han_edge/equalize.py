"""Activation range equalization before INT8: the channels entering a convolution get closer ranges.

HAN's units are ``1x1 conv -> BN -> ReLU -> 3x3 depthwise conv -> BN -> ReLU`` (BN folded into the
convs in the ONNX), and units follow each other. Activations are quantised per tensor, so a channel
whose ReLU output peaks at 0.5 where another peaks at 17 keeps a handful of the 256 levels.
Scaling output channel ``c`` of a conv (weights and bias) by ``s_c`` and the next conv's input
channel ``c`` by ``1 / s_c`` leaves the function unchanged (ReLU is positively homogeneous), so:

* before a **depthwise** conv, ``s_c = max_range / range_c`` gives every channel the tensor's range;
  the depthwise conv reads channel ``c`` alone and its weights are quantised per channel, so the
  ``1 / s_c`` costs them nothing;
* before a **regular** conv (a depthwise conv feeding the next unit's 1x1), the ``1 / s_c`` shrinks
  a column of weights that are quantised per *output* channel, adding weight rounding where the
  activation rounding is taken away; ``s_c = (max_range / range_c) ** MIGRATION`` splits the
  difficulty between the two (SmoothQuant's migration strength, Xiao et al. 2023).

This is the activation side of cross-layer equalization (Nagel et al., "Data-Free Quantization",
2019), with ranges measured on the calibration images; ONNX Runtime's quantiser has no such pass
(its SmoothQuant covers MatMul/Gemm). On the demo's trained HAN-S (512 held-out crops' squared
feature distance to FP32, calibration only, heads float), adding the regular convs' inputs took the
CPU flavour from 0.0052 to 0.0048 and the TensorRT flavour from 0.0103 to 0.0092; migration
strength 1.0 (full equalisation) made the CPU flavour worse (0.0059), 0.25 was as good as 0.5.
"""
from __future__ import annotations

import numpy as np

from han_edge.onnx_io import INPUT, node_attributes, ort_session

MAX_SCALE = 64.0   # a channel all but dead on the calibration images is not blown up beyond this
MIGRATION = 0.5    # share of a regular conv input's range difference moved into its weights


def relu_pairs(model) -> list[tuple]:
    """(conv, relu, conv) chains whose intermediate tensors have no other reader, weights initializers."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for relu in (n for n in model.graph.node if n.op_type == "Relu"):
        conv, nxt = producer.get(relu.input[0]), readers.get(relu.output[0], [])
        if conv is None or conv.op_type != "Conv" or len(nxt) != 1 or nxt[0].op_type != "Conv":
            continue
        weights = [w for w in (*conv.input[1:3], nxt[0].input[1]) if w]
        if len(readers.get(conv.output[0], [])) != 1 or any(w not in inits for w in weights):
            continue   # the conv's output read elsewhere too would not keep its function
        group = _group(nxt[0])
        channels = numpy_helper.to_array(inits[conv.input[1]]).shape[0]
        if group == 1 or group == channels == numpy_helper.to_array(inits[nxt[0].input[1]]).shape[0]:
            pairs.append((conv, relu, nxt[0]))   # grouped convs other than depthwise: not in HAN, left alone
    return pairs


def _group(node) -> int:
    return node_attributes(node).get("group", 1)


def channel_peaks(model, tensors: list[str], batch: np.ndarray, chunk: int = 32) -> dict[str, np.ndarray]:
    """Per-channel maximum of NCHW ``tensors`` over ``batch``, one chunk at a time (ONNX Runtime CPU)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    session = ort_session(probe)
    peaks = {t: np.zeros(0, np.float32) for t in tensors}
    for start in range(0, len(batch), chunk):
        for t, out in zip(tensors, session.run(tensors, {INPUT: batch[start:start + chunk]})):
            peak = out.max(axis=(0, 2, 3))
            peaks[t] = peak if peaks[t].size == 0 else np.maximum(peaks[t], peak)
    return peaks


def equalize_conv_inputs(model, calib_batch: np.ndarray):
    """A copy of ``model`` with the activations between conv -> ReLU -> conv equalised; (model, pairs)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = relu_pairs(out)
    if not pairs:
        return out, 0
    peaks = channel_peaks(out, [relu.output[0] for _, relu, _ in pairs], calib_batch)
    inits = {i.name: i for i in out.graph.initializer}

    readers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def rescale(node, index: int, factor: np.ndarray, axis: int = 0) -> None:
        name = node.input[index]
        array = numpy_helper.to_array(inits[name])
        if readers[name] > 1:   # shared (onnxsim merges equal constants, e.g. zero biases): scale a copy
            readers[name] -= 1
            name = node.input[index] = f"{name}/equalized/{node.name}"
            inits[name] = out.graph.initializer.add()
        shaped = factor.reshape((1,) * axis + (-1,) + (1,) * (array.ndim - 1 - axis))
        inits[name].CopyFrom(numpy_helper.from_array((array * shaped).astype(array.dtype), name))

    for conv, relu, nxt in pairs:
        peak = peaks[relu.output[0]]
        depthwise = _group(nxt) > 1
        scale = np.clip(peak.max() / np.maximum(peak, 1e-12), 1.0, MAX_SCALE) ** (1.0 if depthwise else MIGRATION)
        scale = scale.astype(np.float32)
        rescale(conv, 1, scale)
        if len(conv.input) > 2 and conv.input[2]:
            rescale(conv, 2, scale)
        rescale(nxt, 1, 1.0 / scale, axis=0 if depthwise else 1)   # depthwise: [C, 1, k, k]; regular: [O, C, k, k]
    return out, len(pairs)
