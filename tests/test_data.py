from pathlib import Path

import cv2
import numpy as np
import pytest

from han_edge.data import (load_cuhk03, load_dataset, load_image_folder, load_market_layout, load_msmt17)
from han_edge.errors import HanEdgeError
from han_edge.preprocess import load_image
from han_edge.synthetic import generate


def write_image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 8, 3), value, np.uint8))


@pytest.mark.parametrize("name,pattern", [("market1501", "{pid:04d}_c{cam}s1_000451_0{k}.jpg"),
                                          ("dukemtmc", "{pid:04d}_c{cam}_f00461{k}.jpg")])
def test_market_and_duke_layouts(tmp_path, name, pattern):
    for pid, cam, k in [(2, 1, 1), (2, 2, 2), (7, 3, 1), (7, 1, 2)]:
        write_image(tmp_path / "bounding_box_train" / pattern.format(pid=pid, cam=cam, k=k))
    write_image(tmp_path / "query" / pattern.format(pid=9, cam=1, k=1))
    write_image(tmp_path / "bounding_box_test" / pattern.format(pid=9, cam=2, k=1))
    write_image(tmp_path / "bounding_box_test" / pattern.format(pid=0, cam=2, k=3))     # distractor: kept
    write_image(tmp_path / "bounding_box_test" / ("-1" + pattern.format(pid=1, cam=2, k=4)[4:]))  # junk: dropped
    data = load_dataset(name, tmp_path)
    assert data.num_train_pids == 2
    assert sorted({pid for _, pid, _ in data.train}) == [0, 1]            # relabelled
    assert sorted(cam for _, _, cam in data.train) == [0, 0, 1, 2]        # 0-based cameras
    assert data.query[0][1:] == (9, 0)
    assert sorted(pid for _, pid, _ in data.gallery) == [0, 9]


def test_test_only_market_layout_reads_query_and_gallery_without_a_train_folder(tmp_path):
    from han_edge.data import load_market_test

    root = generate(tmp_path / "held", train_ids=0, test_ids=3, distractors=2, first_id=40)
    with pytest.raises(HanEdgeError, match="no images"):
        load_market_layout(root)                   # the full layout needs training images
    query, gallery = load_market_test(root, "held")
    assert {pid for _, pid, _ in query} == {40, 41, 42}                  # not relabelled: pids are the names'
    assert {pid for _, pid, _ in gallery} == {0, 40, 41, 42}             # distractors kept in the gallery
    assert not {p for p, _, _ in query} & {p for p, _, _ in gallery}
    with pytest.raises(HanEdgeError, match="not found"):
        load_market_test(tmp_path / "nope", "held")


def test_bad_file_name_and_missing_folders(tmp_path):
    with pytest.raises(HanEdgeError, match="not found"):
        load_market_layout(tmp_path / "nope")
    write_image(tmp_path / "bounding_box_train" / "holiday.jpg")
    (tmp_path / "query").mkdir()
    (tmp_path / "bounding_box_test").mkdir()
    with pytest.raises(HanEdgeError, match="cannot parse pid/camera from file name holiday.jpg"):
        load_market_layout(tmp_path)
    (tmp_path / "bounding_box_train" / "holiday.jpg").unlink()
    with pytest.raises(HanEdgeError, match="no images"):
        load_market_layout(tmp_path)


def test_msmt17_layout(tmp_path):
    lines = {"train": [("0000/0000_000_01_0303morning_0015_0.jpg", 0), ("0001/0001_005_03_0303noon_0010_1.jpg", 1)],
             "val": [("0002/0002_001_02_0303noon_0011_0.jpg", 2)],
             "query": [("0005/0005_000_04_0303noon_0002_0.jpg", 5)],
             "gallery": [("0005/0005_004_07_0303noon_0001_0.jpg", 5)]}
    for split, rows in lines.items():
        folder = "train" if split in ("train", "val") else "test"
        for rel, _ in rows:
            write_image(tmp_path / folder / rel)
        (tmp_path / f"list_{split}.txt").write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    data = load_msmt17(tmp_path)
    assert data.num_train_pids == 3
    assert [c for _, _, c in data.train] == [0, 2, 1]
    assert data.query[0][1:] == (5, 3) and data.gallery[0][1:] == (5, 6)
    (tmp_path / "list_query.txt").write_text("garbage\n")
    with pytest.raises(HanEdgeError, match="cannot parse line 1"):
        load_msmt17(tmp_path)


