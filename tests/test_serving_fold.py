"""Folded normalisation: parity with the unfolded model on FP32, FP16 and INT8, through ORT and the Embedder."""
import json

import numpy as np
import pytest

from han_edge.errors import HanEdgeError
from han_edge.fold import fold_constants, fold_file, fold_model, folded_name
from han_edge.onnx_io import load_onnx, onnx_metadata, ort_session


def _pixels(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 160, 64)).astype(np.float32)


def _normalise(x, config):
    mean = np.asarray(config.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config.std, np.float32).reshape(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def _run(path, x):
    return ort_session(path).run(["features"], {"images": x})[0]


@pytest.fixture(scope="module")
def fp16_onnx(fresh_onnx, tmp_path_factory):
    import onnx
    from onnxconverter_common import float16

    _, path = fresh_onnx
    out = tmp_path_factory.mktemp("fp16") / "han_small.fp16.onnx"
    model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    from han_edge.onnx_io import save_onnx, set_metadata

    set_metadata(model, {"han_edge.precision": "fp16"})
    save_onnx(model, out)
    return out


@pytest.fixture(scope="module")
def int8_onnx(fresh_onnx, tmp_path_factory):
    """A Q/DQ model from ONNX Runtime's static quantiser (what export's INT8 path produces), metadata kept."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from han_edge.onnx_io import save_onnx, set_metadata

    _, path = fresh_onnx
    config_meta = onnx_metadata(load_onnx(path))
    from han_edge.config import config_from_metadata

    config, _ = config_from_metadata(config_meta, str(path))
    calib = _normalise(_pixels(8, seed=3), config)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i:i + 4]} for i in range(0, 8, 4)])

        def get_next(self):
            return next(self.items, None)

    out = tmp_path_factory.mktemp("int8") / "han_small.int8.onnx"
    quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["Conv", "Gemm"])
    model = load_onnx(out)
    set_metadata(model, {**config_meta, "han_edge.precision": "int8"})
    save_onnx(model, out)
    return out


def test_fold_constants_reproduce_the_normalisation(fresh_onnx):
    torch_model, _ = fresh_onnx
    scale, bias = fold_constants(torch_model.config)
    x = _pixels(2)
    np.testing.assert_allclose(scale * x + bias, _normalise(x, torch_model.config), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavour", ["fp32", "fp16", "int8"])
def test_folded_model_matches_unfolded(flavour, fresh_onnx, fp16_onnx, int8_onnx, tmp_path):
    torch_model, fp32 = fresh_onnx
    src = {"fp32": fp32, "fp16": fp16_onnx, "int8": int8_onnx}[flavour]
    dst = fold_file(src, tmp_path / f"{flavour}.folded.onnx")
    x = _pixels()
    reference = _run(src, _normalise(x, torch_model.config))
    got = _run(dst, x)
    tol = {"fp32": 1e-5, "fp16": 2e-3, "int8": 2e-2}[flavour]
    assert np.abs(got - reference).max() < tol
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > 0.9999
    meta = onnx_metadata(load_onnx(dst))
    assert meta["han_edge.normalization"] == "folded" and meta["han_edge.color_order"] == "RGB"
    assert meta["han_edge.precision"] == onnx_metadata(load_onnx(src))["han_edge.precision"]
    assert "0..255" in meta["han_edge.input"]
    assert json.loads(meta["han_edge.config"]) == json.loads(onnx_metadata(load_onnx(src))["han_edge.config"])
    if flavour == "int8":     # quantisation untouched: same Q/DQ node count, folding nodes ahead of them
        def ops(m):
            return [n.op_type for n in m.graph.node]
        assert ops(load_onnx(dst)).count("QuantizeLinear") == ops(load_onnx(src)).count("QuantizeLinear")
        assert ops(load_onnx(dst))[:2] == ["Mul", "Add"]


def test_fold_refuses_twice_and_non_han_models(fresh_onnx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    _, path = fresh_onnx
    once = fold_file(path, tmp_path / "once.onnx")
    with pytest.raises(HanEdgeError, match="already folded"):
        fold_file(once, tmp_path / "twice.onnx")
    assert not (tmp_path / "twice.onnx").exists()
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["features"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 3])])
    bare = tmp_path / "bare.onnx"
    onnx.save(helper.make_model(graph), str(bare))
    with pytest.raises(HanEdgeError, match="no han-edge metadata"):
        fold_file(bare)
    with pytest.raises(HanEdgeError, match="not an .onnx"):
        fold_file(tmp_path / "model.plan")


def test_folded_name_and_in_place(fresh_onnx, tmp_path):
    import shutil

    _, path = fresh_onnx
    assert folded_name("a/han_small.int8.onnx").name == "han_small.int8.folded.onnx"
    copy = tmp_path / "han_small.onnx"
    shutil.copy(path, copy)
    fold_file(copy, copy)
    assert onnx_metadata(load_onnx(copy))["han_edge.normalization"] == "folded"
    assert fold_model is not None


def test_embedder_feeds_each_form_correctly(fresh_onnx, tmp_path):
    """The same crops through the unfolded and the folded model give the same features."""
    from han_edge.runtime import Embedder

    _, path = fresh_onnx
    folded = fold_file(path, tmp_path / "folded.onnx")
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in [(200, 90), (120, 50), (160, 64)]]
    plain = Embedder(path).embed_crops(crops)
    fold = Embedder(folded).embed_crops(crops)
    assert Embedder(folded).backend.normalization == "folded"
    np.testing.assert_allclose(fold, plain, atol=2e-5)


def test_cli_fold(fresh_onnx, tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app

    _, path = fresh_onnx
    runner = CliRunner()
    out = tmp_path / "f.onnx"
    result = runner.invoke(app, ["fold", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert onnx_metadata(load_onnx(out))["han_edge.normalization"] == "folded"
    result = runner.invoke(app, ["fold", str(out), "--out", str(tmp_path / "g.onnx")])
    assert result.exit_code == 2 and "already folded" in result.output
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.slow
def test_export_fold_normalization_flag(tmp_path):
    """`export --fold-normalization` (a real export, about 20 s) writes the folded form in place."""
    from typer.testing import CliRunner

    from han_edge.cli import app

    result = CliRunner().invoke(app, ["export", "--no-engine", "--fold-normalization", "--out", str(tmp_path / "export"),
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "export" / "han_small.onnx"
    assert onnx_metadata(load_onnx(written))["han_edge.normalization"] == "folded"
    assert json.loads((tmp_path / "r.json").read_text())["folded"] == [str(written)]
