import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from han_edge.cli import app
from han_edge.errors import HanEdgeError
from han_edge.export import (ExportOptions, calibration_paths, centred_cosine, cosine_rows, export_all, export_int8,
                             heldout_paths, layer_groups, load_batch, load_onnx, onnx_metadata, ort_session, read_config,
                             run_ort)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_checkpoint):
    out = tmp_path_factory.mktemp("export")
    result = export_all(ExportOptions(checkpoint=str(trained_checkpoint), fp16=True, int8=True, calib_size=128,
                                      out_dir=str(out)), log=lambda *_: None)
    return out, result


@pytest.fixture(scope="module")
def heldout(exported):
    out, _ = exported
    config, _ = read_config(out / "han_small.onnx")
    return load_batch(heldout_paths(), config)


def test_fp32_parity_metadata_and_dynamic_batch(exported, heldout):
    out, result = exported
    assert result["parity"]["cosine_min"] >= 0.99999
    model = load_onnx(out / "han_small.onnx")
    assert model.graph.input[0].name == "images" and model.graph.output[0].name == "features"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param      # symbolic batch axis
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and "AffineGrid" not in ops
    meta = onnx_metadata(model)
    config, precision = read_config(out / "han_small.onnx")
    assert (config.variant, config.input_size, precision) == ("small", (160, 64), "fp32")
    assert json.loads(meta["han_edge.mean"]) == list(config.mean)
    assert "local[512:1024]" in meta["han_edge.feature_layout"]
    for name in ("han_small.onnx", "han_small.fp16.onnx", "han_small.int8.onnx"):
        session = ort_session(out / name)
        x = np.concatenate([heldout] * 2)[:64]
        full = session.run(None, {"images": x})[0]
        for batch in (1, 7):
            part = session.run(None, {"images": x[:batch]})[0]
            np.testing.assert_allclose(part, full[:batch], atol=2e-3 if "int8" in name else 1e-4)


def test_fp16_model(exported, heldout):
    out, result = exported
    model = load_onnx(out / "han_small.fp16.onnx")
    assert read_config(out / "han_small.fp16.onnx")[1] == "fp16"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT     # FP32 I/O
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 40                                                              # FP16 weights
    ref = run_ort(ort_session(out / "han_small.onnx"), heldout)
    got = run_ort(ort_session(out / "han_small.fp16.onnx"), heldout)
    assert cosine_rows(ref, got).min() >= 0.999
    assert centred_cosine(ref, got) >= 0.999


def _quantizers(model):
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear"], inits


def test_int8_tensorrt_flavour_is_symmetric_s8(exported):
    out, result = exported
    model = load_onnx(out / "han_small.int8.onnx")
    quantizers, inits = _quantizers(model)
    assert len(quantizers) >= 20
    for node in quantizers:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
    # per-channel symmetric int8 weights: DequantizeLinear of an int8 initializer with one scale per channel
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 4]
    assert weight_dq and all(inits[n.input[0]].dtype == np.int8 and inits[n.input[1]].size == inits[n.input[0]].shape[0]
                             and not inits[n.input[2]].any() for n in weight_dq)
    # the hard-attention sampling stays out of the Q/DQ regions
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.op_type == "GridSample"):
        assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    assert read_config(out / "han_small.int8.onnx")[1] == "int8"


def test_int8_accuracy_on_trained_model(exported):
    _, result = exported
    int8 = result["int8"]
    assert int8["centred_cosine"] >= 0.98
    assert int8["neighbour_agreement"] >= 0.8
    fp32, q = int8["retrieval"]["fp32"], int8["retrieval"]["int8"]
    assert abs(fp32["rank1"] - q["rank1"]) <= 0.02 and abs(fp32["mAP"] - q["mAP"]) <= 0.02


