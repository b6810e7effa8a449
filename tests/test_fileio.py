"""The atomic writer: every destination problem is one sentence, a failed write loses nothing and leaves no temp."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from han_edge import fileio, paths
from han_edge.errors import HanEdgeError
from han_edge.fileio import atomic_path, atomic_write_bytes, write_json
from han_edge.paths import check_destination, ensure_folder


def one_sentence(message: str) -> bool:
    import re

    return "\n" not in message.strip() and not re.search(r"[.!?]\s+[A-Z]", message) and "Traceback" not in message


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp" in p.name]


def refused(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(HanEdgeError, match=match) as info:
        fn(*args, **kwargs)
    assert one_sentence(str(info.value)), str(info.value)
    return str(info.value)


def test_write_and_overwrite_keep_permissions(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask          # not mkstemp's 0600
    target.chmod(0o640)
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and target.stat().st_mode & 0o777 == 0o640
    assert temps(tmp_path) == []


@pytest.mark.parametrize("case, match", [
    ("dir", "is a directory"),
    ("missing parent", "does not exist"),
    ("parent is a file", "is not a folder"),
    ("trailing slash", "ends in a path separator"),
    ("empty", "path is empty"),
    ("too long", "too long"),
])
def test_bad_destinations_are_one_sentence(tmp_path, case, match):
    (tmp_path / "file").write_text("x")
    path = {"dir": tmp_path, "missing parent": tmp_path / "no" / "such" / "x.json",
            "parent is a file": tmp_path / "file" / "x.json", "trailing slash": f"{tmp_path}/newdir/",
            "empty": "", "too long": tmp_path / ("x" * 300)}[case]
    refused(match, check_destination, path, "report")
    refused(match, atomic_write_bytes, path, b"data")
    refused(match, write_json, path, {"a": 1})
    assert temps(tmp_path) == []


def test_read_only_folder_and_file(tmp_path, monkeypatch):
    # the tests run as root, where chmod does not deny: simulate what access(2) says for a read-only mount
    target = tmp_path / "r.json"
    target.write_text("{}")
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != tmp_path)
    refused("folder .* is read-only", write_json, target, {"a": 1})
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != target)
    refused("the file is read-only", write_json, target, {"a": 1})
    assert target.read_text() == "{}"


@pytest.mark.parametrize("code, match", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                          (errno.EIO, "input/output error")])
def test_failed_rename_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch, code, match):
    report = tmp_path / "report.json"
    write_json(report, {"rank1": 0.5})

    def fail(src, dst):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(fileio.os, "replace", fail)
    message = refused(match, write_json, report, {"rank1": 0.9})
    assert "previous file is unchanged" in message
    assert json.loads(report.read_text()) == {"rank1": 0.5}                      # the data-loss case of issue 12
    assert temps(tmp_path) == []


def test_full_disk_midway_through_the_write(tmp_path):
    target = tmp_path / "g.npz"
    target.write_bytes(b"old")
    with pytest.raises(HanEdgeError, match="no space left on the device; the previous file is unchanged"):
        with atomic_path(target, "gallery") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and temps(tmp_path) == []


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    usage = type("Usage", (), {"free": 10, "total": 100, "used": 90})
    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: usage)
    refused("needs 1000 bytes and only 10 bytes is free", atomic_write_bytes, tmp_path / "x", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_library_error_on_a_full_disk_is_a_sentence(tmp_path, monkeypatch):
    # torch.save reports ENOSPC as RuntimeError("PytorchStreamWriter failed writing file ...")
    usage = type("Usage", (), {"free": 0, "total": 100, "used": 100})
    with pytest.raises(HanEdgeError, match="no space left"):
        with atomic_path(tmp_path / "c.pt", "checkpoint") as tmp:
            tmp.write_bytes(b"partial")
            monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: usage)
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert temps(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyboardInterrupt()])
def test_other_failures_propagate_and_clean_up(tmp_path, error):
    target = tmp_path / "x.onnx"
    target.write_bytes(b"good")
    with pytest.raises(type(error)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"bad")
            raise error
    assert target.read_bytes() == b"good" and temps(tmp_path) == []


def test_temp_suffix_for_libraries_that_pick_the_format_from_the_name(tmp_path):
    import cv2

    with atomic_path(tmp_path / "pic.png", "picture", suffix=".png") as tmp:
        assert tmp.name.endswith(".png") and tmp.parent == tmp_path
        assert cv2.imwrite(str(tmp), np.zeros((4, 4, 3), np.uint8))
    assert cv2.imread(str(tmp_path / "pic.png")).shape == (4, 4, 3)
    assert temps(tmp_path) == []


def test_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    target = tmp_path / "gallery.npz"
    target.write_bytes(b"old")
    code = ("import os, signal, sys\nfrom han_edge.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 100000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=Path(__file__).parents[1])
    assert proc.returncode == -9
    (stray,) = temps(tmp_path)
    assert stray.stat().st_size == 100000 and target.read_bytes() == b"old"
    host = stray.name.split(".")[3].split("@")[1]
    live = tmp_path / f".gallery.npz.{os.getppid()}@{host}.abcd.tmp"    # a running writer's temp is left alone
    other_host = tmp_path / f".gallery.npz.{stray.name.split('.')[3].split('@')[0]}@elsewhere.abcd.tmp"
    for keep in (live, other_host):                                       # and so is another machine's
        keep.write_bytes(b"keep")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(temps(tmp_path)) == sorted([live, other_host])


def test_symlinked_destination_updates_its_target(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}


def test_write_json_is_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"loss": float("nan"), "x": np.array([1.0, np.inf]), "n": np.int64(3),
                                     "keys": {np.int64(4): np.float32(0.5)}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"loss": None, "x": [1.0, None], "n": 3,
                                                            "keys": {"4": 0.5}}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_write_json_round_trips(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("j") / "v.json"
    write_json(path, value)
    assert json.loads(path.read_text(encoding="utf-8")) == value


def test_ensure_folder(tmp_path, monkeypatch):
    assert ensure_folder(tmp_path / "a" / "b").is_dir()
    (tmp_path / "f").write_text("x")
    refused("exists and is not a folder", ensure_folder, tmp_path / "f", "--workdir")
    refused("path is empty", ensure_folder, "")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "mkdir", full)
    refused("cannot create output folder .*: no space left on the device", ensure_folder, tmp_path / "c")
