import cv2
import numpy as np
import pytest

from han_edge import Embedder, Gallery
from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.evaluate import cosine_rows
from han_edge.preprocess import Normalizer, clip_boxes, crop_batch, crop_batch_host, normalize


def person_frame(seed=0, h=480, w=640):
    rng = np.random.default_rng(seed)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 3)
    boxes = np.array([[10, 20, 70, 220], [300, 100, 420, 400], [600, 300, 700, 520], [5, 5, 40, 60]], np.float32)
    return frame, boxes


def test_crop_batch_matches_opencv_resize():
    frame, boxes = person_frame()
    clipped = clip_boxes(boxes, frame.shape[:2])
    identity = Normalizer(np, "cpu", (0, 0, 0), (1 / 255, 1 / 255, 1 / 255))
    gathered = crop_batch(np, frame, clipped, (160, 64), identity)           # the device path's code, on NumPy
    host = crop_batch_host(frame, clipped, (160, 64), identity)
    for i, (x1, y1, x2, y2) in enumerate(clipped):
        ref = cv2.resize(frame[y1:y2, x1:x2], (64, 160), interpolation=cv2.INTER_LINEAR)[..., ::-1]
        # Stated tolerance: one grey level (OpenCV uses 11-bit fixed-point weights).
        assert np.abs(gathered[i] - ref.transpose(2, 0, 1)).max() <= 1.0
        np.testing.assert_array_equal(host[i], ref.transpose(2, 0, 1))       # the host path is OpenCV's


def test_embed_frame_equals_opencv_crops(fresh_onnx):
    _, path = fresh_onnx
    emb = Embedder(path)
    frame, boxes = person_frame(1)
    feats = emb.embed_frame(frame, boxes)
    assert feats.shape == (4, 1024) and feats.dtype == np.float32
    clipped = clip_boxes(boxes, frame.shape[:2])
    crops = [cv2.resize(frame[y1:y2, x1:x2], (64, 160), interpolation=cv2.INTER_LINEAR) for x1, y1, x2, y2 in clipped]
    ref = emb.embed_batch(normalize(np, np.stack(crops), Normalizer(np, "cpu", emb.config.mean, emb.config.std)))
    assert cosine_rows(feats, ref).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(feats[:, :512], axis=1), 1, atol=1e-4)


def test_batching_and_padding_change_nothing(fresh_onnx):
    _, path = fresh_onnx
    frame, boxes = person_frame(2)
    many = np.concatenate([boxes, boxes + 7, boxes + 13])[:11]
    whole = Embedder(path).embed_frame(frame, many)
    small = Embedder(path, max_batch=4).embed_frame(frame, many)       # chunks 4, 4, 3 (padded to 4)
    single = np.concatenate([Embedder(path).embed_frame(frame, many[i:i + 1]) for i in range(len(many))])
    np.testing.assert_allclose(small, whole, atol=1e-5)
    np.testing.assert_allclose(single, whole, atol=1e-5)


def test_runtime_matches_pytorch(fresh_onnx):
    import torch

    model, path = fresh_onnx
    emb = Embedder(path)
    crops = [person_frame(3)[0][:200, :90], person_frame(4)[0][:128, :64]]
    feats = emb.embed_crops(crops)
    from han_edge.preprocess import images_to_batch
    with torch.no_grad():
        ref = model(torch.from_numpy(images_to_batch(crops, (160, 64), emb.config.mean, emb.config.std))).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-5)
    assert emb.config.variant == "small" and emb.precision == "fp32"


def test_bad_frames_and_boxes(fresh_onnx):
    _, path = fresh_onnx
    emb = Embedder(path)
    frame, boxes = person_frame()
    assert emb.embed_frame(frame, []).shape == (0, 1024)                       # empty list: empty result
    clipped = emb.embed_frame(frame, [[-50, -50, 100, 200]])                    # partly outside: clipped
    inside = emb.embed_frame(frame, [[0, 0, 100, 200]])
    np.testing.assert_allclose(clipped, inside, atol=1e-6)
    with pytest.raises(HanEdgeError, match="box 1 .* no area inside the 640x480 frame"):
        emb.embed_frame(frame, [[0, 0, 10, 10], [700, 10, 800, 100]])          # fully outside
    with pytest.raises(HanEdgeError, match="box 0 .* no area"):
        emb.embed_frame(frame, [[10, 10, 10, 50]])                              # zero area
    with pytest.raises(HanEdgeError, match="uint8"):
        emb.embed_frame(frame.astype(np.float32), boxes)
    with pytest.raises(HanEdgeError, match="H x W x 3"):
        emb.embed_frame(frame[..., 0], boxes)
    with pytest.raises(HanEdgeError, match=r"box 0 has 3 values, not 4"):
        emb.embed_frame(frame, [[1, 2, 3]])
    with pytest.raises(HanEdgeError, match=r"model input must be \(N, 3, 160, 64\)"):
        emb.embed_batch(np.zeros((2, 3, 128, 64), np.float32))


