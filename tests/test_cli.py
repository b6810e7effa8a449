"""The runtime commands end to end on CPU: embed, match, bench, build, profile cost, train --resume checks."""
import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from han_edge.cli import app
from han_edge.gallery import Gallery

runner = CliRunner()


def test_embed_images_then_match(tmp_path, fresh_onnx, synthetic_root):
    _, onnx_path = fresh_onnx
    result = runner.invoke(app, ["embed", "--engine", str(onnx_path), "--images", str(synthetic_root / "query"),
                                 "--out", str(tmp_path / "q.npz")])
    assert result.exit_code == 0, result.output
    queries = Gallery.load(tmp_path / "q.npz", dim=1024)
    ids, cams = queries.entries().ids, queries.entries().cams
    assert len(queries) == len(list((synthetic_root / "query").glob("*.jpg")))
    assert (ids > 0).all() and (cams >= 0).all()                     # parsed from Market-style names
    result = runner.invoke(app, ["match", "--gallery", str(tmp_path / "q.npz"), "--query", str(tmp_path / "q.npz"),
                                 "-k", "3", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    matches = json.loads((tmp_path / "m.json").read_text())
    assert np.array(matches["ids"]).shape == (len(queries), 3)
    assert matches["ids"][0][0] == matches["query_ids"][0]            # each query finds itself first


def test_embed_frames_with_boxes_and_video(tmp_path, fresh_onnx):
    _, onnx_path = fresh_onnx
    frames = [np.random.default_rng(i).integers(0, 256, (240, 320, 3), dtype=np.uint8) for i in range(3)]
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        cv2.imwrite(str(tmp_path / "frames" / f"f{i}.png"), frame)
    boxes = {"f0.png": [[10, 10, 60, 150], [100, 20, 180, 230]], "f2.png": [[-20, 5, 50, 100]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    result = runner.invoke(app, ["embed", "--engine", str(onnx_path), "--images", str(tmp_path / "frames"),
                                 "--boxes", str(tmp_path / "boxes.json"), "--out", str(tmp_path / "f.npz")])
    assert result.exit_code == 0, result.output
    assert len(Gallery.load(tmp_path / "f.npz")) == 3
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 240))
    for frame in frames:
        writer.write(frame)
    writer.release()
    (tmp_path / "vboxes.json").write_text(json.dumps({"0": [[10, 10, 60, 150]], "2": [[0, 0, 100, 200], [5, 5, 50, 90]]}))
    result = runner.invoke(app, ["embed", "--engine", str(onnx_path), "--video", str(video),
                                 "--boxes", str(tmp_path / "vboxes.json"), "--out", str(tmp_path / "v.npz")])
    assert result.exit_code == 0, result.output
    ids = Gallery.load(tmp_path / "v.npz").entries().ids
    assert ids.tolist() == [0, 2, 2]                                   # frame index as id
    result = runner.invoke(app, ["embed", "--engine", str(onnx_path), "--video", str(video),
                                 "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 2 and "needs --boxes" in result.output and "Traceback" not in result.output


def test_bench_on_onnx(tmp_path, fresh_onnx):
    _, onnx_path = fresh_onnx
    result = runner.invoke(app, ["bench", "--engine", str(onnx_path), "--batch", "1,4", "--iters", "3",
                                 "--gallery-size", "500", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["backend"].startswith("onnxruntime") and report["device"].startswith("cpu")
    stages = {(r["batch"], r["stage"]) for r in report["rows"]}
    assert stages == {(b, s) for b in (1, 4) for s in ("preprocess", "inference", "matching", "end_to_end")} | \
        {(64, "search_64q")}
    for row in report["rows"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["images_per_s"] > 0


def test_build_and_bench_plan_without_tensorrt(tmp_path, fresh_onnx):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    _, onnx_path = fresh_onnx
    result = runner.invoke(app, ["build", str(onnx_path), "--engine", str(tmp_path / "x.plan")])
    assert result.exit_code == 3 and "needs TensorRT" in result.output
    plan = tmp_path / "han_small.plan"
    plan.write_bytes(b"x")
    from han_edge.config import get_config, model_metadata

    side = {"metadata": model_metadata(get_config("small"), "fp32"), "precision": "fp32", "tensorrt": "10.3.0",
            "gpu": "Orin", "compute_capability": "8.7", "batch": {"min": 1, "opt": 32, "max": 64}}
    (tmp_path / "han_small.plan.json").write_text(json.dumps(side))     # plausible: TensorRT is what is missing
    result = runner.invoke(app, ["bench", "--engine", str(plan)])
    assert result.exit_code == 3 and "TensorRT" in result.output and "Traceback" not in result.output


def test_profile_cost_table(fresh_onnx, tmp_path):
    _, onnx_path = fresh_onnx
    result = runner.invoke(app, ["profile", "cost", "--model", str(onnx_path), "--batch", "4", "--iters", "2",
                                 "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "c.json").read_text())
    assert row["variant"] == "small" and row["precision"] == "fp32" and row["rank1"] is None
    assert abs(row["macs"] - 1.856e8) < 1e6 and row["images_per_s"] > 0
    assert row["ms_per_image"] == pytest.approx(1e3 / row["images_per_s"])


def test_train_resume_of_another_variant_is_refused(tmp_path, trained_checkpoint):
    result = runner.invoke(app, ["train", "--variant", "large", "--resume", str(trained_checkpoint),
                                 "--epochs", "5", "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert "holds HAN(small), not HAN(large)" in result.output and "Traceback" not in result.output


def test_bench_precision_and_device_options(tmp_path, fresh_onnx):
    import torch

    from han_edge.checkpoint import save_checkpoint

    model, onnx_path = fresh_onnx
    result = runner.invoke(app, ["bench", "--model", str(onnx_path), "--precision", "fp16"])
    assert result.exit_code == 2 and "apply to .pt checkpoints" in result.output
    checkpoint = tmp_path / "fresh.pt"
    save_checkpoint(checkpoint, model, model.config, epoch=0)
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["bench", "--model", str(checkpoint), "--precision", "fp16", "--device", "cpu"])
        assert result.exit_code == 2 and "fp16 PyTorch inference is for CUDA" in result.output
        result = runner.invoke(app, ["bench", "--model", str(checkpoint), "--device", "cuda"])
        assert result.exit_code == 3 and "CUDA" in result.output
    result = runner.invoke(app, ["bench", "--model", str(checkpoint), "--device", "cpu", "--batch", "2", "--iters", "1",
                                 "--gallery-size", "10", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["backend"] == "pytorch/cpu" and report["precision"] == "fp32"
