"""TensorRT engine build/load. The `tensorrt` tests run where TensorRT and a GPU exist (skipped here)."""
import json

import numpy as np
import pytest

from han_edge.errors import HanEdgeError, MissingDependencyError


def test_build_without_tensorrt_is_one_sentence(fresh_onnx, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from han_edge.engine import build_engine

    _, onnx_path = fresh_onnx
    with pytest.raises(MissingDependencyError) as info:
        build_engine(onnx_path, tmp_path / "x.plan")
    message = str(info.value)
    assert "needs TensorRT" in message and "pip install 'han-edge[gpu-cu12]'" in message and "\n" not in message
    assert not (tmp_path / "x.plan").exists()


def test_engine_metadata_errors(tmp_path):
    from han_edge.engine import read_engine_metadata

    with pytest.raises(HanEdgeError, match="not found"):
        read_engine_metadata(tmp_path / "missing.plan")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    with pytest.raises(HanEdgeError, match="no metadata file"):
        read_engine_metadata(plan)
    (tmp_path / "m.plan.json").write_text("{broken")
    with pytest.raises(HanEdgeError, match="corrupt"):
        read_engine_metadata(plan)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_build_load_and_match_onnx(fresh_onnx, tmp_path, precision):
    from han_edge.engine import BuildOptions, build_engine
    from han_edge.exporter import export_fp16
    from han_edge.runtime import Embedder

    _, onnx_path = fresh_onnx
    if precision == "fp16":
        onnx_path = export_fp16(onnx_path, tmp_path / "han_small.fp16.onnx")
    plan = build_engine(onnx_path, tmp_path / f"han_small.{precision}.plan",
                        BuildOptions(opt_batch=8, max_batch=16, timing_cache=tmp_path / "timing.cache"))
    side = json.loads((tmp_path / f"han_small.{precision}.plan.json").read_text())
    assert side["batch"] == {"min": 1, "opt": 8, "max": 16} and (tmp_path / "timing.cache").is_file()
    engine, reference = Embedder(plan), Embedder(onnx_path)
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    boxes = [[10, 20, 70, 220], [300, 100, 420, 400]] * 10          # 20 boxes: two engine batches
    got, want = engine.embed_frame(frame, boxes), reference.embed_frame(frame, boxes)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= (0.9999 if precision == "fp32" else 0.999)


@pytest.mark.tensorrt
def test_corrupt_engine_is_refused(fresh_onnx, tmp_path):
    from han_edge.engine import BuildOptions, build_engine
    from han_edge.runtime import Embedder

    _, onnx_path = fresh_onnx
    plan = build_engine(onnx_path, tmp_path / "han_small.plan", BuildOptions(opt_batch=1, max_batch=2))
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(HanEdgeError, match="cannot deserialize"):
        Embedder(plan)
