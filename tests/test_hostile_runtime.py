"""Hostile input through the runtime and gallery API (issue 12): ``Embedder`` and ``Gallery``.

Every bad value is a ``HanEdgeError`` with one sentence (never a raw exception, never a silent garbage
result); a refused call leaves what the gallery holds untouched; a search's memory does not grow with
the number of queries (``ExactIndex`` chunks them); one writer and four readers share a gallery safely.
Property-based (hypothesis) for arrays and values of any dtype/shape; the model is the session's fresh
HAN(Small) ONNX (no training).
"""
import io
import json
import threading
import time
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from han_edge import Embedder, Gallery
from han_edge.errors import HanEdgeError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FRAME = np.random.default_rng(0).integers(0, 256, (120, 80, 3), dtype=np.uint8)
BOXES = [[0, 0, 40, 100], [10, 10, 70, 110]]
D = 1024


from tests.test_hostile_inputs import one_sentence, refused  # noqa: E402,F401  (one wording check)


def clean_or_refused(fn, *args, **kwargs):
    """The call's result, or None when it was refused with one sentence; any other exception fails."""
    try:
        return fn(*args, **kwargs)
    except HanEdgeError as err:
        assert one_sentence(str(err)), str(err)
        return None


@pytest.fixture(scope="module")
def emb(fresh_onnx):
    return Embedder(fresh_onnx[1], max_batch=4)


# -- Embedder: constructor ---------------------------------------------------------------------------------------
def test_model_paths_that_are_not_models(tmp_path, fresh_onnx):
    (tmp_path / "dir.onnx").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused("is a directory", Embedder, tmp_path / "dir.onnx")
    refused("is a directory", Embedder, tmp_path)
    refused("not found", Embedder, tmp_path / "missing.onnx")
    refused("cannot tell the format", Embedder, tmp_path / "notes.txt")
    refused("a model must be named by a str or Path .* got None", Embedder, None)
    refused("named by a str or Path .* got b'", Embedder, bytes(fresh_onnx[1]))       # was "format of ...onnx'"
    refused("cannot load", Embedder, tmp_path / "garbage.onnx")
    refused("cannot load", Embedder, tmp_path / "empty.onnx")


def _with_metadata(src, dst, **changes):
    import onnx

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == "han_edge.config":
            config = json.loads(prop.value)
            config.update(changes)
            prop.value = json.dumps(config)
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes, match", [
    ({"input_size": [128, 64]}, "metadata describes HAN\\(small\\) with input \\(N, 3, 128, 64\\)"),
    ({"global_dim": 256}, "768-D features"),
])
def test_model_whose_metadata_lies(tmp_path, fresh_onnx, changes, match):
    refused(match, Embedder, _with_metadata(fresh_onnx[1], tmp_path / "lying.onnx", **changes))


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch": 0}, "max_batch must be at least 1; got 0"),
    ({"max_batch": -1}, "at least 1"),
    ({"max_batch": 1.5}, "whole number"),
    ({"max_batch": "8"}, "got the string '8'"),
    ({"max_batch": True}, "got the bool True"),
    ({"foo": 1}, "take no option\\(s\\) \\['foo'\\]"),
    ({"threads": -1}, "threads must be a whole number >= 0"),
    ({"threads": "x"}, "threads must be a whole number >= 0"),
    ({"threads": 2.0}, "threads must be a whole number >= 0"),
    ({"providers": ["Bogus"]}, "provider\\(s\\) Bogus are not available here"),
    ({"providers": "CPUExecutionProvider"}, "providers must be a non-empty list"),   # would be read letter by letter
    ({"providers": []}, "providers must be a non-empty list"),
    ({"timeout_s": 1}, "onnx models take no option"),
])
def test_bad_embedder_options(fresh_onnx, kwargs, match):
    refused(match, Embedder, fresh_onnx[1], **kwargs)


def test_good_embedder_options(fresh_onnx):
    assert Embedder(fresh_onnx[1], max_batch=np.int64(3)).max_batch == 3        # NumPy integers are integers
    assert Embedder(fresh_onnx[1], max_batch=10**9).max_batch == 64             # capped at the backend's maximum
    assert Embedder(fresh_onnx[1], threads=1, providers=("CPUExecutionProvider",)).name == "onnxruntime/CPU"


