"""Runtime: embed person crops with any backend — TensorRT (.plan/.engine), ONNX Runtime (.onnx), PyTorch (.pt).

One interface (boxmot style): the backend is chosen from the file suffix, input size, mean/std and
batch limits come from the model's own metadata, and pre-processing (``preprocess.crop_batch``) is
shared by all backends — NumPy on the CPU, CuPy on the GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.config import HANConfig, config_from_metadata
from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.preprocess import check_frame, clip_boxes, crop_batch

ENGINE_SUFFIXES = (".plan", ".engine")


class OnnxRuntimeBackend:
    """ONNX Runtime: CPU provider here, CUDA/TensorRT providers where onnxruntime-gpu offers them."""

    device = "cpu"

    def __init__(self, path: Path, threads: int = 0, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("running .onnx models needs ONNX Runtime: pip install 'han-edge[ort]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=wanted)
        except Exception as err:
            raise HanEdgeError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0][:200]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config, self.precision = config_from_metadata(meta, str(path))
        self.provider = self.session.get_providers()[0]
        self.name = f"onnxruntime/{self.provider.replace('ExecutionProvider', '')}"
        self.max_batch = 64

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["features"], {"images": batch})[0]


class TorchBackend:
    """A training checkpoint run by PyTorch (CPU, or CUDA when present)."""

    def __init__(self, path: Path, device: str | None = None):
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("running a .pt checkpoint needs PyTorch: pip install torch") from None
        from han_edge.checkpoint import model_from_checkpoint

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, self.config, _ = model_from_checkpoint(path)
        self.model = model.to(self.device)
        self.precision = "fp32"
        self.name = f"pytorch/{self.device}"
        self.max_batch = 64
        self._torch = torch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.model(self._torch.from_numpy(batch).to(self.device)).cpu().numpy()


class TensorRTBackend:
    """A TensorRT engine; input batches and features stay on the GPU."""

    device = "cuda"

    def __init__(self, path: Path):
        from han_edge.engine import TensorRTModel

        self.model = TensorRTModel(path)
        self.config, self.precision = self.model.config, self.model.precision
        self.max_batch = self.model.max_batch
        self.name = "tensorrt/cuda"

    def infer(self, batch):
        return self.model.infer_device(batch).copy()


def open_backend(path: str | Path, **kwargs):
    """The backend for a model file, chosen from its suffix."""
    path = Path(path)
    if not path.is_file():
        raise HanEdgeError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if suffix in ENGINE_SUFFIXES:
        return TensorRTBackend(path)
    if suffix == ".onnx":
        return OnnxRuntimeBackend(path, **kwargs)
    if suffix in (".pt", ".pth"):
        return TorchBackend(path, **kwargs)
    raise HanEdgeError(f"cannot tell the backend of {path.name}: use .plan/.engine (TensorRT), .onnx or .pt")


def padded_size(n: int, max_batch: int) -> int:
    """Pad a partial batch to the next power of two (capped at max_batch): few distinct shapes
    keep ONNX Runtime/TensorRT on already-tuned kernels."""
    size = 1
    while size < n:
        size *= 2
    return min(size, max_batch)


class Embedder:
    """Person crops -> (N, 1024) float32 features, per-branch L2-normalised (Section 3.4)."""

    def __init__(self, model_path: str | Path, max_batch: int | None = None, **backend_options):
        self.backend = open_backend(model_path, **backend_options)
        self.config: HANConfig = self.backend.config
        self.precision: str = self.backend.precision
        self.max_batch = min(max_batch or self.backend.max_batch, self.backend.max_batch)
        self.device = getattr(self.backend, "device", "cpu")
        self._pinned = None
        if self.device == "cuda" and isinstance(self.backend, TensorRTBackend):
            from han_edge.cuda import require_cupy
            self.xp = require_cupy()
        else:
            self.xp = np

    @property
    def name(self) -> str:
        return self.backend.name

    def preprocess_frame(self, frame, boxes):
        """Clipped boxes -> (N, 3, H, W) network input on the backend's device (frame uploaded once)."""
        check_frame(frame, np if isinstance(frame, np.ndarray) else self.xp)
        clipped = clip_boxes(boxes, frame.shape[:2])
        frame_dev = self.xp.asarray(frame)
        return crop_batch(self.xp, frame_dev, clipped, self.config.input_size, self.config.mean, self.config.std)

    def embed_batch(self, batch, on_device: bool = False):
        """Network input -> features; split to the max batch, the last chunk padded (rows dropped after)."""
        xp = self.xp
        n = batch.shape[0]
        if n == 0:
            return xp.zeros((0, self.config.feature_dim), xp.float32)
        expected = (3, *self.config.input_size)
        if tuple(batch.shape[1:]) != expected:
            raise HanEdgeError(f"model input must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                               f"got {tuple(batch.shape)}")
        parts = []
        for start in range(0, n, self.max_batch):
            chunk = batch[start:start + self.max_batch]
            size = padded_size(len(chunk), self.max_batch)
            if size > len(chunk):
                pad = xp.zeros((size - len(chunk), *chunk.shape[1:]), xp.float32)
                chunk = xp.concatenate([chunk, pad])
            parts.append(self.backend.infer(xp.ascontiguousarray(chunk, dtype=xp.float32))[:min(self.max_batch, n - start)])
        out = xp.concatenate(parts)
        if on_device or xp is np:
            return out
        return self._to_host(out)

    def _to_host(self, features):
        """Device -> host through a reused page-locked buffer (faster, and no allocation per batch)."""
        from han_edge.cuda import PinnedBuffer

        if self._pinned is None or self._pinned.array.shape[0] < features.shape[0]:
            self._pinned = PinnedBuffer((max(features.shape[0], self.max_batch), self.config.feature_dim))
        return self._pinned.copy_from_device(features, self.xp.cuda.get_current_stream())

    def embed_frame(self, frame, boxes, on_device: bool = False):
        """Features of the people in ``boxes`` (x1, y1, x2, y2 pixels) of a BGR uint8 frame.

        Boxes partly outside the frame are clipped to it; a box with no area inside it raises.
        An empty box list gives an empty (0, 1024) result.
        """
        if len(boxes) == 0:
            return self.xp.zeros((0, self.config.feature_dim), self.xp.float32) if on_device else \
                np.zeros((0, self.config.feature_dim), np.float32)
        return self.embed_batch(self.preprocess_frame(frame, boxes), on_device=on_device)

    def embed_crops(self, crops: list, on_device: bool = False):
        """Features of already-cut person crops (BGR uint8 arrays of any size)."""
        if len(crops) == 0:
            return np.zeros((0, self.config.feature_dim), np.float32)
        batches = [self.preprocess_frame(c, [[0, 0, c.shape[1], c.shape[0]]]) for c in crops]
        return self.embed_batch(self.xp.concatenate(batches), on_device=on_device)

    def embed_files(self, paths: list[str], chunk: int = 256, progress=None) -> np.ndarray:
        """Features of image files, read in chunks to bound memory."""
        from han_edge.preprocess import load_image

        out = []
        for start in range(0, len(paths), chunk):
            out.append(self.embed_crops([load_image(p) for p in paths[start:start + chunk]]))
            if progress:
                progress(len(out[-1]))
        return np.concatenate(out) if out else np.zeros((0, self.config.feature_dim), np.float32)
