"""DeepStream configs: parsed back (configparser / YAML) and every value checked against the model file.

The strongest check: nvinfer's pre-processing ``y = net-scale-factor * (x - offsets[c])`` applied to RGB
pixels with the written values, fed to the written model, must give the features of the original
model on exactly normalised input.
"""
import configparser
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from han_edge.deepstream import DEEPSTREAM_VERSION, DeepStreamOptions, write_configs
from han_edge.errors import HanEdgeError
from han_edge.onnx_io import load_onnx, onnx_metadata, ort_session


def read(result):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(result["nvinfer"])
    tracker = yaml.safe_load(Path(result["tracker"]).read_text())
    return parser["property"], tracker["ReID"]


def nvinfer_features(prop, folder: Path, pixels: np.ndarray) -> np.ndarray:
    """What DeepStream would compute: its pre-processing formula, then the model file the config names."""
    scale = float(prop["net-scale-factor"])
    offsets = np.array([float(v) for v in prop["offsets"].split(";")], np.float32).reshape(1, 3, 1, 1)
    y = (scale * (pixels - offsets)).astype(np.float32)
    return ort_session(folder / prop["onnx-file"]).run(["features"], {"images": y})[0]


def exact_features(onnx_path, pixels, config):
    mean = np.asarray(config["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(config["std"], np.float32).reshape(1, 3, 1, 1)
    return ort_session(onnx_path).run(["features"], {"images": ((pixels / 255 - mean) / std).astype(np.float32)})[0]


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_configs_from_an_unfolded_onnx_are_exact(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    meta = onnx_metadata(load_onnx(path))
    config = json.loads(meta["han_edge.config"])
    result = write_configs(path, tmp_path / "ds", DeepStreamOptions(batch_size=8, reid_history_size=50))
    prop, reid = read(result)
    height, width = config["input_size"]
    dim = config["global_dim"] + config["local_dim"]
    folded = tmp_path / "ds" / prop["onnx-file"]
    # the config names a folded copy of the model: scale 1, offsets 0
    assert onnx_metadata(load_onnx(folded))["han_edge.normalization"] == "folded"
    assert result["exact"] and result["normalization"] == "folded"
    expected = {
        "network-mode": "0", "batch-size": "8", "infer-dims": f"3;{height};{width}", "net-scale-factor": "1.0",
        "offsets": "0.0;0.0;0.0", "model-color-format": "0", "network-type": "100", "output-tensor-meta": "1",
        "process-mode": "2", "operate-on-class-ids": "0", "output-blob-names": "features",
        "maintain-aspect-ratio": "0", "gie-unique-id": "2", "operate-on-gie-id": "1",
        "model-engine-file": f"{folded.name}_b8_gpu0_fp32.engine",
    }
    for key, value in expected.items():
        assert prop[key] == value, key
    assert reid == {
        "reidType": 2, "batchSize": 8, "workspaceSize": 1024, "reidFeatureSize": dim, "reidHistorySize": 50,
        "inferDims": [3, height, width], "networkMode": 0, "inputOrder": 0, "colorFormat": 0,
        "offsets": [0.0, 0.0, 0.0], "netScaleFactor": 1.0, "keepAspc": 0, "addFeatureNormalization": 1,
        "onnxFile": folded.name, "modelEngineFile": "han_small.folded.reid_b8_fp32.engine"}
    text = Path(result["nvinfer"]).read_text()
    assert f"DeepStream {DEEPSTREAM_VERSION}" in text and f"DeepStream {DEEPSTREAM_VERSION}" in Path(result["tracker"]).read_text()
    # DeepStream's formula with these values reproduces the original model on exact normalisation
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, height, width)).astype(np.float32)
    got = nvinfer_features(prop, tmp_path / "ds", pixels)
    np.testing.assert_allclose(got, exact_features(path, pixels, config), atol=1e-5)


def test_unfolded_approximation_is_stated_and_bounded(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    config = json.loads(onnx_metadata(load_onnx(path))["han_edge.config"])
    result = write_configs(path, tmp_path / "ds", DeepStreamOptions(fold=False))
    prop, reid = read(result)
    std, mean = np.array(config["std"]), np.array(config["mean"])
    scale = float(prop["net-scale-factor"])
    assert scale == pytest.approx(1 / (255 * std.mean()), rel=1e-12)
    assert [float(v) for v in prop["offsets"].split(";")] == pytest.approx(list(255 * mean), rel=1e-12)
    assert reid["netScaleFactor"] == scale and reid["offsets"] == [float(v) for v in prop["offsets"].split(";")]
    assert prop["onnx-file"] == Path(path).name and prop["batch-size"] == "16"
    assert not result["exact"]
    assert result["max_rel_error"] == pytest.approx(np.abs(scale * 255 * std - 1).max())
    assert "APPROXIMATE" in Path(result["nvinfer"]).read_text() and "one scale factor" in Path(result["nvinfer"]).read_text()
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3, 160, 64)).astype(np.float32)
    got = nvinfer_features(prop, tmp_path / "ds", pixels)
    want = exact_features(path, pixels, config)
    assert not np.allclose(got, want, atol=1e-5)            # the approximation is real ...
    assert cosine(got, want).min() > 0.99                  # ... and small