# -- Embedder: frames and boxes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, boxes, match", [
    ([FRAME, FRAME], [BOXES], "2 frames but 1 box lists"),
    (FRAME, BOXES, "frames must be a list .*for one frame use embed_frame"),      # was "120 frames but 2 box lists"
    (None, None, "frames must be a list .* got None"),
    ((f for f in [FRAME]), [BOXES], "frames must be a list"),
    ({0: FRAME}, {0: BOXES}, "frames must be a list .* got an object"),
    ([FRAME], None, "boxes_per_frame must be a list"),
    ([FRAME], "0,0,1,1", "boxes_per_frame must be a list"),
    ([FRAME, None], [BOXES, BOXES], "frame 1 is None"),
    ([FRAME, FRAME.astype(np.float32)], [BOXES, BOXES], "frame 1 must be uint8; got float32"),
    ([FRAME[..., 0]], [BOXES], "frame 0 must be H x W x 3"),
    ([np.dstack([FRAME, FRAME[..., :1]])], [BOXES], "frame 0 must be H x W x 3 .* \\(120, 80, 4\\)"),
    ([np.zeros((0, 0, 3), np.uint8)], [[]], "H, W >= 1"),
    ([FRAME.tolist()], [BOXES], "frame 0 must be a NumPy uint8 H x W x 3 image; got a list of 120"),
    ([FRAME, FRAME], [BOXES, [[0, 0, 10]]], "boxes of frame 1: box 0 has 3 values, not 4"),
])
def test_bad_frames(emb, frames, boxes, match):
    refused(match, emb.embed_frames, frames, boxes)


@pytest.mark.parametrize("boxes, match", [
    ({"a": [0, 0, 1, 1]}, "boxes must be a list of \\[x1, y1, x2, y2\\] boxes; got an object"),
    ("0,0,10,10", "got the string '0,0,10,10'"),
    (None, "got None"),
    ([0, 0, 10, 10], "box 0 is 0, not \\[x1, y1, x2, y2\\]"),                     # flat: refused, not guessed
    ([[0, 0, float("nan"), 10]], "box 0 coordinate 2 is nan, not finite"),
    ([[0, 0, 10, 10], [1, 2, 3]], "box 1 has 3 values, not 4"),
    ([[0, 0, 10, "10"]], "coordinate 3 is the string '10'"),
    ([[0, 0, 10, True]], "coordinate 3 is the bool True"),
    ([[0, 0, 10, np.timedelta64(9)]], "coordinate 3 is np.timedelta64\\(9\\), not a number"),
    (np.ones((1, 4), bool), "must hold numbers; got an array of bool"),
    (np.ones((1, 4), complex), "must hold numbers"),
    (np.ones((2, 5)), "must be an \\(N, 4\\) array"),
    ([[40, 40, 10, 10]], "box 0 .* has no area inside the 80x120 frame"),           # inverted
    ([[10, 10, 10, 30]], "box 0 .* has no area"),                                    # zero width
    ([[0, 0, 10, 10], [500, 500, 600, 600]], "box 1 .* has no area"),               # all outside
    ([[-50, -50, -10, -10]], "no area"),
])
def test_bad_boxes(emb, boxes, match):
    refused(match, emb.embed_frame, FRAME, boxes)
    refused(match, emb.preprocess_frame, FRAME, boxes)


def test_boxes_partly_outside_are_clipped(emb):
    inside = emb.embed_frame(FRAME, [[0, 0, 80, 120]])
    for box in ([-50, -50, 80, 120], [0, 0, 1e300, 1e300], [0, 0, 10**30, 10**30]):
        np.testing.assert_allclose(emb.embed_frame(FRAME, [box]), inside, atol=1e-5)
    huge = np.array([[0, 0, 2**64 - 1, 2**64 - 1]], np.uint64)
    np.testing.assert_allclose(emb.embed_frame(FRAME, huge), inside, atol=1e-5)
    assert emb.embed_frame(FRAME, [[10.2, 10.2, 10.7, 10.7]]).shape == (1, D)      # sub-pixel: one pixel


def test_empty_box_lists_give_empty_results(emb):
    for empty in ([], (), np.zeros((0, 4)), np.zeros(0)):
        out = emb.embed_frame(FRAME, empty)
        assert out.shape == (0, D) and out.dtype == np.float32
    feats, index = emb.embed_frames([FRAME, FRAME[:50, :60]], [[], [[0, 0, 20, 20]]])
    assert feats.shape == (1, D) and index.tolist() == [1]                           # frames of different sizes