def test_cuhk03_new_protocol(tmp_path):
    from scipy.io import savemat

    names = [f"1_00{pid}_{cam}_0{k}.png" for pid, cam, k in [(1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (3, 1, 1), (3, 2, 1)]]
    for name in names:
        write_image(tmp_path / "images_labeled" / name)
    savemat(str(tmp_path / "cuhk03_new_protocol_config_labeled.mat"), {
        "filelist": np.array(names, dtype=object).reshape(-1, 1), "labels": np.array([[1], [1], [2], [2], [3], [3]]),
        "camId": np.array([[1], [2], [1], [2], [1], [2]]), "train_idx": np.array([[1], [2], [3], [4]]),
        "query_idx": np.array([[5]]), "gallery_idx": np.array([[6]])})
    data = load_cuhk03(tmp_path)
    assert data.num_train_pids == 2
    assert data.query[0][0].endswith(names[4]) and data.query[0][1:] == (3, 0)
    (tmp_path / "images_detected").mkdir()
    with pytest.raises(HanEdgeError, match="split file"):
        load_cuhk03(tmp_path, labeled=False)


def test_image_folder_layout(tmp_path):
    for split in ("train", "query", "gallery"):
        write_image(tmp_path / split / "12" / "frame_c3_0001.png")
        write_image(tmp_path / split / "40" / "x_c1.jpg")
    data = load_image_folder(tmp_path)
    assert data.num_train_pids == 2 and {c for *_, c in data.query} == {0, 2}
    write_image(tmp_path / "train" / "12" / "nocam.png")
    with pytest.raises(HanEdgeError, match="no camera"):
        load_image_folder(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(HanEdgeError, match="0001_c1s1_000001_00.jpg"):
        load_image(bad)


def test_synthetic_set_is_deterministic_and_market_layout(tmp_path):
    a = generate(tmp_path / "a", seed=3, train_ids=4, test_ids=3, distractors=2)
    b = generate(tmp_path / "b", seed=3, train_ids=4, test_ids=3, distractors=2)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((cv2.imread(str(a / f)) == cv2.imread(str(b / f))).all() for f in files_a[:10])
    data = load_market_layout(a)
    assert data.num_train_pids == 4
    assert {pid for _, pid, _ in data.query} == {5, 6, 7}
    assert 0 in {pid for _, pid, _ in data.gallery}        # distractors present, junk dropped
    # every test identity is seen by at least two cameras: queries have cross-camera matches
    for pid in {5, 6, 7}:
        assert len({c for _, p, c in data.query + data.gallery if p == pid}) >= 2
    c = generate(tmp_path / "c", seed=4, train_ids=4, test_ids=3, distractors=2)
    assert sorted(p.relative_to(c) for p in c.rglob("*.jpg")) != files_a or \
        not (cv2.imread(str(c / files_a[0])) == cv2.imread(str(a / files_a[0]))).all()


def test_unknown_dataset_and_missing_root():
    with pytest.raises(HanEdgeError, match="unknown dataset"):
        load_dataset("imagenet", None)
    with pytest.raises(HanEdgeError, match="needs --root"):
        load_dataset("market1501", None)


def test_synthetic_identities_from_first_id_are_other_people_under_the_same_cameras(tmp_path):
    base = generate(tmp_path / "base", seed=3, train_ids=2, test_ids=2, distractors=0)
    later = generate(tmp_path / "later", seed=3, train_ids=0, test_ids=2, distractors=0, first_id=3)
    same = generate(tmp_path / "same", seed=3, train_ids=0, test_ids=2, distractors=0, first_id=1)
    pids = {int(p.name[:4]) for p in later.rglob("*.jpg")}
    assert pids == {3, 4} and not any((later / "bounding_box_train").iterdir())
    # identity n is drawn from (seed, n): numbers 3-4 reproduce the base set's test people, 1-2 its training people
    for name in ("0003_c", "0004_c"):
        for f in (later / "query").glob(name + "*"):
            assert (cv2.imread(str(f)) == cv2.imread(str(base / "query" / f.name))).all()
    first = sorted((same / "query").glob("*.jpg"))[0]
    assert (cv2.imread(str(first)) == cv2.imread(str(base / "bounding_box_train" / first.name))).all()
    split = generate(tmp_path / "split", seed=3, train_ids=2, test_ids=2, distractors=0, first_id=5)
    assert {int(p.name[:4]) for p in (split / "bounding_box_train").glob("*.jpg")} == {5, 6}
    assert {int(p.name[:4]) for p in (split / "query").glob("*.jpg")} == {7, 8}
    last = generate(tmp_path / "last", train_ids=0, test_ids=2, distractors=0, first_id=9998)
    assert {int(p.name[:4]) for p in last.rglob("*.jpg")} == {9998, 9999}
    with pytest.raises(HanEdgeError, match="four digits"):
        generate(tmp_path / "big", train_ids=0, test_ids=2, first_id=9999)
    assert not (tmp_path / "big").exists()   # refused before anything is written


def test_heldout_crops_are_people_outside_the_synthetic_set(tmp_path):
    from han_edge.data import HELDOUT_SET, heldout_crops

    crops = heldout_crops(tmp_path / "held")
    pids = {int(Path(p).name[:4]) for p in crops}
    assert pids == set(range(HELDOUT_SET["first_id"], HELDOUT_SET["first_id"] + HELDOUT_SET["test_ids"]))
    marker = (tmp_path / "held" / "synthetic.json").stat().st_mtime_ns
    assert len(crops) > 1000 and crops == heldout_crops(tmp_path / "held")
    assert (tmp_path / "held" / "synthetic.json").stat().st_mtime_ns == marker   # generated once


def test_export_analysis_and_report_crops_are_disjoint_and_unseen(synthetic_root):
    from han_edge.job_data import calibration_paths, heldout_paths

    analysis, report = heldout_paths(), heldout_paths(offset=1)
    assert len(analysis) == len(report) == 512 and not set(analysis) & set(report)
    seen = load_dataset("synthetic", None)
    people = {pid for _, pid, _ in seen.query + seen.gallery}
    people |= {int(Path(p).name[:4]) for p in calibration_paths(None, 10_000)}
    assert not people & {int(Path(p).name[:4]) for p in analysis + report}


def test_heldout_folder_that_cannot_be_used_is_named_with_what_to_do(tmp_path):
    from han_edge.data import heldout_crops

    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "synthetic.json").write_text("{broken")
    with pytest.raises(HanEdgeError, match=r"held-out crops' folder .*held cannot be used .*delete or move it"):
        heldout_crops(tmp_path / "held")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HanEdgeError, match="delete or move it"):
        heldout_crops(tmp_path / "file")
    with pytest.raises(HanEdgeError, match="cannot be read or created: File name too long"):
        heldout_crops(tmp_path / ("h" * 300))
