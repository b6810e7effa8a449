"""All CUDA use in one place: CuPy device arrays, streams, pinned host buffers and device info.

CuPy has wheels for x86-64 and Jetson (aarch64), gives cuBLAS GEMM and sorting for the gallery,
and raw pointers/streams for TensorRT, so no pycuda context code is needed.
"""
from __future__ import annotations

import numpy as np

from han_edge.errors import MissingDependencyError

INSTALL_HINT = ("install CuPy for your CUDA version (x86-64: pip install 'han-edge[gpu]' i.e. cupy-cuda12x; "
                "Jetson: pip install cupy-cuda12x from the Jetson wheel index) on a machine with an NVIDIA GPU")


def require_cupy():
    """The cupy module with a usable GPU, or one clear sentence saying what is missing."""
    try:
        import cupy
    except ImportError:
        raise MissingDependencyError(f"the GPU path needs CuPy, which is not installed: {INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken
        raise MissingDependencyError(f"CuPy is installed but no CUDA driver/GPU is usable ({err}); "
                                     "run on a machine with an NVIDIA GPU and driver") from None
    if count == 0:
        raise MissingDependencyError("CuPy is installed but no NVIDIA GPU is visible")
    return cupy


def gpu_available() -> bool:
    try:
        require_cupy()
        return True
    except MissingDependencyError:
        return False


def device_description() -> dict:
    """Name and compute capability of the current GPU (engines are specific to them)."""
    cp = require_cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"gpu": name, "compute_capability": f"{props['major']}.{props['minor']}"}


def array_module(device: str):
    """numpy for 'cpu', cupy for 'cuda'."""
    if device == "cpu":
        return np
    if device == "cuda":
        return require_cupy()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def to_host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


class PinnedBuffer:
    """Page-locked host memory viewed as a NumPy array, for fast asynchronous device->host copies."""

    def __init__(self, shape, dtype=np.float32):
        cp = require_cupy()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._memory = cp.cuda.alloc_pinned_memory(nbytes)
        self.array = np.frombuffer(self._memory, dtype, int(np.prod(shape))).reshape(shape)

    def copy_from_device(self, device_array, stream) -> np.ndarray:
        n = device_array.shape[0]
        device_array.get(stream=stream, out=self.array[:n])
        stream.synchronize()
        return self.array[:n].copy()