def test_boxes_and_frames_from_torch(emb):
    torch = pytest.importorskip("torch")
    want = emb.embed_frame(FRAME, BOXES)
    np.testing.assert_allclose(emb.embed_frame(FRAME, torch.tensor(BOXES, dtype=torch.float32)), want, atol=1e-5)
    np.testing.assert_allclose(emb.embed_frame(FRAME, torch.tensor(BOXES)), want, atol=1e-5)
    np.testing.assert_allclose(emb.embed_frame(torch.from_numpy(FRAME), BOXES), want, atol=1e-5)
    refused("box 0 has a NaN or infinite coordinate", emb.embed_frame, FRAME, torch.tensor([[0.0, 0, float("nan"), 9]]))
    refused("must be an \\(N, 4\\) array", emb.embed_frame, FRAME, torch.tensor([0.0, 0, 10, 10]))
    refused("box 0 is tensor", emb.embed_frame, FRAME, [torch.tensor([0.0, 0, 10, 10])])


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=12)
hostile_boxes = json_like | hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)) | \
    st.lists(st.lists(st.floats(-1e3, 1e3) | st.integers(-10**20, 10**20), min_size=4, max_size=4), max_size=3)


@FAST
@given(hostile_boxes)
def test_any_boxes_are_embedded_or_refused(emb, boxes):
    out = clean_or_refused(emb.embed_frame, FRAME, boxes)
    if out is not None:
        assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == D and np.isfinite(out).all()


hostile_frames = hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.uint16]),
                            hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)) | json_like


@FAST
@given(hostile_frames)
def test_any_frame_is_embedded_or_refused(emb, frame):
    out = clean_or_refused(emb.embed_frame, frame, [[0, 0, 3, 3]])
    if out is not None:
        assert out.shape == (1, D) and np.isfinite(out).all()


# -- Embedder: crops, batches, files -----------------------------------------------------------------------------
@pytest.mark.parametrize("crops, match", [
    (None, "crops must be a list .* got None"),
    (FRAME, "crops must be a list .* got an array of shape \\(120, 80, 3\\)"),
    ("abc", "got the string 'abc'"),
    ((c for c in [FRAME]), "crops must be a list"),
    ([FRAME, None, "x", 3], "crop 1 is None \\(an image that failed to load\\?\\)"),
    ([FRAME, "x"], "crop 1 must be a NumPy uint8"),
    ([np.zeros((0, 10, 3), np.uint8)], "crop 0 must be H x W x 3 with H, W >= 1"),
    ([FRAME] * 5 + [FRAME.astype(float)], "crop 5 must be uint8; got float64"),         # in the second chunk
])
def test_bad_crops(emb, crops, match):
    refused(match, emb.embed_crops, crops)


def test_odd_but_valid_crops(emb):
    assert emb.embed_crops([]).shape == (0, D)
    assert emb.embed_crops([np.zeros((1, 1, 3), np.uint8), FRAME[:, ::-2]]).shape == (2, D)
    np.testing.assert_allclose(emb.embed_crops(np.stack([FRAME, FRAME])), emb.embed_crops([FRAME, FRAME]), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_, np.complex64, object, "U1"])
def test_model_input_must_be_float(emb, dtype):
    refused("model input must be normalised float values", emb.embed_batch, np.zeros((2, 3, 160, 64), dtype))


def test_bad_model_input(emb):
    torch = pytest.importorskip("torch")
    refused("model input must be \\(N, 3, 160, 64\\), got \\(2, 3, 10, 10\\)", emb.embed_batch,
            np.zeros((2, 3, 10, 10), np.float32))
    refused("got \\(2, 160, 64, 3\\)", emb.embed_batch, np.zeros((2, 160, 64, 3), np.float32))     # NHWC
    refused("got \\(\\)", emb.embed_batch, None)
    refused("got \\(\\)", emb.embed_batch, [[1.0, 2.0]])
    batch = np.zeros((6, 3, 160, 64), np.float32)
    batch[5, 0, 0, 0] = np.nan
    refused("NaN or infinite values in row 5", emb.embed_batch, batch)
    refused("NaN or infinite values in row 0", emb.embed_batch, np.full((1, 3, 160, 64), 1e300))   # inf as float32
    refused("convert it explicitly", emb.embed_batch, torch.zeros(2, 3, 160, 64))                # host backend
    assert emb.embed_batch(np.zeros((0, 3, 160, 64), np.float32)).shape == (0, D)
    np.testing.assert_allclose(emb.embed_batch(np.zeros((2, 3, 160, 64))),
                               emb.embed_batch(np.zeros((2, 3, 160, 64), np.float32)), atol=1e-6)