def test_engine_input_uses_its_profile_and_precision(fresh_onnx, tmp_path):
    from han_edge.fold import fold_file

    _, path = fresh_onnx
    folded = fold_file(path, tmp_path / "han_small.int8.onnx")
    meta = {**onnx_metadata(load_onnx(folded)), "han_edge.precision": "int8"}
    plan = tmp_path / "han_small.int8.plan"
    plan.write_bytes(b"engine")
    Path(str(plan) + ".json").write_text(json.dumps({
        "metadata": meta, "precision": "int8", "tensorrt": "10.9.0", "gpu": "Orin", "compute_capability": "8.7",
        "batch": {"min": 1, "opt": 16, "max": 32}}))
    result = write_configs(plan, tmp_path / "ds")
    prop, reid = read(result)
    assert "onnx-file" not in prop and prop["model-engine-file"] == plan.name
    assert prop["network-mode"] == "1" and reid["networkMode"] == 2        # INT8 in each file's own enumeration
    assert prop["batch-size"] == "32" and reid["batchSize"] == 32
    assert prop["net-scale-factor"] == "1.0" and reid["modelEngineFile"] == plan.name and "onnxFile" not in reid
    assert (tmp_path / "ds" / plan.name).read_bytes() == b"engine"
    with pytest.raises(HanEdgeError, match="batches up to 32"):
        write_configs(plan, tmp_path / "ds2", DeepStreamOptions(batch_size=64))


def test_fp16_and_bad_input(fresh_onnx, tmp_path):
    from han_edge.onnx_io import save_onnx, set_metadata

    _, path = fresh_onnx
    model = load_onnx(path)
    set_metadata(model, {"han_edge.precision": "int8-cpu"})
    cpu = save_onnx(model, tmp_path / "han_small.int8-cpu.onnx")
    with pytest.raises(HanEdgeError, match="ONNX Runtime CPU flavour"):
        write_configs(cpu, tmp_path / "ds")
    set_metadata(model, {"han_edge.precision": "fp16"})
    fp16 = save_onnx(model, tmp_path / "han_small.fp16.onnx")
    prop, reid = read(write_configs(fp16, tmp_path / "ds16"))
    assert prop["network-mode"] == "2" and reid["networkMode"] == 1
    with pytest.raises(HanEdgeError, match="reidType"):
        write_configs(path, tmp_path / "ds3", DeepStreamOptions(reid_type=4))
    with pytest.raises(HanEdgeError, match="not found"):
        write_configs(tmp_path / "none.onnx", tmp_path / "ds4")


def test_cli_deepstream(fresh_onnx, tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app

    _, path = fresh_onnx
    result = CliRunner().invoke(app, ["deepstream", str(path), "--out", str(tmp_path / "ds"), "--person-class", "0,2",
                                      "--history", "30", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    prop, reid = read(report)
    assert prop["operate-on-class-ids"] == "0;2" and reid["reidHistorySize"] == 30
    result = CliRunner().invoke(app, ["deepstream", str(path), "--out", str(tmp_path / "ds2"), "--no-fold"])
    assert result.exit_code == 0 and "approximated" in result.output
    for args in (["--person-class", "x"], ["--person-class", str(2**31)], ["--gie-id", str(2**31)],
                 ["--operate-on-gie-id", "99999999999999999999999"]):
        result = CliRunner().invoke(app, ["deepstream", str(path), "--out", str(tmp_path / "ds3"), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert not list((tmp_path / "ds3").glob("*.txt")), args   # refused before any config is written


def test_options_of_the_wrong_kind_are_refused_before_any_file(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    for option, match in [({"batch_size": 10**30}, "batch size must be a whole number from 1 to 4096"),
                          ({"batch_size": 2.5}, "batch size"), ({"batch_size": "8"}, "batch size"),
                          ({"workspace_mib": -1}, "workspace"), ({"workspace_mib": "x"}, "workspace"),
                          ({"gpu_id": -1}, "gpu_id"), ({"gpu_id": "0\nnetwork-mode=0"}, "gpu_id"),
                          ({"reid_history_size": 1.5}, "reidHistorySize"), ({"fold": "no"}, "fold must be True or False"),
                          ({"gie_unique_id": "2"}, "gie_unique_id"), ({"operate_on_class_ids": 5}, "operate_on_class_ids"),
                          ({"operate_on_class_ids": ("a",)}, "a class id")]:   # TypeErrors, or written into the configs
        with pytest.raises(HanEdgeError, match=match):
            write_configs(path, tmp_path / "ds", DeepStreamOptions(**option))
    assert not (tmp_path / "ds").exists()


def test_a_model_name_with_a_line_break_is_not_written_into_a_config(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    odd = tmp_path / "x\nnetwork-mode=0\n#.onnx"
    odd.write_bytes(path.read_bytes())
    with pytest.raises(HanEdgeError, match="file name .* without line breaks"):
        write_configs(odd, tmp_path / "ds", DeepStreamOptions(fold=False))
    assert not (tmp_path / "ds").exists()


def test_a_failed_write_replaces_nothing_and_json_never_overwrites_an_output(fresh_onnx, tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app

    _, path = fresh_onnx
    out = tmp_path / "ds"
    out.mkdir()
    (out / "han_small.folded.onnx").write_bytes(b"OLD")
    (out / "config_tracker_reid_han_small.yml").mkdir()           # the last of the three destinations
    with pytest.raises(HanEdgeError, match="tracker config .* is a directory"):
        write_configs(path, out)
    assert (out / "han_small.folded.onnx").read_bytes() == b"OLD"
    assert not (out / "config_infer_secondary_han_small.txt").exists()
    result = CliRunner().invoke(app, ["deepstream", str(path), "--out", str(tmp_path / "ds2"),
                                      "--json", str(tmp_path / "ds2" / "han_small.folded.onnx")])
    assert result.exit_code == 2 and "is a file this command just wrote" in result.output, result.output
    onnx_metadata(load_onnx(tmp_path / "ds2" / "han_small.folded.onnx"))   # still the folded model, not JSON