def test_backend_from_suffix_and_clear_errors(tmp_path, fresh_onnx):
    with pytest.raises(HanEdgeError, match="not found"):
        Embedder(tmp_path / "missing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    with pytest.raises(HanEdgeError, match="cannot load"):
        Embedder(corrupt)
    odd = tmp_path / "model.tflite"
    odd.write_bytes(b"x")
    with pytest.raises(HanEdgeError, match="cannot tell the format"):
        Embedder(odd)
    plan = tmp_path / "han_small.plan"
    plan.write_bytes(b"not an engine")
    # Without TensorRT (or its metadata) a .plan is refused with one sentence, not a traceback.
    with pytest.raises(HanEdgeError):
        Embedder(plan)


def test_plan_without_tensorrt_says_what_is_missing(tmp_path, fresh_onnx):
    import json
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    plan = tmp_path / "han_small.plan"
    plan.write_bytes(b"engine bytes")
    (tmp_path / "han_small.plan.json").write_text(json.dumps({"metadata": {"han_edge.config": "{}"}}))
    with pytest.raises(MissingDependencyError, match="needs TensorRT, which is not installed"):
        Embedder(plan)


def test_python_api_example(fresh_onnx):
    """The README's embedded example, verbatim apart from the model path."""
    _, path = fresh_onnx
    frame, boxes = person_frame(5)
    emb = Embedder(str(path))
    feats = emb.embed_frame(frame, boxes)
    gal = Gallery(dim=1024)
    gal.add([1, 2, 3, 4], feats, [0, 0, 1, 1])
    ids, dists = gal.search(feats, k=2)
    assert (ids[:, 0] == [1, 2, 3, 4]).all() and np.allclose(dists[:, 0], 0, atol=1e-2)


def test_partial_batches_are_not_padded_to_powers_of_two(fresh_onnx):
    """33 crops with max batch 32 run as 32 + 1, not 32 + 32 (padding only up to a profile's minimum)."""
    _, path = fresh_onnx
    emb = Embedder(path, max_batch=32)
    seen = []
    infer = emb.backend.infer
    emb.backend.infer = lambda batch: (seen.append(batch.shape[0]), infer(batch))[1]
    frame, boxes = person_frame(7)
    emb.embed_frame(frame, np.concatenate([boxes] * 9)[:33])
    assert seen == [32, 1]
    emb.backend.batch_profile = (4, 16, 32)                  # an engine whose profile starts at 4
    seen.clear()
    assert emb.embed_frame(frame, boxes[:1]).shape == (1, 1024) and seen == [4]


def test_embed_frames_many_boxes_memory_is_one_chunk(fresh_onnx):
    """10,000 boxes run chunk by chunk: the pre-processed input never exceeds one batch."""
    _, path = fresh_onnx
    emb = Embedder(path, max_batch=64)
    sizes = []
    crop = emb._crop
    emb._crop = lambda frame, boxes: (sizes.append(len(boxes)), crop(frame, boxes))[1]
    emb.backend.infer = lambda batch: np.zeros((batch.shape[0], 1024), np.float32)   # the model is not the point
    frame = np.zeros((1080, 1920, 3), np.uint8)
    shift = np.stack([np.arange(10000) % 1800, np.arange(10000) % 1000] * 2, axis=1)
    boxes = np.tile([[0, 0, 32, 64]], (10000, 1)) + shift
    feats = emb.embed_frame(frame, boxes)
    assert feats.shape == (10000, 1024) and max(sizes) == 64 and sum(sizes) == 10000


@pytest.mark.gpu
def test_cuda_device_pipeline_equals_cpu(trained_checkpoint, tmp_path):
    """PyTorch on CUDA: frame -> crops -> features -> gallery all on the GPU, equal to the CPU path."""
    import torch

    from han_edge.checkpoint import model_from_checkpoint
    from han_edge.exporter import export_fp32

    model, config, _ = model_from_checkpoint(trained_checkpoint)
    cpu = Embedder(export_fp32(model, config, tmp_path / "m.onnx"))
    gpu = Embedder(trained_checkpoint, device="cuda")
    frame, boxes = person_frame(8, 1080, 1920)
    boxes = np.concatenate([boxes * 2] * 8)
    batch = gpu.preprocess_frame(frame, boxes)
    assert isinstance(batch, torch.Tensor) and batch.is_cuda                 # pre-processed on the device
    feats = gpu.embed_frame(frame, boxes, on_device=True)
    assert isinstance(feats, torch.Tensor) and feats.is_cuda                 # features stay there
    want = cpu.embed_frame(frame, boxes)
    assert cosine_rows(feats.cpu().numpy(), want).min() >= 0.999
    gallery, host = Gallery(1024, device=gpu.placement), Gallery(1024)
    cams = np.arange(len(boxes)) % 3
    gallery.add(np.arange(len(boxes)), feats, cams)
    host.add(np.arange(len(boxes)), feats.cpu().numpy(), cams)
    got = gallery.search(feats, k=5, query_cams=cams, exclude_same_camera=True)
    ref = host.search(feats.cpu().numpy(), k=5, query_cams=cams, exclude_same_camera=True)
    assert isinstance(got[0], np.ndarray)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-3)


@pytest.mark.gpu
def test_cupy_frames_and_boxes_from_a_gpu_detector(fresh_onnx):
    """Frames decoded on the GPU and boxes from a GPU detector go in without a host round trip of the frame."""
    cp = pytest.importorskip("cupy")
    import array_api_compat.cupy as cxp

    frame, boxes = person_frame(9)
    clipped = clip_boxes(cp.asarray(boxes), frame.shape[:2])
    norm = Normalizer(cxp, cp.cuda.Device(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    gpu = crop_batch(cxp, cp.asarray(frame), clipped, (160, 64), norm)
    cpu = crop_batch(np, frame, clipped, (160, 64), Normalizer(np, "cpu", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert isinstance(gpu, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(gpu), cpu, atol=1e-4)


def test_runtime_api_imports_without_torch(fresh_onnx):
    """A Jetson install has no PyTorch: the embedded API and an ONNX embedder must not import it."""
    import subprocess
    import sys

    _, path = fresh_onnx
    code = ("import sys, numpy as np; from han_edge import Embedder, Gallery; "
            f"e = Embedder({str(path)!r}); e.embed_crops([np.zeros((128, 64, 3), np.uint8)]); "
            "Gallery(1024); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