def test_bad_image_files(emb, tmp_path):
    import cv2

    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(cv2.imencode(".jpg", FRAME)[1].tobytes()[:50])
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), FRAME)
    refused("image .*missing.jpg not found", emb.embed_files, [good, tmp_path / "missing.jpg"])   # before any work
    refused("cannot read image .*: the file name is too long", emb.embed_files, [tmp_path / ("a" * 300 + ".png")])
    refused("cannot read image .*notes.txt", emb.embed_files, [good, tmp_path / "notes.txt"])
    refused("cannot read image .*cut.jpg", emb.embed_files, [tmp_path / "cut.jpg"])
    refused("is a directory", emb.embed_files, [good, tmp_path])
    refused("paths must be a list .* got the string", emb.embed_files, str(good))   # not read letter by letter
    refused("paths must be a list .* got None", emb.embed_files, None)
    refused("path 1 is None", emb.embed_files, [good, None])
    refused("chunk must be at least 1; got 0", emb.embed_files, [good], chunk=0)
    assert emb.embed_files([]).shape == (0, D)
    assert emb.embed_files([good, str(good)], chunk=1).shape == (2, D)


# -- Gallery: constructor ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0}, "the feature dimension must be at least 1"),
    ({"dim": -1}, "at least 1"),
    ({"dim": 1.5}, "whole number"),
    ({"dim": "8"}, "the string '8'"),
    ({"dim": True}, "the bool True"),
    ({"dim": 10**12}, "at most 65536"),
    ({"dim": None}, "got None"),
    ({"metric": "L2"}, "unknown metric 'L2'; one of l2, cosine"),
    ({"metric": ["l2"]}, "unknown metric"),
    ({"index": "Faiss"}, "unknown index 'Faiss'"),
    ({"index": ["exact"]}, "unknown index"),
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or an \\(array namespace, device\\) pair, got 'gpu'"),
    ({"device": (1, 2)}, "1 is not an array namespace"),
    ({"device": ["cpu"]}, "device must be"),
    ({"index": "faiss", "device": "gpu"}, "the faiss index runs on the CPU here"),
    ({"capacity": 0}, "capacity must be at least 1"),
    ({"capacity": -1}, "capacity must be at least 1"),
    ({"capacity": "x"}, "capacity must be a whole number"),
    ({"capacity": 1.5}, "capacity must be a whole number"),
    ({"capacity": None}, "capacity must be a whole number"),
    ({"capacity": 10**15}, "not enough memory for a gallery of 1000000000000000 x 8"),
    ({"max_per_id": 0}, "max_per_id must be at least 1"),
    ({"max_per_id": "3"}, "max_per_id must be a whole number"),
    ({"clock": "now"}, "clock must be a function"),
    ({"index": "milvus"}, "the milvus index needs uri="),
])
def test_bad_gallery_options(kwargs, match):
    refused(match, Gallery, **{"dim": 8, **kwargs})


def test_clock_that_returns_nonsense():
    refused("the gallery's clock must be a finite number; got nan", Gallery(8, clock=lambda: float("nan")).add,
            [1], np.ones((1, 8)))
    refused("the gallery's clock must be a finite number; got None", Gallery(8, clock=lambda: None).add,
            [1], np.ones((1, 8)))


# -- Gallery: add / remove ---------------------------------------------------------------------------------------
X = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
IDS = [1, 2, 3, 4, 5]
INDEXES = ["exact", "faiss"]


def _filled(index):
    if index == "faiss":
        pytest.importorskip("faiss")
    gallery = Gallery(8, index=index, clock=lambda: 100.0)
    gallery.add(IDS, X, cams=[0, 0, 1, 1, 2])
    return gallery


def _same(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("feats", "ids", "cams", "times"))


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("args, match", [
    (([1.9, 2, 3, 4, 5], X), "ids: id 0 is 1.9, not an integer \\(ids are never rounded\\)"),
    ((["a", 2, 3, 4, 5], X), "id 0 is the string 'a'"),
    (("12345", X), "ids must be a list or 1-D array of integers; got the string"),
    (([2**64, 2, 3, 4, 5], X), "beyond the 64-bit integer range"),
    ((None, X), "ids must be a list .* got None"),
    (([1, 2], X), "2 ids for 5 features"),
    ((np.ones((5, 1), int), X), "ids must be 1-D"),
    ((3, X[:1]), "ids must be a list"),
    (([1], X[0]), "features must have shape \\(N, 8\\); got \\(8,\\)"),
    (([1], X[None]), "got \\(1, 5, 8\\)"),
    ((IDS, np.where(np.eye(5, 8) > 0, np.nan, X)), "features: NaN or infinite values in rows 0, 1, 2, 3, 4"),
    (([1], np.full((1, 8), np.inf)), "NaN or infinite values in row 0"),
    (([1], np.full((1, 8), "a")), "features must hold real numbers"),
    (([1], [["a"] * 8]), "features must be an \\(N, 8\\) array of numbers"),
    (([1], [["1.5"] * 8]), "array of numbers; got a list of 1 holding strings"),            # was read as 1.5
    (([1], [[Decimal(1)] * 8]), "array of numbers; got a list of 1 holding Python objects"),
    (([1], np.full((1, 8), 1.0, object)), "features must hold real numbers; got object"),
    (([1], np.ones((1, 8), bool)), "features must hold real numbers; got bool"),
    (([1], np.ones((1, 8), complex)), "features must hold real numbers; got complex128"),      # was: imaginary dropped
    (([1], np.full((1, 8), 1e300)), "row 0 has values too large for float32"),                  # was: stored as inf
    (([1], np.full((1, 8), 1e20, np.float32)), "row 0 has a squared norm too large for float32"),  # distances inf/NaN
    (([1], np.full((1, 1), 1.8e19, np.float32) * np.eye(1, 8, dtype=np.float32)), "too large for float32 distances"),
    (([1], np.ones((1, 9))), "got \\(1, 9\\)"),
    (([1, 2], [[1.0] * 8, [1.0] * 7]), "features must be an \\(N, 8\\) array"),
    (([1], None), "features must be an \\(N, 8\\) array of numbers; got None"),
])
def test_bad_adds_change_nothing(index, args, match):
    gallery = _filled(index)
    before = gallery.entries()
    refused(match, gallery.add, *args)
    assert _same(gallery.entries(), before)