def test_int8_cpu_flavour_and_exclusions_and_cache(exported, tmp_path):
    out, _ = exported
    config, _ = read_config(out / "han_small.onnx")
    calib = load_batch(calibration_paths(None, 64), config)
    held = load_batch(heldout_paths(64), config)
    groups = layer_groups(load_onnx(out / "han_small.onnx"))
    assert {"stem", "blocks.0:dw", "local_units.2:pw", "attention.1", "global_fc"} <= set(groups)
    path = tmp_path / "han_small.int8-cpu.onnx"
    report = export_int8(out / "han_small.onnx", path, calib, held, flavour="cpu", exclude=["local_units.0:dw"])
    model = load_onnx(path)
    quantizers, inits = _quantizers(model)
    assert {inits[n.input[2]].dtype for n in quantizers} == {np.dtype(np.uint8)}      # U8 activations
    excluded = set(groups["local_units.0:dw"])
    assert excluded and all(n.name not in excluded or n.op_type == "Conv" for n in model.graph.node)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name in excluded:
            assert producers.get(node.input[1]) != "DequantizeLinear"                 # weights left in float
    assert report.excluded_groups == ["local_units.0:dw"] and not report.cache_reused
    again = export_int8(out / "han_small.onnx", path, calib, held, flavour="cpu", exclude=["local_units.0:dw"])
    assert again.cache_reused                                      # rebuild does not recalibrate
    with pytest.raises(HanEdgeError, match="unknown layer groups"):
        export_int8(out / "han_small.onnx", path, calib, held, flavour="cpu", exclude=["nope"])


def test_sensitivity_analysis_keeps_worst_groups_in_float(exported, tmp_path):
    out, _ = exported
    config, _ = read_config(out / "han_small.onnx")
    calib = load_batch(calibration_paths(None, 64), config)
    held = load_batch(heldout_paths(48), config)
    report = export_int8(out / "han_small.onnx", tmp_path / "m.int8.onnx", calib, held, target=0.9999, max_excluded=2)
    assert len(report.sensitivity) == len(layer_groups(load_onnx(out / "han_small.onnx")))
    worst = sorted(report.sensitivity, key=report.sensitivity.get, reverse=True)[:2]
    assert report.excluded_groups == worst
    meta = onnx_metadata(load_onnx(tmp_path / "m.int8.onnx"))
    assert json.loads(meta["han_edge.int8_excluded"]) == worst


def test_clear_errors(tmp_path, synthetic_root):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(HanEdgeError, match="cannot be read as a han-edge checkpoint"):
        export_all(ExportOptions(checkpoint=str(bad), out_dir=str(tmp_path)))
    with pytest.raises(HanEdgeError, match="unknown variant"):
        export_all(ExportOptions(variant="xl", out_dir=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HanEdgeError, match="holds no images"):
        calibration_paths(str(tmp_path / "empty"), 10)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00\x01broken")
    with pytest.raises(HanEdgeError, match="not a valid ONNX model"):
        load_onnx(corrupt)


def test_wrong_variant_checkpoint(trained_checkpoint, tmp_path):
    with pytest.raises(HanEdgeError, match=r"holds HAN\(small\), not HAN\(large\)"):
        export_all(ExportOptions(variant="large", checkpoint=str(trained_checkpoint), out_dir=str(tmp_path)))


def test_cli_export_without_tensorrt(tmp_path, synthetic_root):
    pytest.importorskip("onnxruntime")
    import importlib.util
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the engine step would run")
    runner = CliRunner()
    args = ["export", "--variant", "small", "--int8", "--int8-exclude", "", "--calib-size", "32",
            "--out", str(tmp_path / "export"), "--engines", str(tmp_path / "engines")]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "needs TensorRT" in result.output and "Traceback" not in result.output
    assert (tmp_path / "export" / "han_small.onnx").is_file() and (tmp_path / "export" / "han_small.int8.onnx").is_file()
    load_onnx(tmp_path / "export" / "han_small.int8.onnx")               # still valid
    fp32_only = ["export", "--no-engine", "--out", str(tmp_path / "fp32")]
    result = runner.invoke(app, fp32_only)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fp32" / "han_small.onnx").is_file()
    result = runner.invoke(app, ["inspect", str(tmp_path / "export" / "han_small.int8.onnx")])
    assert result.exit_code == 0 and "int8" in result.output and "QuantizeLinear" in result.output
