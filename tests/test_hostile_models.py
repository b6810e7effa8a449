"""Hostile model files: checkpoints and configs that would cost all memory, NaN weights, a wrong network."""
import dataclasses
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from han_edge.checkpoint import model_from_checkpoint, save_checkpoint
from han_edge.cli import app
from han_edge.config import HANConfig, get_config
from han_edge.errors import HanEdgeError
from han_edge.model import build_model


def _checkpoint(path, num_classes=5, config=None, edit=None, payload_config=None):
    torch.manual_seed(0)
    model = build_model(config or "small", num_classes=num_classes)
    if edit:
        edit(model)
    save_checkpoint(path, model, model.config)
    if payload_config is not None:   # a config that does not describe the weights
        data = torch.load(path, weights_only=True)
        data["config"] = {**data["config"], **payload_config}
        torch.save(data, path)
    return path


def test_inference_model_has_no_classifiers(tmp_path):
    model, _, data = model_from_checkpoint(_checkpoint(tmp_path / "ck.pt", num_classes=7))
    assert data["num_classes"] == 7 and "global_classifier.weight" in data["state_dict"]
    assert not any("classifier" in name for name, _ in model.named_parameters())   # never built for inference


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_checkpoint(tmp_path, value):
    def poison(model):
        with torch.no_grad():
            model.global_fc[0].weight[0, 0] = value
    path = _checkpoint(tmp_path / "nan.pt", edit=poison)
    with pytest.raises(HanEdgeError, match=r"nan\.pt has NaN or infinite weights in 1 tensors \(global_fc"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64])
def test_weights_stored_as_other_than_floating_point_are_refused(tmp_path, dtype):
    path = _checkpoint(tmp_path / "ck.pt")
    data = torch.load(path, weights_only=True)
    data["state_dict"]["stem.0.weight"] = data["state_dict"]["stem.0.weight"].to(dtype)   # was cast silently
    torch.save(data, path)
    with pytest.raises(HanEdgeError, match=rf"stores 1 weight tensor \(stem.0.weight\) as {dtype}, not floating point"):
        model_from_checkpoint(path)
    data["state_dict"]["stem.0.weight"] = data["state_dict"]["stem.0.weight"].to(torch.float16)
    torch.save(data, path)
    model_from_checkpoint(path)                                  # half precision is a floating point: loaded


def test_weights_that_overflow_are_refused_before_any_export_file(tmp_path, synthetic_root):
    def blow_up(model):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1e30)
    path = _checkpoint(tmp_path / "big.pt", edit=blow_up)
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(path), "--no-engine", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "NaN or infinite features for finite images" in result.output
    assert not any(out.iterdir())


def test_mismatched_weights_name_what_does_not_fit(tmp_path):
    path = _checkpoint(tmp_path / "ck.pt", payload_config={"regions": 2})
    with pytest.raises(HanEdgeError, match=r"does not fit HAN\(small\): (size mismatch|Missing key|Unexpected key)"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("change, match", [
    ({"crop_sizes": [[4096, 4096], [12, 14], [6, 7]]}, "crop_sizes"),
    ({"crop_sizes": [[200, 28], [12, 14], [6, 7]]}, r"crop_sizes .* exceed the input size \[160, 64\]"),
    ({"input_size": [4096, 4096]}, "input_size"),
])
def test_configs_that_only_cost_memory_are_refused(change, match):
    stored = {**dataclasses.asdict(get_config("small")), **change}
    with pytest.raises(HanEdgeError, match=match):
        HANConfig.from_dict(stored, "checkpoint c2.pt")


def test_crop_sizes_up_to_the_input_size_are_accepted():
    stored = {**dataclasses.asdict(get_config("small")), "crop_sizes": [[160, 64], [12, 14], [6, 7]]}
    assert HANConfig.from_dict(stored).crop_sizes[0] == (160, 64)


@pytest.mark.parametrize("value", ["Folded", "folded ", "", "none"])
def test_unknown_normalization_is_refused_by_every_reader(tmp_path, fresh_onnx, value):
    from han_edge.deepstream import write_configs
    from han_edge.onnx_io import load_onnx, save_onnx, set_metadata
    from han_edge.runtime import Embedder
    from han_edge.triton import write_repository

    model = load_onnx(fresh_onnx[1])
    set_metadata(model, {"han_edge.normalization": value})
    path = tmp_path / "odd.onnx"
    save_onnx(model, path)
    match = "odd.onnx: unknown han_edge.normalization"
    with pytest.raises(HanEdgeError, match=match):
        Embedder(path)
    with pytest.raises(HanEdgeError, match=match):
        write_repository(path, tmp_path / "repo")
    with pytest.raises(HanEdgeError, match=match):
        write_configs(path, tmp_path / "ds")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "ds").exists()   # refused before writing


