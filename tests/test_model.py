import numpy as np
import pytest
import torch

from han_edge.config import HANConfig, VARIANTS, get_config
from han_edge.errors import HanEdgeError
from han_edge.model import MODELS, build_model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.mark.parametrize("batch", [1, 3])
def test_shapes_train_and_eval(variant, batch):
    torch.manual_seed(0)
    model = build_model(variant, num_classes=7)
    x = torch.randn(batch, 3, 160, 64)
    model.train()
    if batch == 1:
        model.eval()  # BatchNorm cannot train on one image; eval shape only
    else:
        out = model(x)
        assert out["global_logits"].shape == (batch, 7)
        assert out["local_logits"].shape == (batch, 7)
        assert out["global"].shape == out["local"].shape == (batch, 512)
    model.eval()
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (batch, 1024)
    assert torch.isfinite(feats).all()
    np.testing.assert_allclose(feats[:, :512].norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(feats[:, 512:].norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_attention_ranges():
    torch.manual_seed(1)
    model = build_model("small", num_classes=5)
    # A few SGD steps so the hard-attention FC (zero-initialised) moves off its start.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(6, 3, 160, 64) * 3, torch.arange(6) % 5
    model.train()
    for _ in range(3):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out["global_logits"], y) + \
            torch.nn.functional.cross_entropy(out["local_logits"], y)
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    with torch.no_grad():
        _, _, levels = model.features(x)
    for level in levels:
        assert level["soft"].min() >= 0.5 and level["soft"].max() <= 1.0
        assert level["theta"].abs().max() <= 1.0
        assert level["theta"].shape == (6, 4, 2)


def test_initial_regions_are_body_stripes():
    model = build_model("small").eval()
    with torch.no_grad():
        _, _, levels = model.features(torch.randn(2, 3, 160, 64))
    ty = levels[0]["theta"][0, :, 1].numpy()
    np.testing.assert_allclose(ty, [-0.75, -0.25, 0.25, 0.75], atol=1e-6)


def test_local_loss_reaches_global_branch():
    torch.manual_seed(0)
    model = build_model("small", num_classes=4).train()
    out = model(torch.randn(4, 3, 160, 64))
    torch.nn.functional.cross_entropy(out["local_logits"], torch.tensor([0, 1, 2, 3])).backward()
    # Global block 1 only feeds the local branch through the level-2 crop (cross-attention, Eq. 8)
    # and through hard attention: its weights must receive gradient from the local loss alone.
    grad = model.blocks[0][0][0][0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    grad_fc = model.global_fc[0].weight.grad
    assert grad_fc is None or grad_fc.abs().sum() == 0   # the global head is not on the local path


def test_wrong_input_size_is_named():
    model = build_model("medium").eval()
    with pytest.raises(HanEdgeError, match=r"\(N, 3, 160, 64\).*got \(2, 3, 128, 64\)"):
        model(torch.randn(2, 3, 128, 64))


def test_registry_and_config_round_trip():
    assert set(MODELS) == {"han_small", "han_medium", "han_large"}
    assert MODELS["han_large"]().config.strides == (1, 1, 2)
    cfg = get_config("medium")
    assert HANConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(HanEdgeError, match="unknown variant"):
        get_config("huge")


def test_onnx_export_matches_pytorch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model("small").eval()
    path = tmp_path / "han.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 160, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not any(n.op_type == "AffineGrid" for n in onnx.load(str(path)).graph.node)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 160, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_region_cropper_samples_the_map_once_and_matches_per_region_sampling():
    """One grid_sample over the T regions stacked along the grid's height == T copies of the map, each sampled."""
    from han_edge.model import RegionCropper

    torch.manual_seed(0)
    for size in ((24, 28), (12, 14), (6, 7)):
        cropper = RegionCropper(size, 4)
        x, theta = torch.randn(3, 16, 40, 16), torch.rand(3, 4, 2) * 2 - 1
        grid = cropper.base_grid * cropper.scale + theta.reshape(-1, 1, 1, 2)           # (N*T, h, w, 2)
        copies = x.unsqueeze(1).expand(3, 4, 16, 40, 16).reshape(-1, 16, 40, 16)         # the T-fold copy
        expected = torch.nn.functional.grid_sample(copies, grid, mode="bilinear", padding_mode="zeros",
                                                   align_corners=False)
        got = cropper(x, theta)
        assert got.shape == (12, 16, *size)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the sampling grids are not weights: checkpoints keep the same keys
    assert not [k for k in build_model("small").state_dict() if "croppers" in k]
