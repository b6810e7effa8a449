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

    from han_edge.exporter import export_fp32
    from han_edge.model import build_model

    torch.manual_seed(0)
    model = build_model("small").eval()
    path = tmp_path_factory.mktemp("onnx") / "han_small.onnx"
    export_fp32(model, model.config, path)
    return model, path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The default synthetic set, generated once into a temporary folder for the whole session."""
    import os

    root = tmp_path_factory.mktemp("synthetic") / "set"
    os.environ["HAN_EDGE_SYNTHETIC"] = str(root)
    from han_edge.synthetic import ensure_synthetic

    ensure_synthetic(root)
    return root


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, synthetic_root):
    """HAN(Small) briefly trained (4 epochs, 320 images) on the synthetic set.

    Quantisation accuracy is only meaningful on a trained network: fresh weights map every
    image to nearly the same feature, where any quantisation looks perfect.
    """
    from han_edge.data import load_dataset
    from han_edge.train import TrainOptions, train

    data = load_dataset("synthetic", None)
    subset = [item for item in data.train if item[1] < 40]
    path = tmp_path_factory.mktemp("ck") / "han_small.pt"
    train(subset, 40, path, "small", TrainOptions(epochs=4))
    return path