@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("kwargs, match", [
    ({"cams": [1, 2]}, "2 camera ids for 5 features"),
    ({"cams": "abcde"}, "camera ids must be a list"),
    ({"cams": [0.5] * 5}, "camera ids: id 0 is 0.5"),
    ({"times": [np.nan] * 5}, "times: time 0 must be a finite number; got nan"),
    ({"times": [1, 2]}, "2 times for 5 features"),
    ({"times": ["a"] * 5}, "time 0 must be a finite number; got the string 'a'"),
    ({"times": ["1"] * 5}, "got the string '1'"),                                   # was accepted as 1.0
    ({"times": [None] * 5}, "got None"),
    ({"times": 5.0}, "times must be a list or 1-D array of 5 numbers"),
    ({"times": np.ones((5, 1))}, "times must be 1-D"),
    ({"times": [True] * 5}, "got the bool True"),
    ({"times": np.ones(5, complex)}, "got np.complex128"),
    ({"times": [10**400] * 5}, "time 0 is too large"),
    ({"times": np.array(["NaT"] * 5, "timedelta64[s]")}, "time 0 must be a finite number"),   # was: TypeError
    ({"times": np.array([1.0, 2, np.inf, 4, 5])}, "time 2 is not a finite number"),
])
def test_bad_cameras_and_times_change_nothing(index, kwargs, match):
    gallery = _filled(index)
    before = gallery.entries()
    refused(match, gallery.add, IDS, X, **kwargs)
    assert _same(gallery.entries(), before)


@pytest.mark.parametrize("index", INDEXES)
def test_valid_odd_adds(index):
    gallery = _filled(index)
    gallery.add([6.0], np.ones((1, 8), int))                  # integral float id, integer features
    gallery.add((i for i in [7]), [[0.5] * 8], times=np.array([5], np.int64))
    gallery.add([], np.zeros((0, 8)))
    e = gallery.entries()
    assert e.ids.tolist() == [1, 2, 3, 4, 5, 6, 7] and e.feats.dtype == np.float32 and e.times[-1] == 5.0


@pytest.mark.parametrize("index", INDEXES)
def test_remove_hostile(index):
    gallery = _filled(index)
    before = gallery.entries()
    for ids, match in [("2", "id 0 is the string '2'"), ([[2, 3]], "id 0 is a list of 2"), (None, "id 0 is None"),
                       (2.5, "id 0 is 2.5"), ({2}, "id 0 is")]:
        refused(match, gallery.remove, ids)
    for when in [float("nan"), "1", None, -np.inf, 10**400, np.complex128(1), True]:
        refused("remove_older_than needs a finite time in seconds", gallery.remove_older_than, when)
    for per_id in [0, 1.5, "2", None]:
        refused("per_id must be", gallery.keep_recent, per_id)
    assert _same(gallery.entries(), before)
    assert gallery.remove([]) == 0 and gallery.remove(np.int64(2)) == 1 and gallery.remove(1) == 1
    assert gallery.remove_older_than(np.float32(50)) == 0 and gallery.remove_older_than(101) == 3
    assert len(gallery) == 0


@FAST
@given(feats=hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)) | json_like)
def test_any_features_are_stored_finite_or_refused(feats):
    gallery = Gallery(4)
    n = getattr(feats, "shape", (0,))[0] if getattr(feats, "ndim", 0) else (len(feats) if isinstance(feats, list) else 1)
    clean_or_refused(gallery.add, list(range(n)), feats)
    e = gallery.entries()
    assert e.feats.dtype == np.float32 and np.isfinite(e.feats).all()
    assert np.isfinite((e.feats.astype(np.float32) ** 2).sum(axis=1)).all()


