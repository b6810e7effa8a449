"""All 256 INT8 levels for non-negative activations under TensorRT's symmetric quantisation.

TensorRT quantises activations symmetrically (zero point 0). A tensor that cannot be negative (a
ReLU output, features times a sigmoid attention map, their averages and resizes) then uses the
levels 0..127 only: its rounding error is that of 7 bits. Quantising ``t - c`` instead, with ``c``
half the calibrated range and half the scale, spreads that range over all 256 levels (zero is -128).
A convolution without padding that reads the shifted tensor is corrected exactly in its bias:
``W * (t' + c) + b = W * t' + (b + c * sum(W))``, with ``W`` the weights as the graph dequantises them.
A zero-padded convolution would see ``-c`` at the border, so tensors read by one keep today's
quantiser (in HAN-S: the inputs of the depthwise 3x3 convolutions and of the spatial attention's
3x3; 24 of the 40 quantised activations are shifted).

Two forms in the graph, both made of what TensorRT's layer-fusion catalogue says it fuses (not
verified here: TensorRT cannot be installed):

* ``t = Relu(Conv(x))`` read by its quantiser only: the Conv's bias gets ``-c`` and the Relu becomes
  ``Clip(min=-c)`` (``Relu(z) - c = max(z - c, -c)``): Convolution + Clip is fused like Convolution
  + ReLU, and the INT8 output quantiser with it — the same kernels as before the shift;
* otherwise an ``Add`` of the scalar ``-c`` before the quantiser (a pointwise op with a one-value
  constant, fused with the quantiser after it); readers other than the convolutions (GridSample,
  Flatten) read ``t`` itself.

The float function of the graph is unchanged (``tests/test_int8_shift.py`` strips the quantisers and
compares); only the rounding changes. Measured on the benchmark's trained HAN-S (512 held-out crops,
calibration only): squared feature distance to FP32 0.0061 -> 0.0036 as the FP16 file runs, where
the same placement with asymmetric U8 activations (which TensorRT lacks) gives 0.0025 and a shift of every non-negative tensor
(padded convs' inputs too, not exact) would give 0.0026. The bias corrections use the weight scales
as the FP16 file stores them: computed from the FP32 scales they were off by up to 0.1, which cost
0.0036 -> 0.0043. The export shifts *after* the INT8 fine-tune (``qdq_finetune``): fine-tuned under
the shift, each weight step also moves ``c * sum(W)`` and 60 steps took 0.0035 to 0.0041; fine-tuned
(200 steps) then shifted, 0.0033.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from han_edge.half import as_fp16_stored
from han_edge.onnx_io import node_attributes

# ops whose output is >= 0 when their data inputs are (indices of the data inputs; None: all)
_KEEPS_SIGN = {"Mul": None, "Add": None, "Concat": None, "Max": None, "Min": None, "GlobalAveragePool": (0,),
               "AveragePool": (0,), "MaxPool": (0,), "GlobalMaxPool": (0,), "ReduceMean": (0,), "ReduceMax": (0,),
               "ReduceSum": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,), "Squeeze": (0,),
               "Unsqueeze": (0,), "Slice": (0,), "Identity": (0,), "QuantizeLinear": (0,),
               "DequantizeLinear": (0,), "Resize": (0,), "GridSample": (0,)}
_NON_NEGATIVE = ("Relu", "Sigmoid", "Softmax", "Exp", "Abs")
FP16_STORED_MAX = 1e4   # onnxconverter-common's max_finite_val: the FP16 file clips larger values


def non_negative_tensors(model) -> set[str]:
    """Tensors of ``model`` that are >= 0 for every input, from the ops alone (no data)."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {name for name, array in values.items() if (array >= 0).all()}
    for node in model.graph.node:   # ONNX graphs are topologically sorted
        attrs = node_attributes(node)
        if node.op_type in _NON_NEGATIVE:
            positive = True
        elif node.op_type == "Clip":
            positive = len(node.input) > 1 and node.input[1] in found   # a lower bound >= 0
        elif node.op_type in _KEEPS_SIGN:
            indices = _KEEPS_SIGN[node.op_type] or range(len(node.input))
            data = [node.input[i] for i in indices if i < len(node.input) and node.input[i]]
            positive = bool(data) and all(name in found for name in data)
            if node.op_type == "Resize":   # cubic interpolation overshoots
                positive &= attrs.get("mode", b"nearest") in (b"nearest", b"linear")
            if node.op_type == "GridSample":
                positive &= attrs.get("mode", b"linear") in (b"linear", b"bilinear", b"nearest")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):   # only with zero point 0
                positive &= _zero_point_is_zero(values, node)
        else:
            positive = False
        if positive:
            found.update(node.output)
    return found


def _zero_point_is_zero(values: dict, node) -> bool:
    """A QuantizeLinear/DequantizeLinear ``node`` whose zero point (in ``values``, the initializers) is 0 or absent."""
    if len(node.input) < 3 or not node.input[2]:
        return True
    return node.input[2] in values and not values[node.input[2]].any()


