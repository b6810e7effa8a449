import importlib.util

import pytest

HAS_CUPY_GPU = False
if importlib.util.find_spec("cupy") is not None:
    try:
        import cupy

        HAS_CUPY_GPU = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver / no device
        HAS_CUPY_GPU = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (pip install 'han-edge[gpu]'); none here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUPY_GPU:
            item.add_marker(skip_gpu)
