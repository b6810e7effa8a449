"""Hostile input through the Python API: every bad value is a HanEdgeError with one sentence, nothing else.

Property-based (hypothesis) where the input space is large: arbitrary JSON, arrays of any dtype and
shape, arbitrary bytes as files. Covers the classes of issue 12 this layer owns: input schemas (boxes,
boxes files, ids, k, dims, finite values, crops), model files that lie (configs, ONNX graphs, engine side
files, checkpoints) and training that diverges.
"""
import json
import pickle
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from han_edge import boxes as box_schema
from han_edge import validate, validate_arrays
from han_edge.config import HANConfig, config_from_metadata, get_config, model_metadata
from han_edge.errors import HanEdgeError

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_sentence(message: str) -> bool:
    return ("\n" not in message.strip() and not re.search(r"[.!?]\s+[A-Z]", message)
            and "Traceback" not in message and len(message) < 400)


def refused(match, fn, *args, **kwargs) -> str:
    with pytest.raises(HanEdgeError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert one_sentence(message), message
    return message


# JSON-like values: what json.loads can give, plus Python/NumPy things a caller might pass
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=25)
hostile = json_values | st.tuples(json_values) | st.binary(max_size=8) | st.sets(st.integers(), max_size=3) | \
    hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))


# -- boxes ---------------------------------------------------------------------------------------------------
@FAST
@given(hostile)
def test_boxes_array_never_raises_anything_else(value):
    try:
        out = box_schema.boxes_array(value)
    except HanEdgeError as err:
        assert one_sentence(str(err)), str(err)
        return
    assert out.dtype == np.float64 and out.ndim == 2 and out.shape[1] == 4 and np.isfinite(out).all()


finite_floats = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


@FAST
@given(st.lists(st.lists(finite_floats | st.integers(-10**6, 10**6), min_size=4, max_size=4), max_size=20))
def test_valid_boxes_round_trip(boxes):
    out = box_schema.boxes_array(boxes)
    assert out.shape == (len(boxes), 4)
    np.testing.assert_array_equal(out, np.array(boxes, np.float64).reshape(-1, 4))


@pytest.mark.parametrize("boxes, match", [
    ([[0, 0, 10, 10], [0, 0, 10]], "box 1 has 3 values, not 4"),                   # ragged
    ([[0, 0, 10, 10], [0, 0, 10, 10, 5]], "box 1 has 5 values"),
    ([[0, 0, "10", 10]], "box 0 coordinate 2 is the string '10', not a number"),   # strings, even numeric
    ([[0, 0, None, 10]], "box 0 coordinate 2 is None"),
    ([[True, 0, 10, 10]], "box 0 coordinate 0 is the bool True"),
    ([[0, 0, 10, 10], [0, float("nan"), 5, 5]], "box 1 coordinate 1 is nan, not finite"),
    ([[0, 0, float("inf"), 10]], "box 0 coordinate 2 is inf, not finite"),
    ([[0, 0, 10**400, 10]], "box 0 coordinate 2 .* too large"),
    ([[0, 0, [10], 10]], "box 0 coordinate 2 is a list of 1, not a number"),
    ([0, 0, 10, 10], "box 0 is 0, not \\[x1, y1, x2, y2\\]"),                        # a flat box is not guessed
    ([{"x1": 0}], "box 0 is an object"),
    ({"a": [0, 0, 1, 1]}, "must be a list of .* got an object"),
    (5, "got 5"),
    ("0,0,10,10", "got the string"),
    (None, "got None"),
    (np.zeros((3, 5)), "shape \\(3, 5\\)"),
    (np.array([[0, 0, np.nan, 1.0]]), "box 0 has a NaN"),
    (np.array([["a", "b", "c", "d"]]), "must hold numbers"),
    (np.ones((2, 4), bool), "must hold numbers"),
])
def test_bad_boxes_name_the_box(boxes, match):
    refused(match, box_schema.boxes_array, boxes)