def _unpadded_conv(node, reads: str) -> bool:
    attrs = node_attributes(node)
    return (node.op_type == "Conv" and node.input[0] == reads and not any(attrs.get("pads", []))
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"))


def shift_non_negative(model):
    """(model with shifted quantisers, names of the shifted tensors' new scales) — see the module docstring.

    ``model`` is a symmetric Q/DQ graph (TensorRT flavour, FP32 float part); it is not changed.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    value = {name: numpy_helper.to_array(init) for name, init in inits.items()}
    producer = {o: n for n in graph.node for o in n.output}
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    positive = non_negative_tensors(out)
    new_nodes, fixed_scales, replaced = {}, [], set()

    def add_init(name: str, array: np.ndarray) -> str:
        while name in value:   # a conv may get a second correction (it reads one shifted tensor, makes another)
            name += "'"
        graph.initializer.append(numpy_helper.from_array(array, name))
        value[name] = array
        return name

    def weights(conv) -> tuple[np.ndarray | None, str | None]:
        """(the conv's weights as the FP16 file computes them, the weight scale to store so rounded)."""
        name = conv.input[1]
        if name in value:
            return value[name], None
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in value or dq.input[1] not in value:
            return None, None
        q, scale = value[dq.input[0]].astype(np.float32), as_fp16_stored(value[dq.input[1]])
        shape = [1] * q.ndim
        shape[node_attributes(dq).get("axis", 1) % q.ndim] = -1
        zero = value[dq.input[2]].astype(np.float32).reshape(shape) if len(dq.input) > 2 and dq.input[2] else 0
        return (q - zero) * (scale.reshape(shape) if scale.ndim else scale), dq.input[1]

    def bias(conv) -> np.ndarray | None:
        return value.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros((), np.float32)

    def set_bias(conv, array: np.ndarray) -> None:
        name = add_init(f"{conv.name or conv.output[0]}/shifted_bias", array.astype(np.float32))
        if len(conv.input) > 2:
            replaced.add(conv.input[2])
            conv.input[2] = name
        else:
            conv.input.append(name)

    for quant in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        tensor = quant.input[0]
        if tensor in value or tensor not in positive or quant.input[1] not in value or not _zero_point_is_zero(value, quant):
            continue
        quantizers = [r for r in readers[tensor] if r.op_type == "QuantizeLinear"]
        if len(quantizers) != 1 or value[quant.input[1]].ndim:   # one per-tensor quantiser per tensor
            continue
        dqs = readers[quant.output[0]]
        if not dqs or any(d.op_type != "DequantizeLinear" or d.input[1] != quant.input[1] for d in dqs):
            continue
        dq_outputs = {d.output[0] for d in dqs}
        convs = [r for d in dqs for r in readers[d.output[0]] if r.op_type in ("Conv", "Gemm")]
        others = [(d, r) for d in dqs for r in readers[d.output[0]] if r.op_type not in ("Conv", "Gemm")]
        if not convs or dq_outputs & outputs or not all(_unpadded_conv(c, c.input[0]) and c.input[0] in dq_outputs
                                                        for c in convs):
            continue   # a Gemm (transposed weights), a padded conv or a graph output reads it: not exact
        half_scale = as_fp16_stored(value[quant.input[1]] / 2)
        offset = float(128 * half_scale)   # zero -> level -128 exactly: [0, 255 half_scale] over all 256 levels
        found = [(conv, *weights(conv), bias(conv)) for conv in convs]
        if any(w is None or b is None for _, w, _, b in found):
            continue
        corrected = [b + offset * w.sum(axis=tuple(range(1, w.ndim))) for _, w, _, b in found]
        if any(np.abs(c).max() > FP16_STORED_MAX for c in corrected):
            continue   # the FP16 file would clip the bias
        for (conv, _, scale_name, _), array in zip(found, corrected):
            if scale_name is not None:   # the weight scales as the FP16 file stores them, as the biases assume
                value[scale_name] = as_fp16_stored(value[scale_name])
                inits[scale_name].CopyFrom(numpy_helper.from_array(value[scale_name], scale_name))
            set_bias(conv, array)
        half = add_init(f"{tensor}/shifted_scale", half_scale)
        for q_or_dq in (quant, *dqs):
            q_or_dq.input[1] = half
        fixed_scales.append(half)
        relu = producer.get(tensor)
        conv_in = producer.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
        if (conv_in is not None and conv_in.op_type == "Conv" and len(readers[relu.input[0]]) == 1
                and len(readers[tensor]) == 1 and not others and not {tensor, relu.input[0]} & outputs
                and len(conv_in.input) > 2 and conv_in.input[2] in value):
            set_bias(conv_in, value[conv_in.input[2]] - offset)
            relu.op_type = "Clip"
            relu.input.append(add_init(f"{tensor}/shift_min", np.array(-offset, np.float32)))
            continue
        shifted = f"{tensor}/shifted"
        minus = add_init(f"{tensor}/shift", np.array(-offset, np.float32))
        new_nodes[quant.output[0]] = helper.make_node("Add", [tensor, minus], [shifted], name=f"{tensor}/shift_add")
        quant.input[0] = shifted
        for dq, reader in others:   # GridSample, Flatten, ...: the unshifted float tensor
            for i, name in enumerate(reader.input):
                if name == dq.output[0]:
                    reader.input[i] = tensor
    nodes = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in new_nodes:
            nodes.append(new_nodes[node.output[0]])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)   # without the biases the corrections replaced
    return out, fixed_scales

