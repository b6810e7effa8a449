import importlib.util

import pytest

HAS_CUPY_GPU = False
if importlib.util.find_spec("cupy") is not None:
    try:
        import cupy

        HAS_CUPY_GPU = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver / no device
        HAS_CUPY_GPU = False
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CuPy (pip install 'han-edge[gpu]'); none here")
    skip_trt = pytest.mark.skip(reason="needs TensorRT 10/11 and a GPU; TensorRT is not installed here")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUPY_GPU:
            item.add_marker(skip_gpu)
        elif "tensorrt" in item.keywords and not (HAS_CUPY_GPU and HAS_TENSORRT):
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def fresh_onnx(tmp_path_factory):
    """HAN(Small) with fresh weights exported to ONNX (FP32), shared by the runtime tests."""
    import torch

    from han_edge.export import export_fp32
    from han_edge.model import build_model

    torch.manual_seed(0)
    model = build_model("small").eval()
    path = tmp_path_factory.mktemp("onnx") / "han_small.onnx"
    export_fp32(model, model.config, path)
    return model, path