def test_empty_boxes_are_an_empty_result():
    for empty in ([], (), np.zeros((0, 4)), np.zeros(0)):
        assert box_schema.boxes_array(empty).shape == (0, 4)


# -- boxes files ---------------------------------------------------------------------------------------------
@FAST
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_boxes_file_of_any_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("b") / "boxes.json"
    path.write_bytes(raw)
    try:
        boxes = box_schema.boxes_file(path)
    except HanEdgeError as err:
        assert one_sentence(str(err)), str(err)
        return
    assert isinstance(boxes, dict)
    assert all(isinstance(k, str) and v.shape[1:] == (4,) for k, v in boxes.items())


@pytest.mark.parametrize("raw, match", [
    (b"\xff\xfe{}", "not UTF-8 text \\(byte 0 is 0xff\\)"),
    (b"[[0, 0, 1, 1]]", "must hold one object"),
    (b'"a string"', "must hold one object .* not the string"),
    (b"42", "must hold one object"),
    (b"{", "is not valid JSON: .* at line 1 column 2"),
    (b'{"a.jpg": [[0, 0, NaN, 1]]}', "NaN is not a JSON number"),
    (b'{"a.jpg": [[0, 0, 1, 1]], "a.jpg": []}', "key 'a.jpg' appears more than once"),
    (b'{"a.jpg": "0,0,1,1"}', "key 'a.jpg'.* got the string"),
    (b'{"a.jpg": [[0, 0, 1, "x"]]}', "key 'a.jpg': box 0 coordinate 3"),
    (b'{"a.jpg": 7}', "key 'a.jpg'.* got 7"),
    (b'{"a.jpg": {"box": [0, 0, 1, 1]}}', "got an object"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply|must hold one object"),
])
def test_bad_boxes_files(tmp_path, raw, match):
    path = tmp_path / "boxes.json"
    path.write_bytes(raw)
    refused(match, box_schema.boxes_file, path)


def test_boxes_file_paths_and_bom(tmp_path):
    refused("is a directory", box_schema.boxes_file, tmp_path)
    refused("not found", box_schema.boxes_file, tmp_path / "missing.json")
    path = tmp_path / "b.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a.jpg": [[0, 0, 1, 2]], "b.jpg": []}).encode())   # UTF-8 BOM
    boxes = box_schema.boxes_file(path)
    assert boxes["a.jpg"].tolist() == [[0, 0, 1, 2]] and boxes["b.jpg"].shape == (0, 4)


def test_boxes_for_images_and_frames_that_do_not_exist():
    boxes = {"a.jpg": np.zeros((1, 4)), "typo.jpg": np.zeros((1, 4))}
    box_schema.unmatched_keys({"a.jpg": 1}, ["a.jpg", "b.jpg"])
    refused("names 1 image not among the images in crops/: typo.jpg", box_schema.unmatched_keys, boxes,
            ["a.jpg", "b.jpg"], "boxes file", "the images in crops/")
    frames = box_schema.frame_keys({"0": 1, "007": 2, " 12 ": 3})
    assert frames == {0: 1, 7: 2, 12: 3}
    refused("key 'first' is not a frame index", box_schema.frame_keys, {"first": 1})
    refused("key '-1' is not a frame index", box_schema.frame_keys, {"-1": 1})
    refused("key '1111111111.* is not a frame index", box_schema.frame_keys, {"1" * 5000: 1})   # int(): ValueError
    refused("frame 7 is given twice", box_schema.frame_keys, {"7": 1, "07": 2})
    box_schema.missing_frames([0, 9], 10)
    refused("boxes for frames 10, 300 but the video has 10 frames", box_schema.missing_frames, [3, 10, 300], 10)


# -- ids, k, dims --------------------------------------------------------------------------------------------
@FAST
@given(hostile)
def test_ids_array_never_raises_anything_else(value):
    try:
        out = validate.ids_array(value)
    except HanEdgeError as err:
        assert one_sentence(str(err)), str(err)
        return
    assert out.dtype == np.int64 and out.ndim == 1