def test_embedder_refuses_non_finite_features_naming_the_model(fresh_onnx):
    import numpy as np

    from han_edge.runtime import Embedder

    embedder = Embedder(fresh_onnx[1])
    huge = np.full((2, 3, *embedder.config.input_size), 1e30, np.float32)   # finite input, features overflow
    with pytest.raises(HanEdgeError, match=r"han_small.onnx gave NaN or infinite features for 2 crops"):
        embedder.embed_batch(huge)
    assert np.isfinite(embedder.embed_batch(np.zeros_like(huge))).all()


def test_bench_gallery_larger_than_memory_is_refused_before_allocating(fresh_onnx, monkeypatch):
    from han_edge import bench

    monkeypatch.setattr(bench, "available_memory", lambda: 1 << 30)   # 1 GiB: 10**6 entries need 3.8 GiB
    with pytest.raises(HanEdgeError, match=r"1000000-entry gallery of 1024-D features needs 3\.8 GiB .* 1\.0 GiB"):
        bench.run_bench(fresh_onnx[1], [1], 1, 10**6)
    assert bench.available_memory() is None or bench.available_memory() > 0   # the real reading


def test_float16_ids_give_no_cast_warning():
    import warnings

    import numpy as np

    from han_edge.gallery import Gallery

    gallery = Gallery(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gallery.add(np.array([1, 2], np.float16), np.eye(2, 4, dtype=np.float32))
    assert sorted(gallery.entries().ids.tolist()) == [1, 2]


def test_cosine_gallery_refuses_rows_without_a_direction():
    import numpy as np

    from han_edge.gallery import Gallery

    x = np.eye(4, 8, dtype=np.float32)
    cosine = Gallery(8, metric="cosine")
    cosine.add(np.arange(4), x * 1e-3)                      # small but well defined: exact answers
    ids, dists = cosine.search(x * 1e-3, k=1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and np.allclose(dists[:, 0], 0, atol=1e-5)
    for scale in (1e-7, 0.0):
        with pytest.raises(HanEdgeError, match=r"features: rows 0, 1, 2, 3 have a norm below 1e-05, where the cosine distance"):
            cosine.add(np.arange(4), x * scale)
        with pytest.raises(HanEdgeError, match=r"queries: rows 0, 1, 2, 3 have a norm below 1e-05"):
            cosine.search(x * scale, k=1)
    assert len(cosine) == 4
    l2 = Gallery(8)                                          # Euclidean distances are defined at any scale
    l2.add(np.arange(4), x * 0.0)
    assert np.allclose(l2.search(x * 0.0, k=1)[1], 0)


@pytest.mark.parametrize("variant, strides", [("large", [2, 1, 1]), ("small", [1, 1, 1])])
def test_a_variant_name_that_contradicts_its_strides_is_refused(tmp_path, variant, strides):
    path = _checkpoint(tmp_path / "ck.pt", payload_config={"variant": variant, "strides": strides})
    with pytest.raises(HanEdgeError, match=rf"says HAN\({variant}\), whose strides are .* but holds {re.escape(str(strides))}"):
        model_from_checkpoint(path)


def test_normalization_metadata_must_match_the_graph(tmp_path, fresh_onnx):
    from han_edge.fold import fold_file
    from han_edge.onnx_io import load_onnx, read_config, save_onnx, set_metadata
    from han_edge.runtime import Embedder

    folded = fold_file(fresh_onnx[1], tmp_path / "folded.onnx")
    for source, lie in ((fresh_onnx[1], "folded"), (folded, "external")):
        model = load_onnx(source)
        set_metadata(model, {"han_edge.normalization": lie})
        path = save_onnx(model, tmp_path / f"lies_{lie}.onnx")
        match = "says the input normalisation is (not )?folded into the graph, but the graph (lacks|has)"
        with pytest.raises(HanEdgeError, match=match):
            read_config(path)
        with pytest.raises(HanEdgeError, match=match):
            Embedder(path)
    assert read_config(folded)[0] == read_config(fresh_onnx[1])[0]   # honest files of both forms still load


def test_a_colour_order_other_than_rgb_is_refused(tmp_path, fresh_onnx):
    from han_edge.onnx_io import load_onnx, read_config, save_onnx, set_metadata
    from han_edge.runtime import Embedder

    model = load_onnx(fresh_onnx[1])
    set_metadata(model, {"han_edge.color_order": "BGR"})
    path = save_onnx(model, tmp_path / "bgr.onnx")
    for read in (read_config, Embedder):
        with pytest.raises(HanEdgeError, match=r"bgr.onnx: han_edge.color_order 'BGR' .* take RGB"):
            read(path)


def test_visualize_of_weights_that_overflow_is_one_sentence(tmp_path):
    import cv2

    from han_edge.visualize import attention_figure

    def blow_up(model):
        with torch.no_grad():
            model.stem[0].weight.mul_(1e37)              # finite weights, NaN attention (was a ValueError traceback)
    path = _checkpoint(tmp_path / "huge.pt", edit=blow_up)
    cv2.imwrite(str(tmp_path / "i.png"), np.full((160, 64, 3), 128, np.uint8))
    with pytest.raises(HanEdgeError, match="gives NaN or infinite attention"):
        attention_figure(path, tmp_path / "i.png", tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
