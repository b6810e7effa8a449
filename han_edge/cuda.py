"""Everything CUDA-specific in one module: which library holds device arrays, raw pointers, streams, device info.

The device pipeline needs device arrays that speak the array API and expose raw pointers for
TensorRT / ONNX Runtime I/O binding. CuPy (x86-64 and Jetson wheels) is used when installed; where
only PyTorch with CUDA is present, torch tensors serve the same role through ``array-api-compat`` —
so CuPy is never required on a machine that has PyTorch. Both share memory through DLPack.
"""
from __future__ import annotations

import contextlib

from han_edge.errors import MissingDependencyError

INSTALL_HINT = ("on a machine with an NVIDIA GPU install PyTorch with CUDA, or CuPy for the CUDA major of your "
                "driver (pip install 'han-edge[gpu-cu12]' or 'han-edge[gpu-cu13]'; Jetson: JetPack's CUDA with "
                "the cupy-cuda12x Jetson wheel)")


def _cupy_gpu():
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:   # CUDA driver missing or broken
        return None


def _torch_gpu():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def require_cupy():
    """The cupy module with a usable GPU, or one clear sentence saying what is missing."""
    cupy = _cupy_gpu()
    if cupy is None:
        raise MissingDependencyError(f"this needs CuPy with a usable NVIDIA GPU, and none is available here: "
                                     f"{INSTALL_HINT}")
    return cupy


def gpu_available() -> bool:
    """True where the device pipeline can run: a GPU visible to CuPy or to PyTorch."""
    return _cupy_gpu() is not None or _torch_gpu() is not None


def device_arrays(prefer: str = "cupy"):
    """(xp, device) of the library that holds device arrays here: CuPy, else PyTorch CUDA tensors."""
    order = ("cupy", "torch") if prefer == "cupy" else ("torch", "cupy")
    for name in order:
        if name == "cupy" and (cupy := _cupy_gpu()) is not None:
            import array_api_compat.cupy as xp
            return xp, cupy.cuda.Device()
        if name == "torch" and (torch := _torch_gpu()) is not None:
            import array_api_compat.torch as xp
            return xp, torch.device("cuda", torch.cuda.current_device())
    raise MissingDependencyError(f"the GPU path needs an NVIDIA GPU visible to CuPy or PyTorch, and none is: "
                                 f"{INSTALL_HINT}")


def device_description() -> dict:
    """Name and compute capability of the current GPU (engines and timing caches are specific to them)."""
    cupy = _cupy_gpu()
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return {"gpu": name, "compute_capability": f"{props['major']}.{props['minor']}"}
    torch = _torch_gpu()
    if torch is not None:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}
    raise MissingDependencyError(f"no NVIDIA GPU is usable here: {INSTALL_HINT}")


def data_ptr(array) -> int:
    """Raw device pointer of a contiguous CuPy array or torch tensor."""
    if hasattr(array, "data_ptr"):
        return int(array.data_ptr())
    return int(array.data.ptr)


def contiguous(xp, array, dtype=None):
    """A C-contiguous device array (of ``dtype``), copying only when needed."""
    if hasattr(array, "contiguous"):                         # torch
        return (array if dtype is None else array.to(dtype)).contiguous()
    import cupy

    return cupy.ascontiguousarray(array, dtype=dtype)


def new_stream(xp):
    """A private non-blocking stream of the library that holds the buffers.

    TensorRT warns that the default stream (handle 0, what CuPy and PyTorch use unless told
    otherwise) costs extra ``cudaDeviceSynchronize`` calls, so engines run on a stream of their own.
    """
    from array_api_compat import is_cupy_namespace

    if is_cupy_namespace(xp):
        import cupy

        return cupy.cuda.Stream(non_blocking=True)
    import torch

    return torch.cuda.Stream()


@contextlib.contextmanager
def ordered_on(xp, stream):
    """Run work on ``stream`` in order with the caller's current stream: it waits for the caller's work
    so far, and the caller's later work waits for it. Yields the raw handle for TensorRT/ONNX Runtime."""
    from array_api_compat import is_cupy_namespace

    if is_cupy_namespace(xp):
        import cupy

        caller = cupy.cuda.get_current_stream()
        stream.wait_event(caller.record())
        yield int(stream.ptr)
        caller.wait_event(stream.record())
        return
    import torch

    caller = torch.cuda.current_stream()
    stream.wait_stream(caller)
    yield int(stream.cuda_stream)
    caller.wait_stream(stream)


def synchronize(xp) -> None:
    """Wait for the device work issued so far (for timing, and before handing buffers to another library)."""
    from array_api_compat import is_cupy_namespace

    if is_cupy_namespace(xp):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
        return
    import torch

    torch.cuda.current_stream().synchronize()


def empty(xp, shape, dtype, device):
    """An uninitialised device buffer (the backends' output buffers).

    array-api-compat's CuPy creation functions accept ``device=`` but ignore it (they allocate on
    the current device: ``array_api_compat.common._helpers._check_device``), so for CuPy the buffer
    is made under the device's context instead.
    """
    from array_api_compat import is_cupy_namespace

    if is_cupy_namespace(xp) and device is not None:
        import cupy

        with cupy.cuda.Device(device):
            return xp.empty(shape, dtype=dtype)
    return xp.empty(shape, dtype=dtype, device=device)


def zeros(xp, shape, dtype, device):
    """A zeroed array on ``device`` for any array library (CuPy: under the device's context, as ``empty``)."""
    from array_api_compat import is_cupy_namespace

    if is_cupy_namespace(xp) and device is not None:
        import cupy

        with cupy.cuda.Device(device):
            return xp.zeros(shape, dtype=dtype)
    return xp.zeros(shape, dtype=dtype, device=device)


def device_index(device) -> int:
    """The CUDA ordinal of a CuPy ``Device`` (``.id``) or a torch ``device`` (``.index``; None means the current one)."""
    index = getattr(device, "id", None)
    if index is None:
        index = getattr(device, "index", None)
    if index is None:
        import torch

        index = torch.cuda.current_device()
    return int(index)