@FAST
@given(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-2**50, 2**50).map(float), max_size=10))
def test_integral_ids_are_kept_exactly(ids):
    out = validate.ids_array(ids, len(ids))
    assert out.tolist() == [int(i) for i in ids]


@pytest.mark.parametrize("ids, match", [
    ([1, 1.9], "id 1 is 1.9, not an integer \\(ids are never rounded\\)"),
    (np.array([0.0, 2.5]), "id 1 is 2.5"),
    (np.array([1.0, np.nan]), "id 1 is nan"),
    (["12", 3], "id 0 is the string '12'"),
    ([True, 2], "id 0 is the bool True"),
    ([2**63, 1], "id 0 is beyond the 64-bit integer range"),
    (np.array([2**64 - 1, 0], np.uint64), "id 0 is beyond the 64-bit integer range"),
    ([None, 1], "id 0 is None"),
    (5, "must be a list or 1-D array of integers; got 5"),
    ("12", "got the string"),
    (np.zeros((2, 1), np.int64), "must be 1-D"),
    ([1, 2, 3], "3 ids for 2 features"),
])
def test_bad_ids(ids, match):
    refused(match, validate.ids_array, ids, 2)


@pytest.mark.parametrize("k, match", [(0, "at least 1"), (-3, "at least 1"), (True, "got the bool True"),
                                      (2.0, "got 2.0"), ("5", "got the string"), (None, "got None"),
                                      (10**6, "at most 1000")])
def test_bad_k(k, match):
    refused(match, validate.positive_int, k, "k", 1000)


def test_good_scalars():
    assert validate.positive_int(np.int32(5), "k") == 5 and validate.feature_dim(1024) == 1024
    refused("feature dimension must be at least 1; got 0", validate.feature_dim, 0)
    refused("at most 65536", validate.feature_dim, 1 << 20)


# -- finite arrays, images -------------------------------------------------------------------------------------
@FAST
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 8)),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_finite_names_exactly_the_bad_rows(array):
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad) == 0:
        assert validate_arrays.finite(array, "features") is array
        return
    message = refused("NaN or infinite", validate_arrays.finite, array, "query features")
    named = [int(n) for n in re.findall(r"\d+", message.split(" in row")[1].split(" and ")[0])]
    assert named == bad[:5].tolist()


def test_finite_and_features():
    assert validate_arrays.finite(np.arange(4), "ids").dtype.kind == "i"
    refused("must hold numbers", validate_arrays.finite, np.array(["a"]), "x")
    refused("must be an array", validate_arrays.finite, [1.0, float("nan")], "x")
    refused(r"must have shape \(N, 8\); got \(8,\)", validate_arrays.features_array, np.zeros(8, np.float32), 8)
    refused(r"query: NaN or infinite values in row 1", validate_arrays.features_array,
            np.array([[0.0] * 4, [np.inf] * 4]), 4, "query")
    assert validate_arrays.features_array([[1, 2]], 2).shape == (1, 2)


@pytest.mark.parametrize("crop, match", [
    (None, "crop 1 is None \\(an image that failed to load\\?\\)"),
    (np.zeros((10, 10, 3), np.float32), "crop 1 must be uint8; got float32"),
    (np.zeros((10, 10), np.uint8), "crop 1 must be H x W x 3"),
    (np.zeros((0, 10, 3), np.uint8), "H, W >= 1"),
    ("img.jpg", "crop 1 must be a NumPy uint8"),
])
def test_bad_crops(crop, match):
    refused(match, validate_arrays.images, [np.zeros((4, 4, 3), np.uint8), crop])


