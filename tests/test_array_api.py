"""The device pipeline on a device that is not the host, without a GPU.

``array-api-strict`` arrays on ``Device("device1")`` refuse to mix with host arrays and refuse
``np.asarray`` exactly as CuPy does, so the whole frame -> crops -> backend -> gallery path runs here
on such arrays: any silent host/device mix (an ``np.asarray`` on a device array, a host constant in a
device expression) fails these tests in CI. The PyTorch backend runs the same code on torch tensors.
"""
import array_api_strict as xps
import numpy as np
import pytest

from han_edge import Embedder, Gallery
from han_edge.arrays import to_numpy
from han_edge.backends.base import Backend
from han_edge.config import IMAGENET_MEAN, IMAGENET_STD
from han_edge.errors import HanEdgeError
from han_edge.preprocess import Normalizer, clip_boxes, crop_batch, crop_batch_host

DEVICE = xps.Device("device1")
StrictArray = type(xps.asarray(0))


class StrictDeviceBackend(Backend):
    """ONNX Runtime behind an array-api-strict 'device': inputs and outputs are device arrays.

    The only host <-> device moves are the two explicit ``to_device`` calls, like a real device
    backend's own memcpy; everything around it is the runtime's code under test.
    """

    def __init__(self, onnx_path):
        from han_edge.backends.onnxruntime import OnnxRuntimeBackend

        self.inner = OnnxRuntimeBackend(onnx_path)
        self.config, self.precision, self.metadata = self.inner.config, self.inner.precision, self.inner.metadata
        self.xp, self.device, self.name = xps, DEVICE, "strict/device1"
        self.batch_profile = (1, 4, 8)
        self.calls = []

    def infer(self, batch):
        assert isinstance(batch, StrictArray) and batch.device == DEVICE, "the runtime handed over a host array"
        self.calls.append(batch.shape[0])
        host = np.asarray(batch.to_device(xps.Device("CPU_DEVICE")))
        out = self.inner.infer(np.ascontiguousarray(host))
        return xps.asarray(out).to_device(DEVICE)


def person_frame(seed=0, h=480, w=640):
    import cv2

    rng = np.random.default_rng(seed)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 3)
    boxes = np.array([[10, 20, 70, 220], [300, 100, 420, 400], [600, 300, 700, 520], [5, 5, 40, 60],
                      [100, 50, 160, 300]], np.float32)
    return frame, boxes


def test_device_crops_equal_host_crops_within_one_grey_level():
    frame, boxes = person_frame()
    clipped = clip_boxes(boxes, frame.shape[:2])
    host = crop_batch_host(frame, clipped, (160, 64), Normalizer(np, "cpu", IMAGENET_MEAN, IMAGENET_STD))
    norm = Normalizer(xps, DEVICE, IMAGENET_MEAN, IMAGENET_STD)
    device = crop_batch(xps, xps.asarray(frame, device=DEVICE), clipped, (160, 64), norm)
    assert isinstance(device, StrictArray) and device.device == DEVICE
    grey_level = 1 / (255 * min(IMAGENET_STD))
    assert np.abs(to_numpy(device) - host).max() <= grey_level


def test_device_pipeline_end_to_end_on_a_non_host_device(fresh_onnx):
    _, onnx_path = fresh_onnx
    backend = StrictDeviceBackend(onnx_path)
    device_embedder, host_embedder = Embedder(backend), Embedder(onnx_path)
    frame, boxes = person_frame(1)
    frames, box_lists = [frame, frame[:240, :320], frame], [boxes, boxes[[3]], boxes[:2]]
    feats, frame_index = device_embedder.embed_frames(frames, box_lists, on_device=True)
    assert isinstance(feats, StrictArray) and feats.device == DEVICE and feats.shape == (8, 1024)
    assert frame_index.tolist() == [0, 0, 0, 0, 0, 1, 2, 2]
    assert backend.calls == [8]                      # crops of three frames shared one batch
    want = np.concatenate([host_embedder.embed_frame(f, b) for f, b in zip(frames, box_lists)])
    np.testing.assert_allclose(to_numpy(feats), want, atol=2e-3)

    gallery = Gallery(1024, device=device_embedder.placement)
    gallery.add(np.arange(8), feats, cams=frame_index)            # device features straight in
    ids, dists = gallery.search(feats, k=3, query_cams=frame_index, exclude_same_camera=True)
    assert isinstance(ids, np.ndarray) and isinstance(dists, np.ndarray)   # only (Q, k) results come back
    host_gallery = Gallery(1024)
    host_gallery.add(np.arange(8), want, cams=frame_index)
    want_ids, want_d = host_gallery.search(want, k=3, query_cams=frame_index, exclude_same_camera=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dists, want_d, atol=1e-3)


