"""Shifted quantisers for non-negative activations (TensorRT flavour): same float function, all 256
levels used, only where the shift is exact, and only forms TensorRT fuses."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from han_edge.half import FP16_OPSET, to_opset
from han_edge.int8_layers import embedding_heads, sampling_grid_nodes
from han_edge.int8_shift import non_negative_tensors, shift_non_negative
from han_edge.onnx_io import load_onnx
from han_edge.ort_quantize import quantize
from han_edge.quantize import INT8_FLAVOURS

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tensorrt_qdq(fresh_onnx, tmp_path_factory):
    """The fresh HAN-S quantised as the TensorRT flavour is (symmetric S8, Q/DQ on conv inputs), before the shift."""
    _, path = fresh_onnx
    tmp = tmp_path_factory.mktemp("shift")
    source = tmp / "source.onnx"
    model = load_onnx(path)
    # fresh weights have zero biases and activations that fade to nothing by the third block; biases
    # like a trained network's keep every layer alive, so the comparisons below see every layer
    rng = np.random.default_rng(3)
    biases = {n.input[2] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2}
    for init in model.graph.initializer:
        if init.name in biases:
            init.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init) + rng.normal(0.1, 0.1, init.dims).astype(np.float32), init.name))
    onnx.save(to_opset(model, FP16_OPSET), str(source))
    calib = np.random.default_rng(0).normal(size=(16, 3, 160, 64)).astype(np.float32)
    float_nodes = sampling_grid_nodes(model) + embedding_heads(model)
    quantised = quantize(source, tmp / "q.onnx", calib, INT8_FLAVOURS["tensorrt"], "minmax", float_nodes,
                         tmp / "cache.json")
    return onnx.load(str(quantised)), calib


def _without_activation_quantisers(model, weights_from=None):
    """``model`` with every activation Q -> DQ pair taken out (weights stay dequantised as stored)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name for i in out.graph.initializer}
    q_input = {n.output[0]: n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    bypass = {n.output[0]: q_input[n.input[0]] for n in out.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in q_input}
    keep = [n for n in out.graph.node if n.output[0] not in q_input and n.output[0] not in bypass]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = bypass.get(name, name)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    if weights_from is not None:   # the same (FP16-rounded) weight scales as the other model
        theirs = {i.name: i for i in weights_from.graph.initializer}
        for init in out.graph.initializer:
            if init.name in theirs:
                init.CopyFrom(theirs[init.name])
    return out


def _outputs(model, x, names=None):
    import onnxruntime as ort

    model = onnx.load_model_from_string(model.SerializeToString())
    for name in names or []:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT8, None))   # quantiser levels
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([o.name for o in session.get_outputs()], {session.get_inputs()[0].name: x})


def test_shift_keeps_the_float_function(tensorrt_qdq):
    model, _ = tensorrt_qdq
    original = model.SerializeToString()
    shifted, fixed = shift_non_negative(model)
    assert model.SerializeToString() == original
    onnx.checker.check_model(shifted)
    assert len(fixed) == 24
    x = np.random.default_rng(1).normal(size=(4, 3, 160, 64)).astype(np.float32)
    want = _outputs(_without_activation_quantisers(model, weights_from=shifted), x)[0]
    got = _outputs(_without_activation_quantisers(shifted), x)[0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert not np.allclose(_outputs(shifted, x)[0], _outputs(model, x)[0], atol=1e-6)   # the rounding moved


def test_shifted_quantisers_use_both_halves_of_int8_and_only_feed_unpadded_convs(tensorrt_qdq):
    model, calib = tensorrt_qdq
    shifted, fixed = shift_non_negative(model)
    inits = {i.name: numpy_helper.to_array(i) for i in shifted.graph.initializer}
    quantisers = [n for n in shifted.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in fixed]
    assert len(quantisers) == len(fixed)
    before = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    levels = dict(zip([q.output[0] for q in quantisers],
                      _outputs(shifted, calib[:4], [q.output[0] for q in quantisers])[1:]))
    old_levels = dict(zip([q.output[0] for q in quantisers],
                          _outputs(model, calib[:4], [q.output[0] for q in quantisers])[1:]))
    readers = {}
    for node in shifted.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for q in quantisers:
        zero = inits[q.input[2]]
        assert zero.dtype == np.int8 and not zero.any()                 # still symmetric: TensorRT's INT8
        old_scale = next(i for i in model.graph.initializer if i.name == before[q.output[0]].input[1])
        # half the scale, as the FP16 file stores it (FP16, at least 1e-7)
        assert inits[q.input[1]] == pytest.approx(numpy_helper.to_array(old_scale) / 2, rel=1e-3, abs=1.2e-7)
        assert old_levels[q.output[0]].min() >= 0                       # before: levels 0..127 only
        for dq in readers[q.output[0]]:
            convs = [r for r in readers[dq.output[0]] if r.op_type == "Conv"]
            assert convs and all(r.op_type in ("Conv", "GridSample", "Flatten") for r in readers[dq.output[0]])
            for conv in convs:
                pads = [a.ints for a in conv.attribute if a.name == "pads"]
                assert not pads or not any(pads[0]), conv.name
    # now the upper half is used as well, and zero is level -128 (a resized attention map has no zeros)
    assert all(levels[n].max() > 0 for n in levels)
    assert sum(levels[n].min() == -128 for n in levels) >= 0.75 * len(levels)
    assert sum(len(np.unique(levels[n])) > len(np.unique(old_levels[n])) for n in levels) >= 0.75 * len(levels)
    # the two forms: Relu -> Clip(min=-c) behind a conv with the -c in its bias, or an Add of one scalar
    clips = [n for n in shifted.graph.node if n.op_type == "Clip" and n.input[1] in inits and inits[n.input[1]] < 0]
    adds = [n for n in shifted.graph.node if n.op_type == "Add" and n.name.endswith("/shift_add")]
    assert len(clips) + len(adds) == len(fixed) and clips and adds
    assert all(inits[a.input[1]].size == 1 and inits[a.input[1]] < 0 for a in adds)
    # tensors read by a padded (3x3) convolution keep today's quantiser
    padded_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Conv"
                     and any(a.name == "pads" and any(a.ints) for a in n.attribute)}
    assert padded_inputs and not padded_inputs & {q.output[0] for q in before.values() if q.input[1] in fixed}