# -- unsafe advice never passed on ---------------------------------------------------------------------------
def test_refused_pickles_never_advise_the_unsafe_thing(tmp_path):
    import torch

    from han_edge.checkpoint import load_checkpoint

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "han-edge-checkpoint", "x": Boom()}))
    message = refused("cannot be read as a han-edge checkpoint: it holds Python objects", load_checkpoint, evil)
    assert "weights_only" not in message and "trust" not in message
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"x": Boom()}, zipped)
    assert "weights_only" not in refused("Python objects", load_checkpoint, zipped)
    np.save(tmp_path / "o.npy", np.array([{}], object))
    try:
        np.load(tmp_path / "o.npy")
    except ValueError as err:
        assert "allow_pickle" in str(err)
        assert "allow_pickle" not in validate.reason(err) and "Python objects" in validate.reason(err)


@pytest.mark.parametrize("content, match", [
    (b"", "cannot be read as a han-edge checkpoint"),
    (b"PK\x03\x04truncated", "cannot be read as a han-edge checkpoint"),
    (None, "is a directory"),
])
def test_checkpoints_that_are_not(tmp_path, content, match):
    from han_edge.checkpoint import load_checkpoint

    path = tmp_path / "c.pt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    refused(match, load_checkpoint, path)


@pytest.mark.parametrize("payload, match", [
    ([1, 2], "not a han-edge checkpoint"),
    ({"format": "han-edge-checkpoint", "version": "1"}, "format version of the wrong type"),
    ({"format": "han-edge-checkpoint", "version": 1, "config": {}}, "holds no weights"),
    ({"format": "han-edge-checkpoint", "version": 1, "state_dict": {}, "config": "small"}, "holds no model config"),
    ({"format": "han-edge-checkpoint", "version": 1, "state_dict": {}, "config": {"input_size": [160, "64"]}},
     "field 'input_size' must be"),
])
def test_checkpoints_that_lie(tmp_path, payload, match):
    import torch

    from han_edge.checkpoint import load_checkpoint

    torch.save(payload, tmp_path / "c.pt")
    refused(match, load_checkpoint, tmp_path / "c.pt")


# -- configs and metadata that lie -----------------------------------------------------------------------------
@FAST
@given(json_values)
def test_config_from_any_json(value):
    try:
        config = HANConfig.from_json(json.dumps(value), "m.onnx")
    except HanEdgeError as err:
        assert one_sentence(str(err)) and str(err).startswith("m.onnx"), str(err)
        return
    assert isinstance(config, HANConfig)


@pytest.mark.parametrize("text, match", [
    ("not json", "not valid JSON"),
    ('{"mean": [NaN, 0, 0]}', "NaN is not a JSON number"),
    ("[]", "must be an object, not list"),
    ('{"input_size": [160]}', "'input_size' must be"),
    ('{"global_dim": true}', "'global_dim' must be a whole number"),
    ('{"global_dim": 512.5}', "'global_dim'"),
    ('{"std": [0, 1, 1]}', "'std' must be three positive"),
    ('{"variant": "huge"}', "'variant' must be"),
    ('{"colour": 1}', "unknown HAN config fields \\['colour'\\]"),
    (None, "must be JSON text, not NoneType"),
])
def test_bad_configs(text, match):
    refused(match, HANConfig.from_json, text, "m.onnx")


def test_metadata_that_lies():
    meta = model_metadata(get_config("small"), "fp32")
    assert config_from_metadata(meta, "m.onnx") == (get_config("small"), "fp32")
    refused("unknown precision 'fp64'", config_from_metadata, {**meta, "han_edge.precision": "fp64"}, "m.onnx")
    refused("carries no han-edge metadata", config_from_metadata, {}, "m.onnx")
    refused("must be an object", config_from_metadata, ["x"], "m.onnx")