def test_device_crops_and_host_results(fresh_onnx):
    _, onnx_path = fresh_onnx
    frame, _ = person_frame(2)
    crops = [frame[:200, :90], frame[50:178, 10:74], frame[:30, :20]]
    device_embedder = Embedder(StrictDeviceBackend(onnx_path))
    got = device_embedder.embed_crops(crops)                       # default: features on the host
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, Embedder(onnx_path).embed_crops(crops), atol=1e-4)
    empty = device_embedder.embed_frame(frame, [])
    assert isinstance(empty, np.ndarray) and empty.shape == (0, 1024)
    assert device_embedder.embed_frame(frame, [], on_device=True).device == DEVICE


def test_host_arrays_are_not_mixed_into_device_work(fresh_onnx):
    """A device pipeline refuses a device array of another library instead of converting it silently."""
    import torch

    _, onnx_path = fresh_onnx
    embedder = Embedder(StrictDeviceBackend(onnx_path))
    frame, boxes = person_frame(3)
    with pytest.raises(HanEdgeError, match="convert it explicitly"):
        embedder.embed_frame(torch.from_numpy(frame), boxes)
    gallery = Gallery(4, device=(xps, DEVICE))
    gallery.add([1, 2], np.eye(2, 4, dtype=np.float32))            # host input: one explicit upload
    with pytest.raises(HanEdgeError, match="on device"):
        gallery.search(xps.asarray(np.eye(1, 4, dtype=np.float32)), k=1)   # strict array on the host device


@pytest.mark.slow
def test_pytorch_backend_runs_the_device_pipeline_on_cpu_tensors(trained_checkpoint, tmp_path):
    """The code a CUDA machine runs with the PyTorch backend, executed here on CPU tensors."""
    import torch

    from han_edge.exporter import export_fp32
    from han_edge.checkpoint import model_from_checkpoint

    model, config, _ = model_from_checkpoint(trained_checkpoint)
    onnx_path = export_fp32(model, config, tmp_path / "trained.onnx")
    torch_embedder, onnx_embedder = Embedder(trained_checkpoint), Embedder(onnx_path)
    assert torch_embedder.name == "pytorch/cpu" and not torch_embedder.on_host
    frame, boxes = person_frame(4)
    feats = torch_embedder.embed_frame(frame, boxes, on_device=True)
    assert isinstance(feats, torch.Tensor)
    got = feats.numpy()
    # Same network input: the backends agree (centred cosine: a trained model, differences are visible).
    same_input = onnx_embedder.embed_batch(torch_embedder.preprocess_frame(frame, boxes).numpy())
    mu = same_input.mean(0, keepdims=True)
    centred = ((got - mu) * (same_input - mu)).sum(1) / np.linalg.norm(got - mu, axis=1) / np.linalg.norm(same_input - mu, axis=1)
    assert centred.min() >= 0.999
    # Whole pipeline against the host path (OpenCV pre-processing, within one grey level of the gather).
    host = onnx_embedder.embed_frame(frame, boxes)
    cosine = (got * host).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(host, axis=1)
    assert cosine.min() >= 0.999
    gallery = Gallery(1024, device=torch_embedder.placement)
    gallery.add(np.arange(len(boxes)), feats)
    ids, _ = gallery.search(feats, k=1)
    assert ids[:, 0].tolist() == list(range(len(boxes)))