def _graph(nodes, inits=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_non_negative_tensors_are_proved_from_the_ops():
    c = numpy_helper.from_array(np.array(0.5, np.float32), "c")
    minus = numpy_helper.from_array(np.array(-0.5, np.float32), "minus")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = _graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["x"], ["s"]),
                    helper.make_node("Mul", ["r", "s"], ["rs"]), helper.make_node("Mul", ["r", "x"], ["rx"]),
                    helper.make_node("Add", ["rs", "c"], ["rsc"]), helper.make_node("Add", ["rs", "minus"], ["neg"]),
                    helper.make_node("GlobalAveragePool", ["rs"], ["gap"]),
                    helper.make_node("Resize", ["rs", "", "scales"], ["lin"], mode="linear"),
                    helper.make_node("Resize", ["rs", "", "scales"], ["cubic"], mode="cubic"),
                    helper.make_node("Clip", ["x", "c"], ["clipped"]), helper.make_node("Clip", ["x", "minus"], ["low"]),
                    helper.make_node("Identity", ["x"], ["y"])], [c, minus, scales])
    found = non_negative_tensors(model)
    assert {"r", "s", "rs", "rsc", "gap", "lin", "clipped"} <= found
    assert not {"x", "rx", "neg", "cubic", "low", "y"} & found


def test_padded_convolutions_and_signed_tensors_are_left_alone():
    w = np.random.default_rng(0).integers(-127, 128, (2, 2, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w8"), numpy_helper.from_array(np.full(2, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(2, np.int8), "wz"), numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]

    def model(source, pads):
        return _graph([helper.make_node("Relu", ["x"], ["r"]),
                       helper.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["w"], axis=0),
                       helper.make_node("QuantizeLinear", [source, "s", "z"], ["q"]),
                       helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                       helper.make_node("Conv", ["d", "w"], ["y"], pads=pads)], inits)
    assert shift_non_negative(model("r", [0, 0, 0, 0]))[1]          # a ReLU output into an unpadded conv: shifted
    assert not shift_non_negative(model("r", [1, 1, 1, 1]))[1]      # a padded conv would see -c at the border
    assert not shift_non_negative(model("x", [0, 0, 0, 0]))[1]      # the input can be negative


def _conv_after_relu(shape, weight_scale=2.0 ** -6, relu_is_output=False):   # FP16-exact scales
    """x -> Conv -> Relu -> Q/DQ -> Conv (no padding) -> y, any spatial rank; optionally the Relu output is a graph output."""
    rng = np.random.default_rng(0)
    kernel = (1,) * (len(shape) - 2)
    w8 = [rng.integers(-127, 128, (2, 2, *kernel)).astype(np.int8) for _ in range(2)]
    inits = [numpy_helper.from_array(w8[0], "w8a"), numpy_helper.from_array(w8[1], "w8b"),
             numpy_helper.from_array(np.full(2, weight_scale, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(2, np.int8), "wz"), numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"), numpy_helper.from_array(np.full(2, 0.1, np.float32), "b")]
    nodes = [helper.make_node("DequantizeLinear", ["w8a", "ws", "wz"], ["wa"], axis=0),
             helper.make_node("DequantizeLinear", ["w8b", "ws", "wz"], ["wb"], axis=0),
             helper.make_node("Conv", ["x", "wa", "b"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("Conv", ["d", "wb", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if relu_is_output:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("shape", [(1, 2, 6), (1, 2, 4, 4), (1, 2, 3, 3, 3)])
def test_exact_for_1d_2d_3d_convolutions(shape):
    model = _conv_after_relu(shape)
    shifted, fixed = shift_non_negative(model)
    assert fixed and [n.op_type for n in shifted.graph.node].count("Clip") == 1
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(_outputs(_without_activation_quantisers(shifted), x)[0],
                               _outputs(_without_activation_quantisers(model, weights_from=shifted), x)[0], atol=1e-5)


def test_graph_outputs_keep_their_values():
    model = _conv_after_relu((1, 2, 4, 4), relu_is_output=True)
    shifted, fixed = shift_non_negative(model)
    assert fixed and "Clip" not in [n.op_type for n in shifted.graph.node]   # the Add form: r itself is unchanged
    x = np.random.default_rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_outputs(shifted, x)[1], _outputs(model, x)[1])


def test_a_correction_the_fp16_file_would_clip_is_not_made():
    # weights of 127 * 100 per input: c * sum(W) far beyond FP16's stored range (onnxconverter-common: 1e4)
    assert not shift_non_negative(_conv_after_relu((1, 2, 4, 4), weight_scale=1000.0))[1]
