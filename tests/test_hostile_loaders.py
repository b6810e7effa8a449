"""Hostile inputs to the image, video and dataset readers: odd file names, damaged list and split files."""
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from han_edge.data import load_cuhk03, load_image_folder, load_market_layout, load_msmt17
from han_edge.errors import HanEdgeError
from han_edge.evaluate import evaluate_features, euclidean_squared, re_ranking
from han_edge.pipeline import _pid_cam, embed_sources
from han_edge.preprocess import load_image

NON_UTF8 = os.fsdecode(b"\xff\xfe")    # a Linux file name that is not UTF-8: a str with lone surrogates


def write_image(path: Path, value=128, size=(16, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", np.full((*size, 3), value, np.uint8))
    assert ok
    path.write_bytes(data.tobytes())       # by bytes: cv2.imwrite cannot take every name


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    """In a child process: the old readers crashed the interpreter (SIGSEGV), which must fail the test, not pytest."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


# -- B1: a non-UTF-8 file name -------------------------------------------------------------------------------
def test_load_image_reads_a_non_utf8_file_name(tmp_path):
    path = tmp_path / f"{NON_UTF8}.png"
    write_image(path, value=77)
    done = run_python("import sys; from han_edge.errors import HanEdgeError; from han_edge.preprocess import load_image\n"
                      "im = load_image(sys.argv[1]); print(im.shape, int(im[0, 0, 0]))\n"
                      "try: load_image(sys.argv[1] + '.missing')\n"
                      "except HanEdgeError as err: print('refused' if 'cannot read image' in str(err) else err)",
                      str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(16,", "8,", "3)", "77", "refused"]


def test_load_image_keeps_its_sentence_for_unreadable_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    (tmp_path / "folder.jpg").mkdir()
    for name in ("missing.jpg", "empty.jpg", "junk.jpg", "folder.jpg"):
        with pytest.raises(HanEdgeError, match="cannot read image .*: missing, corrupt or not an image"):
            load_image(tmp_path / name)


def test_embed_folder_with_a_non_utf8_file_name(tmp_path, fresh_onnx):
    _, model = fresh_onnx
    write_image(tmp_path / "imgs" / f"0003_c2{NON_UTF8}.png", size=(64, 32))
    write_image(tmp_path / "imgs" / "0004_c1.png", size=(64, 32))
    done = run_python("import sys; from pathlib import Path; from han_edge.pipeline import embed_sources\n"
                      "g, n = embed_sources(sys.argv[1], Path(sys.argv[2]), None, None); print(n)",
                      str(model), str(tmp_path / "imgs"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2"


def test_video_with_a_non_utf8_name_is_refused(tmp_path, fresh_onnx):
    _, model = fresh_onnx
    video = tmp_path / f"v{NON_UTF8}.avi"
    video.write_bytes(b"not really a video")
    (tmp_path / "b.json").write_text(json.dumps({"0": [[0, 0, 4, 4]]}))
    done = run_python("import sys; from pathlib import Path; from han_edge.errors import HanEdgeError\n"
                      "from han_edge.pipeline import embed_sources\n"
                      "try: embed_sources(sys.argv[1], None, Path(sys.argv[2]), Path(sys.argv[3]))\n"
                      "except HanEdgeError as err: print(ascii(str(err)))",
                      str(model), str(video), str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not valid UTF-8" in done.stdout and "rename the file" in done.stdout
    with pytest.raises(HanEdgeError, match="rename the file"):      # and in this process, now that it is safe
        embed_sources(model, None, video, tmp_path / "b.json")


# -- C8 and D4: the dataset loaders ------------------------------------------------------------------------------
def cuhk03_root(tmp_path: Path, **override) -> Path:
    from scipy.io import savemat

    names = [f"1_00{pid}_{cam}_01.png" for pid, cam in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]]
    for name in names:
        write_image(tmp_path / "images_labeled" / name)
    mat = {"filelist": np.array(names, dtype=object).reshape(-1, 1), "labels": np.array([[1], [1], [2], [2], [3], [3]]),
           "camId": np.array([[1], [2], [1], [2], [1], [2]]), "train_idx": np.array([[1], [2], [3], [4]]),
           "query_idx": np.array([[5]]), "gallery_idx": np.array([[6]])}
    mat.update(override)
    savemat(str(tmp_path / "cuhk03_new_protocol_config_labeled.mat"), mat)
    return tmp_path


def test_cuhk03_index_zero_is_refused_not_wrapped(tmp_path):
    root = cuhk03_root(tmp_path, query_idx=np.array([[0]]))   # 1-based: 0 used to pick the last file
    with pytest.raises(HanEdgeError, match=r"query_idx holds 0, but indices are 1-based and filelist has 6 entries"):
        load_cuhk03(root)


def test_cuhk03_index_past_the_file_list_is_refused(tmp_path):
    root = cuhk03_root(tmp_path, gallery_idx=np.array([[7]]))
    with pytest.raises(HanEdgeError, match=r"gallery_idx holds 7, .* \(1\.\.6\)"):
        load_cuhk03(root)
    cuhk03_root(tmp_path, gallery_idx=np.array([[6]]), query_idx=np.array([[1.5]]))
    with pytest.raises(HanEdgeError, match="query_idx must hold whole numbers"):
        load_cuhk03(root)
    cuhk03_root(tmp_path, labels=np.array([[1], [2]]))
    with pytest.raises(HanEdgeError, match="6 files but 2 labels"):
        load_cuhk03(root)
    data = load_cuhk03(cuhk03_root(tmp_path))         # the valid file still loads, 1-based
    assert data.query[0][0].endswith("1_003_1_01.png") and data.gallery[0][0].endswith("1_003_2_01.png")


def test_cuhk03_junk_or_damaged_split_file_is_one_sentence(tmp_path):
    root = cuhk03_root(tmp_path)
    mat_path = root / "cuhk03_new_protocol_config_labeled.mat"
    good = mat_path.read_bytes()
    mat_path.write_text("junk\n")
    with pytest.raises(HanEdgeError, match="malformed split file .*truncated"):
        load_cuhk03(root)
    mat_path.write_bytes(good[:len(good) // 2])
    with pytest.raises(HanEdgeError, match="malformed split file"):
        load_cuhk03(root)
    # Data type code 8 in a numeric element's tag makes scipy's reader follow a NULL pointer (SIGSEGV,
    # scipy PR 25349): the loader must survive it. The labels are 6 int64 values: tag (miINT64 = 12, 48 bytes).
    tag = struct.pack("<II", 12, 48)
    assert tag in good
    mat_path.write_bytes(good.replace(tag, struct.pack("<II", 8, 48), 1))
    with pytest.raises(HanEdgeError, match=f"cuhk03: malformed split file {mat_path}: .*damaged"):
        load_cuhk03(root)


def test_msmt17_list_file_with_a_byte_order_mark(tmp_path):
    for folder in ("train", "test"):
        (tmp_path / folder).mkdir()
    for name in ("train", "query", "gallery"):   # Windows editors start UTF-8 files with U+FEFF
        (tmp_path / f"list_{name}.txt").write_text("\ufeff0000/0000_000_01_0303morning_0015_0.jpg 0\n", encoding="utf-8")
    data = load_msmt17(tmp_path)
    assert data.train[0][0] == str(tmp_path / "train" / "0000" / "0000_000_01_0303morning_0015_0.jpg")
    assert data.query[0][0].endswith("test/0000/0000_000_01_0303morning_0015_0.jpg")   # no U+FEFF in the path


@pytest.mark.parametrize("line", ["0000/0000_000_01_a_0.jpg 1_000", "0000/0000_000_\u0660\u0661_a_0.jpg 0"])
def test_msmt17_numbers_are_ascii_digits(tmp_path, line):
    for folder in ("train", "test"):
        (tmp_path / folder).mkdir()
    for name in ("train", "query", "gallery"):
        (tmp_path / f"list_{name}.txt").write_text(line + "\n", encoding="utf-8")
    with pytest.raises(HanEdgeError, match="msmt17: cannot parse line 1"):   # int() read "1_000" as 1000
        load_msmt17(tmp_path)


def test_msmt17_list_file_not_utf8_is_one_sentence(tmp_path):
    for folder in ("train", "test"):
        (tmp_path / folder).mkdir()
    (tmp_path / "list_train.txt").write_bytes(b"a\xff b\n")
    with pytest.raises(HanEdgeError, match=r"msmt17: list file .*list_train.txt is not UTF-8 text \(byte 1 is b'\\xff'\)"):
        load_msmt17(tmp_path)


@pytest.mark.parametrize("name", ["\u00b2", "--5", "\u0663"])   # isdigit() but not int(); two minus signs; Arabic 3
def test_image_folder_identity_must_be_an_ascii_number(tmp_path, name):
    for split in ("train", "query", "gallery"):
        write_image(tmp_path / split / name / "x_c1.png")
    with pytest.raises(HanEdgeError, match="identity folder .* is not a number"):
        load_image_folder(tmp_path)


def test_dataset_numbers_beyond_64_bits_are_refused(tmp_path):
    huge = "123456789012345678901234567890"
    write_image(tmp_path / "bounding_box_train" / "0001_c1s1_000001_00.jpg")
    write_image(tmp_path / "query" / f"{huge}_c1s1_000001_00.jpg")
    write_image(tmp_path / "bounding_box_test" / "0001_c2s1_000001_00.jpg")
    with pytest.raises(HanEdgeError, match="beyond the 64-bit range"):
        load_market_layout(tmp_path)


# -- D5: Market-style names with huge numbers in embed -------------------------------------------------------------
def test_pid_cam_with_huge_numbers_is_unknown():
    assert _pid_cam("123456789012345678901234567890_c1s1.jpg") == (-1, -1)
    assert _pid_cam("1_c99999999999999999999999.jpg") == (-1, -1)
    assert _pid_cam("-9223372036854775809_c1.jpg") == (-1, -1)
    assert _pid_cam("9223372036854775807_c1.jpg") == (2**63 - 1, 0)       # the largest that fits is kept
    assert _pid_cam("0002_c3s1_000451_03.jpg") == (2, 2)
    assert _pid_cam("holiday.jpg") == (-1, -1)


def test_embed_folder_with_huge_numbers_in_names(tmp_path, fresh_onnx):
    _, model = fresh_onnx
    write_image(tmp_path / "big" / "123456789012345678901234567890_c1s1.jpg", size=(64, 32))
    write_image(tmp_path / "big" / "0007_c2s1.jpg", size=(64, 32))
    gallery, n = embed_sources(model, tmp_path / "big", None, None)
    assert n == 2
    assert sorted(gallery.entries().ids.tolist()) == [-1, 7]


# -- D6: re-ranking on a set smaller than k1 / k2 ------------------------------------------------------------------
def test_rerank_on_fewer_images_than_k2():
    rng = np.random.default_rng(0)
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.1], [0.0, 1.0]])
    result = evaluate_features(q, g, [1], [1, 2], [0], [1, 1], rerank=True)     # 3 images, k2 = 6
    assert result["rank1"] == 1.0 and result["num_valid_query"] == 1
    # k2 beyond the set means every image, which is what k2 = n (already correct) gives
    q, g = rng.normal(size=(2, 4)), rng.normal(size=(3, 4))
    dists = euclidean_squared(q, g), euclidean_squared(q, q), euclidean_squared(g, g)
    capped = re_ranking(*dists, k1=20, k2=6)
    np.testing.assert_array_equal(capped, re_ranking(*dists, k1=20, k2=5))
    assert np.isfinite(capped).all() and capped.shape == (2, 3)
    with pytest.raises(HanEdgeError, match="k1 and k2 of at least 1"):
        re_ranking(*dists, k2=0)


@pytest.mark.parametrize("entry", ["../secret.png", "/etc/passwd", "a/../../b.png"])
def test_cuhk03_file_list_cannot_point_outside_the_images(tmp_path, entry):
    names = [f"1_00{pid}_{cam}_01.png" for pid, cam in [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]] + [entry]
    root = cuhk03_root(tmp_path, filelist=np.array(names, dtype=object).reshape(-1, 1))
    with pytest.raises(HanEdgeError, match=rf"filelist entry {re.escape(repr(entry))} points outside"):
        load_cuhk03(root)


def test_an_image_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "0002_c1s1_000001_00.jpg"
    os.mkfifo(fifo)
    done = run_python("import sys; from han_edge.preprocess import load_image\n"
                      "try: load_image(sys.argv[1])\n"
                      "except Exception as err: print(type(err).__name__, err)", str(fifo))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("HanEdgeError cannot read image") and "not a regular file" in done.stdout


def test_synthetic_set_under_a_non_utf8_folder(tmp_path):
    root = tmp_path / f"syn{NON_UTF8}"
    done = run_python("import sys; from han_edge.synthetic import generate\n"
                      "root = generate(sys.argv[1], train_ids=2, test_ids=2, distractors=1)\n"
                      "print(len(list(root.rglob('*.jpg'))))", str(root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) > 0


def test_an_empty_synthetic_variable_is_refused(monkeypatch):
    from han_edge.data import default_synthetic_root

    monkeypatch.setenv("HAN_EDGE_SYNTHETIC", "")
    with pytest.raises(HanEdgeError, match="HAN_EDGE_SYNTHETIC is set but empty"):
        default_synthetic_root()
    monkeypatch.setenv("HAN_EDGE_SYNTHETIC", "some/where")
    assert str(default_synthetic_root()) == "some/where"


def test_a_video_name_with_a_printf_pattern_is_refused(tmp_path, fresh_onnx):
    from han_edge.pipeline import embed_sources

    for i in range(3):   # OpenCV would read these three as the frames of "f%d.jpg"
        cv2.imwrite(str(tmp_path / f"f{i}.jpg"), np.full((40, 20, 3), 60 * i, np.uint8))
    cv2.imwrite(str(tmp_path / "f%d.jpg"), np.zeros((40, 20, 3), np.uint8))
    (tmp_path / "b.json").write_text(json.dumps({"0": [[0, 0, 10, 10]], "2": [[0, 0, 10, 10]]}))
    with pytest.raises(HanEdgeError, match="image-sequence pattern"):
        embed_sources(fresh_onnx[1], None, tmp_path / "f%d.jpg", tmp_path / "b.json")


def test_only_printf_conversions_in_a_video_name_are_refused(tmp_path):
    from han_edge.pipeline import _check_video_name

    _check_video_name(tmp_path / "clip 100%.avi")                 # a literal '%': an ordinary video name
    for name in ("f%d.jpg", "frame_%04d.png"):
        with pytest.raises(HanEdgeError, match="image-sequence pattern"):
            _check_video_name(tmp_path / name)
