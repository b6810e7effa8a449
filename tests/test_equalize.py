"""Activation range equalization before INT8: same function; one range per depthwise input, closer
ranges per regular conv input."""
import numpy as np
import onnx

from han_edge.equalize import MAX_SCALE, MIGRATION, channel_peaks, equalize_conv_inputs, relu_pairs
from han_edge.onnx_io import load_onnx, ort_session, run_ort


def test_equalization_keeps_the_function_and_evens_the_ranges(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    model = load_onnx(path)
    pairs = relu_pairs(model)
    depthwise = [any(a.name == "group" and a.i > 1 for a in nxt.attribute) for _, _, nxt in pairs]
    # every unit's 1x1 -> ReLU -> depthwise 3x3, and each depthwise 3x3 -> ReLU -> the next unit's 1x1
    assert sum(depthwise) == 12 and len(pairs) - sum(depthwise) == 9
    for conv, relu, nxt in pairs:
        assert (conv.op_type, relu.op_type, nxt.op_type) == ("Conv", "Relu", "Conv")
        assert relu.input[0] == conv.output[0] and nxt.input[0] == relu.output[0]
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(40, 3, 160, 64)).astype(np.float32)
    equalized, count = equalize_conv_inputs(model, calib)
    assert count == 21
    tensors = [relu.output[0] for _, relu, _ in pairs]
    before, after = channel_peaks(model, tensors, calib), channel_peaks(equalized, tensors, calib)
    for t, full in zip(tensors, depthwise):
        scale = before[t].max() / np.maximum(before[t], 1e-12)
        evened = (before[t] > 0) & (scale <= MAX_SCALE)
        assert evened.any()
        # depthwise input: one range for all of them; regular conv input: each range moved MIGRATION of
        # the way (in log) towards the widest, peak * scale ** MIGRATION
        want = before[t].max() if full else before[t] * scale ** MIGRATION
        np.testing.assert_allclose(after[t][evened], np.broadcast_to(want, after[t].shape)[evened], rtol=1e-4)
        assert np.all(after[t] <= before[t].max() * (1 + 1e-4))
    onnx.save(equalized, str(tmp_path / "eq.onnx"))
    held = rng.normal(size=(8, 3, 160, 64)).astype(np.float32)
    a, b = run_ort(ort_session(path), held), run_ort(ort_session(tmp_path / "eq.onnx"), held)
    np.testing.assert_allclose(b, a, atol=1e-4)               # the FP32 function is unchanged
    assert not np.array_equal(                                # and the weights did change
        onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == pairs[0][0].input[1])),
        onnx.numpy_helper.to_array(next(i for i in equalized.graph.initializer if i.name == pairs[0][0].input[1])))
