"""The backend interface: one way to run a HAN model on arrays of one library on one device.

Every backend (ONNX Runtime, PyTorch, TensorRT, a remote Triton server) states what it runs
(``config``, ``precision``, ``metadata``), where its inputs must live (``xp``, ``device``) and which
batch sizes it accepts (``batch_profile``); ``infer`` takes a (n, 3, H, W) float32 batch of ``xp``
on ``device`` and returns (n, feature_dim) float32 features there too. Pre-processing, batching,
padding and matching are the runtime's (``han_edge.runtime``), shared by every backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import array_api_compat.numpy as host_xp

from han_edge.config import HANConfig, normalization_of
from han_edge.errors import HanEdgeError


class Backend(ABC):
    name: str = "backend"                 # e.g. "onnxruntime/CPU", "pytorch/cuda", "tensorrt/cuda"
    config: HANConfig
    precision: str = "fp32"
    metadata: dict[str, str] = {}
    xp = host_xp                          # array namespace of infer()'s input and output (NumPy by default)
    device = "cpu"                        # the xp device infer() works on
    batch_profile: tuple[int, int, int] = (1, 32, 64)   # min / opt / max batch

    @property
    def kind(self) -> str:
        """'cpu' or 'cuda': where the work happens (for reports and the gallery's placement)."""
        return "cuda" if "cuda" in str(self.device).lower() or "gpu" in str(self.device).lower() else "cpu"

    @property
    def max_batch(self) -> int:
        return self.batch_profile[2]

    def padded_size(self, n: int) -> int:
        """The batch actually run for n crops (n <= max_batch): n itself, raised to the profile's minimum.

        Dynamic-shape engines run any size inside their profile with kernels tuned for it, so
        padding (e.g. to a power of two) would only add work.
        """
        return max(n, self.batch_profile[0])

    @property
    def normalization(self) -> str:
        """'external': the model takes (x/255 - mean)/std; 'folded': it takes RGB 0..255 and normalises inside."""
        return normalization_of(self.metadata, self.name)

    def check_output(self, features, n: int):
        """Features of n crops with the width the metadata promises, or one sentence why not."""
        shape = tuple(features.shape)
        if len(shape) != 2 or shape[1] != self.config.feature_dim or shape[0] < n:
            raise HanEdgeError(f"{self.name} returned features of shape {shape}; the model's metadata promises "
                               f"({n}, {self.config.feature_dim})")
        return features[:n]

    @abstractmethod
    def infer(self, batch):
        """(n, 3, H, W) float32 on ``device`` -> (n, feature_dim) float32 on ``device``."""

    def close(self) -> None:
        """Release device memory, sessions and connections (also done by garbage collection)."""
