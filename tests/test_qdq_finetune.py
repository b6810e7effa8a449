"""INT8 fine-tuning on the Q/DQ graph (han_edge.qdq_finetune): the executor, the write-back, the loop."""
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from han_edge.errors import HanEdgeError  # noqa: E402
from han_edge.onnx_io import ort_session, run_ort  # noqa: E402
from han_edge.qdq_finetune import QDQGraph, finetune_qdq  # noqa: E402


def _raw_session(model):
    """ONNX Runtime executing the file's Q/DQ nodes literally (no fusion into integer kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _tiny_qdq(seed=0):
    """x -> Q/DQ (U8) -> Conv (per-channel S8 weights, float bias) -> Q/DQ -> Sigmoid -> Q/DQ -> y, as ORT writes them."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    inits = [numpy_helper.from_array(np.round(w / w_scale[:, None, None, None]).astype(np.int8), "w_quantized"),
             numpy_helper.from_array(w_scale, "w_scale"), numpy_helper.from_array(np.zeros(4, np.int8), "w_zero"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bias")]
    nodes = [helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero"], ["w"], name="w_dq", axis=0)]
    for i, (src, scale, zero) in enumerate([("x", 0.02, 128), ("conv", 0.03, 100), ("sig", 1 / 255, 0)]):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s{i}"),
                  numpy_helper.from_array(np.array(zero, np.uint8), f"z{i}")]
        nodes += [helper.make_node("QuantizeLinear", [src, f"s{i}", f"z{i}"], [f"q{i}"], name=f"q{i}"),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"], name=f"dq{i}")]
        if i == 0:
            nodes.append(helper.make_node("Conv", ["d0", "w", "bias"], ["conv"], name="conv", pads=[1, 1, 1, 1]))
        elif i == 1:
            nodes.append(helper.make_node("Sigmoid", ["d1"], ["sig"], name="sigmoid"))
    nodes.append(helper.make_node("Flatten", ["d2"], ["y"], name="flatten"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _run(graph, x):
    with torch.no_grad():
        return graph(torch.from_numpy(x)).numpy()


def test_executor_runs_the_fp32_han_graph_exactly(fresh_onnx):
    _, path = fresh_onnx
    x = np.random.default_rng(0).normal(size=(4, 3, 160, 64)).astype(np.float32)
    assert np.abs(_run(QDQGraph(onnx.load(str(path))), x) - run_ort(ort_session(path), x)).max() < 1e-5


def test_executor_follows_quantize_dequantize_semantics():
    model = _tiny_qdq()
    x = np.random.default_rng(1).normal(0, 1.5, (16, 3, 8, 8)).astype(np.float32)   # beyond the input range too
    want = _raw_session(model).run(None, {"x": x})[0]
    got = _run(QDQGraph(model), x)
    levels = np.abs(got - want) * 255                                # the last quantiser's levels
    assert np.allclose(levels, np.round(levels), atol=1e-3) and levels.max() < 1.5
    # one level apart only at rounding ties: the Sigmoid sees 256 input levels, and ONNX Runtime's Sigmoid
    # differs from PyTorch's by an ulp, so a level whose sigmoid sits at a tie flips all its elements (0.7% here)
    assert (levels > 0.5).mean() < 0.02
    assert len(np.unique(got)) <= 256 and got.min() >= 0            # U8 levels of the last quantiser


def test_write_back_changes_values_only():
    model = _tiny_qdq()
    graph = QDQGraph(model)
    with torch.no_grad():
        for name, key in graph.param_of.items():
            graph.params[key] += 0.5 if name in graph.scales else 0.01
    out = graph.write_back()
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in out.graph.node] == \
           [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {"bias", "s0", "s1", "s2", "w_quantized"}       # zero points and weight scales stay
    assert np.allclose(after["s1"], before["s1"] * np.exp(0.5))
    assert np.abs(after["w_quantized"].astype(int)).max() <= 127
    # and the written file computes what the module computes
    x = np.random.default_rng(2).normal(size=(4, 3, 8, 8)).astype(np.float32)
    assert (np.abs(_raw_session(out).run(None, {"x": x})[0] - _run(graph, x)) > 1e-6).mean() < 0.02


def test_finetune_lowers_the_distance_to_its_teacher_or_keeps_the_model():
    teacher_model = _tiny_qdq()
    teacher_graph = QDQGraph(teacher_model)
    # the "FP32" teacher: the same weights without the quantisers' rounding
    teacher = teacher_graph.params[teacher_graph.param_of["w_quantized"]].detach()

    def float_features(x):
        import torch.nn.functional as F

        bias = torch.from_numpy(np.array(numpy_helper.to_array(next(i for i in teacher_model.graph.initializer if i.name == "bias"))))
        with torch.no_grad():
            return torch.sigmoid(F.conv2d(torch.from_numpy(x), teacher * 1.1, bias, padding=1)).flatten(1).numpy()

    rng = np.random.default_rng(3)
    images, heldout = (rng.normal(0, 1, (n, 3, 8, 8)).astype(np.float32) for n in (64, 32))
    tuned, result = finetune_qdq(teacher_model, images, float_features, heldout, float_features(heldout), steps=60,
                                 batch=16, lr=3e-3, scale_lr=1e-2)
    assert result.kept and result.loss_after < 0.8 * result.loss_before
    got = _raw_session(tuned).run(None, {"x": heldout})[0]
    assert ((got - float_features(heldout)) ** 2).sum(1).mean() == pytest.approx(result.loss_after, rel=1e-3)
    # nothing learned (zero learning rates): the calibrated model is returned as it was
    same, result = finetune_qdq(teacher_model, images, float_features, heldout, float_features(heldout), steps=3,
                                lr=0.0, scale_lr=0.0)
    assert same is teacher_model and not result.kept and result.loss_after == pytest.approx(result.loss_before)


def test_unnamed_nodes_and_operator_details_follow_onnx():
    """Node names are optional in ONNX; Flatten is 2-D at any axis; Shape takes start/end; Div on int64 truncates."""
    model = _tiny_qdq()
    for node in model.graph.node:
        node.name = ""
    x = np.random.default_rng(4).normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert (np.abs(_run(QDQGraph(model), x) - _raw_session(model).run(None, {"x": x})[0]) > 1e-6).mean() < 0.02
    shape = helper.make_tensor_value_info
    for op, attrs, out_shape in [("Flatten", {"axis": 2}, [6, 4]), ("Flatten", {"axis": -1}, [6, 4]),
                                 ("Flatten", {"axis": 0}, [1, 24])]:
        graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "g",
                                  [shape("x", TensorProto.FLOAT, [2, 3, 4])], [shape("y", TensorProto.FLOAT, out_shape)])
        tiny = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        np.testing.assert_array_equal(_run(QDQGraph(tiny), x), _raw_session(tiny).run(None, {"x": x})[0])
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1), helper.make_node("Div", ["s", "two"], ["y"])]
    graph = helper.make_graph(nodes, "g", [shape("x", TensorProto.FLOAT, [2, 3, 5])], [shape("y", TensorProto.INT64, [2])],
                              [numpy_helper.from_array(np.array(2, np.int64), "two")])
    tiny = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.zeros((2, 3, 5), np.float32)
    np.testing.assert_array_equal(_run(QDQGraph(tiny), x), _raw_session(tiny).run(None, {"x": x})[0])


def test_a_zero_feature_row_leaves_gradients_finite():
    """ReduceL2 after a ReLU (how F.normalize exports) at an all-zero row: gradient 0, not NaN."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceL2", ["r"], ["n"], axes=[1], keepdims=1),
             helper.make_node("Add", ["r", "n"], ["y"])]
    shape = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [shape("x", TensorProto.FLOAT, [2, 4])], [shape("y", TensorProto.FLOAT, [2, 4])])
    x = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    QDQGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unsupported_graphs_are_one_sentence():
    model = _tiny_qdq()
    model.graph.node.append(helper.make_node("Erf", ["y"], ["erf"], name="erf"))
    with pytest.raises(HanEdgeError, match="cannot run operators Erf"):
        QDQGraph(model)
    per_channel = _tiny_qdq()                      # an activation quantiser with one scale per channel
    scale = next(i for i in per_channel.graph.initializer if i.name == "s1")
    scale.CopyFrom(numpy_helper.from_array(np.full(4, 0.03, np.float32), "s1"))
    with pytest.raises(HanEdgeError, match="does not support QuantizeLinear 'q1' other than per-tensor"):
        QDQGraph(per_channel)
    shifted = _tiny_qdq()                          # INT8 weights with a zero point
    zero = next(i for i in shifted.graph.initializer if i.name == "w_zero")
    zero.CopyFrom(numpy_helper.from_array(np.ones(4, np.int8), "w_zero"))
    with pytest.raises(HanEdgeError, match="does not support INT8 weights with a zero point"):
        QDQGraph(shifted)
    with pytest.raises(HanEdgeError, match="at least one step"):
        finetune_qdq(_tiny_qdq(), np.zeros((2, 3, 8, 8), np.float32), lambda b: b, np.zeros((1, 3, 8, 8), np.float32),
                     np.zeros((1, 256), np.float32), steps=0)