# -- Gallery: search ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k must be at least 1; got 0"),
    ({"k": -1}, "at least 1"),
    ({"k": 1.5}, "whole number"),
    ({"k": True}, "the bool True"),
    ({"k": "5"}, "the string '5'"),
    ({"k": None}, "got None"),
    ({"queries": np.ones((1, 9))}, "queries must have shape \\(N, 8\\); got \\(1, 9\\)"),
    ({"queries": np.ones(9)}, "got \\(1, 9\\)"),
    ({"queries": X[None]}, "got \\(1, 5, 8\\)"),
    ({"queries": np.full((2, 8), np.nan)}, "queries: NaN or infinite values in rows 0, 1"),   # was: id -1
    ({"queries": np.full((1, 8), 1e300)}, "queries: row 0 has values too large for float32"),
    ({"queries": np.ones((1, 8), complex)}, "queries must hold real numbers"),
    ({"queries": np.ones((1, 8), object)}, "queries must hold real numbers"),
    ({"queries": "abc"}, "queries must be an \\(N, 8\\) array of numbers"),
    ({"queries": None}, "queries must be an \\(N, 8\\) array of numbers; got None"),
    ({"queries": []}, "got \\(0,\\)"),
    ({"queries": 3.0}, "got \\(\\)"),
    ({"query_cams": [0], "exclude_same_camera": True}, "1 query camera ids for 5 features"),
    ({"query_cams": [0]}, "1 query camera ids for 5 features"),                  # checked even when unused
    ({"exclude_same_camera": True}, "exclude_same_camera needs query_cams"),
    ({"query_cams": "abcde", "exclude_same_camera": True}, "query camera ids must be a list"),
    ({"query_cams": [0] * 5, "exclude_same_camera": "no"}, "exclude_same_camera must be True or False"),
])
def test_bad_searches(index, kwargs, match):
    gallery = _filled(index)
    args = {"queries": X, **kwargs}
    refused(match, gallery.search, args.pop("queries"), **args)


@pytest.mark.parametrize("index", INDEXES)
def test_odd_but_valid_searches(index):
    gallery = _filled(index)
    ids, d = gallery.search(X, k=10**30)                   # k beyond the size: the size
    assert ids.shape == d.shape == (5, 5) and ids[:, 0].tolist() == IDS
    assert gallery.search(X, k=np.int64(2))[0].shape == (5, 2)
    assert gallery.search(np.zeros((0, 8)), k=3)[0].shape == (0, 3)          # no queries: (0, k)
    assert gallery.search(X[0], k=1)[0].tolist() == [[1]]                   # 1-D: one query
    assert gallery.search(list(X[0]), k=1)[0].tolist() == [[1]]
    assert gallery.search(np.round(X * 100).astype(int), k=1)[0].shape == (5, 1)
    ids, d = gallery.search(X[:1], k=3, query_cams=[0], exclude_same_camera=np.bool_(True))
    assert set(ids[0].tolist()) == {3, 4, 5}
    lone = Gallery(8, index=index)
    lone.add([1], X[:1], cams=[0])
    ids, d = lone.search(X[:1], k=3, query_cams=[0], exclude_same_camera=True)
    assert ids.tolist() == [[-1]] and np.isinf(d).all()                      # all excluded: padded
    refused("the gallery is empty", Gallery(8, index=index).search, X)


def test_milvus_without_uri(tmp_path):
    refused("the milvus index needs uri=", Gallery, 8, index="milvus")
    refused("the milvus index needs uri=", Gallery.load, _npz(tmp_path / "g.npz"), index="milvus")


