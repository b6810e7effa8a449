"""Activation range equalization before INT8: same function, one range per depthwise input."""
import numpy as np
import onnx

from han_edge.equalize import MAX_SCALE, channel_peaks, depthwise_pairs, equalize_depthwise_inputs
from han_edge.onnx_io import load_onnx, ort_session, run_ort


def test_equalization_keeps_the_function_and_evens_the_ranges(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    model = load_onnx(path)
    pairs = depthwise_pairs(model)
    assert len(pairs) == 12                                   # every unit's 1x1 -> ReLU -> depthwise 3x3
    for conv, relu, depthwise in pairs:
        assert (conv.op_type, relu.op_type, depthwise.op_type) == ("Conv", "Relu", "Conv")
        assert relu.input[0] == conv.output[0] and depthwise.input[0] == relu.output[0]
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(40, 3, 160, 64)).astype(np.float32)
    equalized, count = equalize_depthwise_inputs(model, calib)
    assert count == 12
    tensors = [relu.output[0] for _, relu, _ in pairs]
    before, after = channel_peaks(model, tensors, calib), channel_peaks(equalized, tensors, calib)
    for t in tensors:
        scale = before[t].max() / np.maximum(before[t], 1e-12)
        evened = (before[t] > 0) & (scale <= MAX_SCALE)
        assert evened.any()
        np.testing.assert_allclose(after[t][evened], before[t].max(), rtol=1e-4)   # one range for all of them
        assert np.all(after[t] <= before[t].max() * (1 + 1e-4))
    onnx.save(equalized, str(tmp_path / "eq.onnx"))
    held = rng.normal(size=(8, 3, 160, 64)).astype(np.float32)
    a, b = run_ort(ort_session(path), held), run_ort(ort_session(tmp_path / "eq.onnx"), held)
    np.testing.assert_allclose(b, a, atol=1e-4)               # the FP32 function is unchanged
    assert not np.array_equal(                                # and the weights did change
        onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == pairs[0][0].input[1])),
        onnx.numpy_helper.to_array(next(i for i in equalized.graph.initializer if i.name == pairs[0][0].input[1])))