def tiny_graph(in_name="images", out_name="features", in_shape=("N", 3, 160, 64), out_width=1024,
               dtype=None, meta=None, batch="N"):
    """A small ONNX graph (no PyTorch export) wearing han-edge metadata: another network that lies."""
    import onnx
    from onnx import TensorProto, helper

    dtype = TensorProto.FLOAT if dtype is None else dtype
    shape = [batch if i == 0 else d for i, d in enumerate(in_shape)]
    x = helper.make_tensor_value_info(in_name, dtype, shape)
    y = helper.make_tensor_value_info(out_name, dtype, [batch, out_width])
    w = helper.make_tensor("w", dtype, [in_shape[1], out_width], np.zeros(in_shape[1] * out_width).tolist())
    nodes = [helper.make_node("GlobalAveragePool", [in_name], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], [out_name])]
    model = helper.make_model(helper.make_graph(nodes, "other", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (meta if meta is not None else model_metadata(get_config("small"), "fp32")).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("kwargs, match", [
    ({}, None),
    ({"out_width": 128}, "output is Nx128 but its metadata says 1024-D features"),
    ({"in_shape": ("N", 3, 128, 64)}, "input is Nx3x128x64 but its metadata says HAN\\(small\\) takes Nx3x160x64"),
    ({"in_name": "input.1"}, "takes \\['input.1'\\] .* a han-edge model takes \\['images'\\]"),
    ({"out_name": "logits"}, "gives \\['logits'\\]"),
    ({"dtype": 10}, "input 'images' is float16, not float32"),
    ({"batch": 8}, "fixed batch of 8"),
    ({"meta": {}}, "carries no han-edge metadata"),
    ({"meta": {"han_edge.config": "{oops"}}, "not valid JSON"),
    ({"meta": {"han_edge.config": get_config("large").to_json(), "han_edge.precision": "int4"}}, "unknown precision"),
])
def test_onnx_graphs_that_disagree_with_their_metadata(kwargs, match):
    from han_edge.onnx_io import validate_han_model

    model = tiny_graph(**kwargs)
    if match is None:
        assert validate_han_model(model, source="m.onnx") == (get_config("small"), "fp32")
    else:
        refused(match, validate_han_model, model, None, "m.onnx")


# -- engine side files -------------------------------------------------------------------------------------------
GOOD_SIDE = {"metadata": model_metadata(get_config("small"), "int8"), "precision": "int8", "tensorrt": "10.3.0",
             "gpu": "Orin", "compute_capability": "8.7", "batch": {"min": 1, "opt": 32, "max": 64}}


@pytest.mark.parametrize("side, match", [
    (GOOD_SIDE, None),
    ({**GOOD_SIDE, "metadata": {}}, "carries no han-edge metadata"),
    ({**GOOD_SIDE, "metadata": {"han_edge.config": 3}}, "'metadata' must be an object of strings"),
    ({**GOOD_SIDE, "precision": "fp16"}, "'precision' says fp16 but the model metadata says int8"),
    ({**GOOD_SIDE, "tensorrt": 10}, "'tensorrt' must be a version"),
    ({**GOOD_SIDE, "gpu": ""}, "'gpu' must be a non-empty string"),
    ({**GOOD_SIDE, "batch": {"min": 1, "opt": 128, "max": 64}}, "1 <= min <= opt <= max <= 4096, not 1/128/64"),
    ({**GOOD_SIDE, "batch": {"min": 1, "opt": 1, "max": 10**30}}, "max <= 4096, not 1/1/1000000000000000000"),   # into configs
    ({**GOOD_SIDE, "batch": [1, 32, 64]}, "'batch' must be"),
    ({**GOOD_SIDE, "plan_bytes": 999}, "does not match its metadata file: 4 bytes"),
    ({**GOOD_SIDE, "plan_sha256": "0" * 64}, "checksum differs"),
    ([GOOD_SIDE], "holds a list, not an object"),
    ("{oops", "is corrupt"),
])
def test_engine_side_files(tmp_path, side, match):
    from han_edge.engine import read_engine_metadata

    plan = tmp_path / "m.plan"
    plan.write_bytes(b"junk")
    (tmp_path / "m.plan.json").write_text(side if isinstance(side, str) else json.dumps(side))
    if match is None:
        assert read_engine_metadata(plan)["batch"] == {"min": 1, "opt": 32, "max": 64}
    else:
        refused(match, read_engine_metadata, plan)


def test_engine_files_missing_or_empty(tmp_path):
    from han_edge.engine import read_engine_metadata

    refused("is a directory", read_engine_metadata, tmp_path)
    refused("not found", read_engine_metadata, tmp_path / "x.plan")
    (tmp_path / "x.plan").write_bytes(b"x")
    refused("has no metadata file x.plan.json", read_engine_metadata, tmp_path / "x.plan")
    (tmp_path / "x.plan.json").write_text(json.dumps(GOOD_SIDE))
    (tmp_path / "x.plan").write_bytes(b"")
    refused("is empty", read_engine_metadata, tmp_path / "x.plan")


# -- training ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_items(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        path = tmp_path / f"{i % 2 + 1:04d}_c1s1_{i:06d}_00.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (128, 64, 3), dtype=np.uint8))
        items.append((str(path), i % 2, 0))
    return items


@pytest.mark.parametrize("field, value", [("epochs", -1), ("batch_size", 0), ("lr", float("nan")),
                                          ("lr", float("inf")), ("lr", 0.0), ("lr", -1e-3), ("seed", -1),
                                          ("momentum", float("nan")), ("epochs", 2.5), ("batch_size", True),
                                          ("batch_size", 1), ("lr", 1e39), ("momentum", 2.0), ("weight_decay", 1e300)])
def test_training_options_refused_before_any_work(tmp_path, field, value):
    from han_edge.train import TrainOptions, train

    options = TrainOptions(**{field: value})
    refused(f"training option {field} must be", train, [], 2, tmp_path / "x.pt", options=options)
    assert not (tmp_path / "x.pt").exists()


def test_training_destination_checked_before_training(tmp_path):
    from han_edge.train import train

    (tmp_path / "out.pt").mkdir()
    refused("checkpoint .* is a directory", train, [], 2, tmp_path / "out.pt")    # not "only 0 training images"


def test_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(tmp_path, tiny_items, monkeypatch):
    import torch

    import han_edge.train as train_module
    from han_edge.checkpoint import save_checkpoint
    from han_edge.model import build_model
    from han_edge.train import TrainOptions, train

    out = tmp_path / "good.pt"
    model = build_model("small", 2)
    save_checkpoint(out, model, model.config, epoch=3)
    good = out.read_bytes()
    calls = {"n": 0}
    real_loss = train_module.branch_loss

    def loss_turning_nan(outputs, labels):
        calls["n"] += 1
        loss = real_loss(outputs, labels)
        return loss * float("nan") if calls["n"] == 4 else loss           # epoch 2, step 2 (2 steps per epoch)
    monkeypatch.setattr(train_module, "branch_loss", loss_turning_nan)
    message = refused("training diverged: the loss is nan at epoch 2, step 2", train, tiny_items, 2, out,
                      options=TrainOptions(epochs=3, batch_size=4))
    assert "is kept" in message and "lower --lr" in message
    # epoch 1 was finite and overwrote the file; epoch 2's NaN never reached it
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 1 and out.read_bytes() != good
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_boxes_keys_name_each_image_once(tmp_path):
    from han_edge.boxes import boxes_by_file

    files = [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "a.jpg"), str(tmp_path / "sub" / "b.jpg")]
    box = np.array([[0, 0, 10, 10]], np.float64)
    got = boxes_by_file({"a.jpg": box}, files, tmp_path)   # the top-level image's own path, not an ambiguous name
    assert list(got) == [files[0]]
    got = boxes_by_file({"b.jpg": box, "sub/a.jpg": 2 * box}, files, tmp_path)
    assert set(got) == {files[1], files[2]}
    refused("keys image 'sub/b.jpg' twice", boxes_by_file, {"sub/b.jpg": box, "b.jpg": box}, files, tmp_path)   # was: one dropped
    refused("key 'a.jpg' matches 2 images", boxes_by_file, {"a.jpg": box}, files[1:2] + [str(tmp_path / "c" / "a.jpg")],
            tmp_path)