# -- Gallery: save / load ----------------------------------------------------------------------------------------
def _npz(path, **changes):
    arrays = dict(format_version=np.int64(2), dim=np.int64(8), metric=np.array("l2"), feats=X, ids=np.arange(5),
                  cams=np.zeros(5, np.int64), times=np.zeros(5))
    arrays.update(changes)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v for k, v in arrays.items() if v is not None})
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("changes, match", [
    ({"format_version": np.int64(99)}, "has format 99; this han-edge reads 1 to 2"),
    ({"format_version": np.int64(0)}, "has format 0"),                       # was accepted
    ({"format_version": np.int64(-5)}, "has format -5"),
    ({"format_version": np.float64(2.5)}, "has format 2.5"),                 # was truncated to 2
    ({"format_version": np.array("two")}, "is corrupt or not a han-edge gallery"),
    ({"format_version": np.float64(np.inf)}, "is corrupt or not a han-edge gallery"),       # was: OverflowError
    ({"dim": np.int64(16)}, "is inconsistent"),
    ({"dim": np.int64(0), "feats": np.zeros((5, 0), np.float32)}, "is inconsistent: metric 'l2', dimension 0"),
    ({"dim": np.arange(3)}, "is corrupt"),
    ({"metric": np.array("manhattan")}, "is inconsistent: metric 'manhattan'"),
    ({"feats": np.full((5, 8), np.nan, np.float32)}, "npz: features: NaN or infinite values"),
    ({"feats": np.full((5, 8), 1e300)}, "values too large for float32"),                          # was: loaded as inf
    ({"feats": np.ones((5, 8), np.int64)}, "is inconsistent: \\(5, 8\\) int64 features"),
    ({"feats": np.ones((5, 8), complex)}, "is inconsistent"),
    ({"feats": np.full((5, 8), "a")}, "is inconsistent"),
    ({"feats": np.ones(40, np.float32)}, "is inconsistent: \\(40,\\) float32 features"),
    ({"ids": np.arange(3)}, "is inconsistent"),
    ({"ids": np.arange(5.0)}, "is inconsistent"),
    ({"ids": np.arange(5)[:, None]}, "is inconsistent"),
    ({"ids": np.full(5, 2**64 - 1, np.uint64)}, "npz: ids: id 0 is beyond the 64-bit integer range"),
    ({"ids": np.array([object(), 1], dtype=object)}, "is corrupt"),          # pickled objects never loaded
    ({"ids": None}, "is corrupt"),
    ({"cams": np.int64(0)}, "is inconsistent: .* cameras \\(\\) int64"),     # was: TypeError
    ({"cams": np.zeros((5, 1), np.int64)}, "is inconsistent"),
    ({"times": np.full(5, "a")}, "is inconsistent: .* times \\(5,\\) <U1"),  # was: ValueError
    ({"times": np.full(5, np.nan)}, "npz: times: time 0 is not a finite number"),
    ({"times": np.zeros((5, 1))}, "is inconsistent"),
])
def test_bad_gallery_files(tmp_path, changes, match):
    refused(match, Gallery.load, _npz(tmp_path / "g.npz", **changes))


def test_gallery_files_that_are_not(tmp_path):
    good = _npz(tmp_path / "good.npz")
    raw = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "plain.npy", X)
    import pickle

    (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"feats": X}))
    for name in ("cut.npz", "random.npz", "empty.npz", "plain.npy", "pickle.npz"):
        message = refused("is corrupt or not a han-edge gallery", Gallery.load, tmp_path / name)
        assert "allow_pickle" not in message
    refused("is a directory", Gallery.load, tmp_path)
    refused("not found", Gallery.load, tmp_path / "missing.npz")
    refused("a gallery file name must be a non-empty str or Path; got None", Gallery.load, None)
    refused("holds 8-D features, expected 16-D", Gallery.load, good, dim=16)
    refused("the feature dimension must be a whole number", Gallery.load, good, dim="8")
    refused("unknown index 'faus'", Gallery.load, good, index="faus")
    refused("device must be", Gallery.load, good, device="gpu")
    assert len(Gallery.load(_npz(tmp_path / "v1.npz", format_version=np.int64(1), times=None))) == 5   # version 1
    assert len(Gallery.load(_npz(tmp_path / "zero.npz", feats=np.zeros((0, 8), np.float32), ids=np.zeros(0, int),
                                 cams=np.zeros(0, int), times=np.zeros(0)))) == 0


def test_save_to_bad_places_keeps_the_old_file(tmp_path):
    gallery = _filled("exact")
    target = tmp_path / "g.npz"
    gallery.save(target)
    before = target.read_bytes()
    (tmp_path / "file").write_text("x")
    refused("is a directory", gallery.save, tmp_path)
    refused("does not exist", gallery.save, tmp_path / "no" / "such" / "g.npz")
    refused("is not a folder", gallery.save, tmp_path / "file" / "g.npz")
    refused("a gallery file name must be a non-empty str or Path; got None", gallery.save, None)
    refused("got 3", gallery.save, 3)
    refused("got ''", gallery.save, "")
    assert target.read_bytes() == before
    assert _same(Gallery.load(target).entries(), gallery.entries())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "g.npz"]


# -- memory: search is chunked -----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_search_equals_one_chunk(metric):
    rng = np.random.default_rng(5)
    gallery = Gallery(16, metric=metric)
    gallery.add(rng.integers(0, 30, 200), rng.normal(size=(200, 16)), cams=rng.integers(-1, 4, 200))
    queries, cams = rng.normal(size=(37, 16)), rng.integers(-1, 4, 37)
    whole = gallery.search(queries, k=7), gallery.search(queries, k=7, query_cams=cams, exclude_same_camera=True)
    gallery.backend.search_bytes = 1                                 # one query per chunk
    chunked = gallery.search(queries, k=7), gallery.search(queries, k=7, query_cams=cams, exclude_same_camera=True)
    gallery.backend.search_bytes = 7 * 32 * 200                      # 7 queries per chunk: a ragged last chunk
    ragged = gallery.search(queries, k=7, query_cams=cams, exclude_same_camera=True)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(whole[1][0], ragged[0])
    np.testing.assert_array_equal(whole[1][1], ragged[1])


def test_search_memory_does_not_grow_with_the_queries(monkeypatch):
    import tracemalloc

    from han_edge import indexes

    rng = np.random.default_rng(6)
    n, q = 5000, 4000                 # unchunked: a 4000 x 5000 distance matrix (80 MB) + int64 top-k work (160 MB)
    gallery = Gallery(8)
    gallery.add(np.arange(n), rng.normal(size=(n, 8)).astype(np.float32))
    queries = rng.normal(size=(q, 8)).astype(np.float32)
    gallery.backend.search_bytes = 8 * 2**20
    shapes = []
    real = indexes.distances
    monkeypatch.setattr(indexes, "distances", lambda xp, a, *rest: shapes.append(a.shape[0]) or real(xp, a, *rest))
    tracemalloc.start()
    ids, _ = gallery.search(queries, k=5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ids.shape == (q, 5) and (ids[:, 0] >= 0).all()
    assert max(shapes) * n * indexes.BYTES_PER_DISTANCE <= 8 * 2**20 and sum(shapes) == q
    assert peak < 16 * 2**20, f"search peaked at {peak / 2**20:.0f} MiB"


# -- concurrency: one writer, four readers -----------------------------------------------------------------------
@pytest.mark.parametrize("index", INDEXES)
def test_one_writer_four_readers_for_two_seconds(index):
    if index == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(7)
    gallery = Gallery(8, index=index, max_per_id=3)
    gallery.add(np.arange(20), rng.normal(size=(20, 8)), cams=np.arange(20) % 3, times=np.zeros(20))
    stop = time.monotonic() + 2.0
    errors, searches = [], [0]

    def reader(seed):
        local = np.random.default_rng(seed)
        try:
            while time.monotonic() < stop:
                k = int(local.integers(1, 8))
                try:
                    ids, d = gallery.search(local.normal(size=(3, 8)), k=k, query_cams=[0, 1, -1],
                                            exclude_same_camera=bool(local.integers(2)))
                except HanEdgeError as err:              # the writer may have emptied it: the only allowed error
                    assert "empty" in str(err), str(err)
                    continue
                assert ids.shape == d.shape and ids.shape[0] == 3 and ids.shape[1] <= k
                assert (ids[np.isfinite(d)] >= 0).all() and (ids[~np.isfinite(d)] == -1).all()
                with np.errstate(invalid="ignore"):                                   # inf - inf in padding
                    assert (np.diff(d, axis=1)[np.isfinite(d[:, 1:])] >= -1e-5).all()  # nearest first
                searches[0] += 1
        except Exception as err:  # noqa: BLE001 - any exception in a reader is reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    step = 0
    try:
        while time.monotonic() < stop:
            step += 1
            base = 1000 + step * 10
            gallery.add(np.arange(base, base + 5), rng.normal(size=(5, 8)), cams=rng.integers(0, 3, 5),
                        times=np.full(5, float(step)))
            if step % 3 == 0:
                gallery.remove(np.arange(base - 30, base - 20))
            if step % 7 == 0:
                gallery.remove_older_than(step - 5)
            if step % 11 == 0:
                gallery.keep_recent(1)
            if step % 50 == 0:                           # empty it now and then: readers must cope
                gallery.remove_older_than(step + 1)
    finally:
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert searches[0] > 20 and step > 20


def test_a_closed_embedder_refuses_work(fresh_onnx):
    frame = np.zeros((100, 60, 3), np.uint8)
    with Embedder(fresh_onnx[1]) as emb:                     # was: no close(), no context manager
        assert emb.embed_frame(frame, [[0, 0, 30, 80]]).shape == (1, 1024)
    for call in (lambda: emb.embed_frame(frame, [[0, 0, 30, 80]]), lambda: emb.embed_crops([frame]),
                 lambda: emb.embed_batch(np.zeros((1, 3, 160, 64), np.float32))):
        refused("this Embedder of .* is closed", call)
    emb.close()                                               # twice: nothing to release
