"""Hostile files and values (review rounds 2 and 3): odd destinations, lying gallery files, unchecked API arguments.

Every case ends in one ``HanEdgeError`` sentence and leaves what was on disk as it was: a FIFO, a symlink loop or
the process's own standard output is never renamed over; a gallery file whose scalars have the wrong type or whose
array headers claim more bytes than the file holds is refused before anything is allocated.
"""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from han_edge import Embedder, Gallery
from han_edge.errors import HanEdgeError
from han_edge.fileio import atomic_write_bytes, write_json
from han_edge.paths import check_destination
from tests.test_hostile_inputs import refused

X = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)


# -- A2: destinations that are not regular files -----------------------------------------------------------------
def _fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize("case, match", [
    ("fifo", "fifo is a FIFO \\(named pipe\\), not a regular file"),
    ("link to fifo", "link is a FIFO"),
    ("loop", "its symbolic links form a loop"),
    ("dangling into missing folder", "folder .*missing does not exist"),
])
def test_destinations_that_are_not_regular_files_are_refused_and_kept(tmp_path, case, match):
    if case == "fifo":
        path = _fifo(tmp_path)
    elif case == "link to fifo":
        path = tmp_path / "link"
        path.symlink_to(_fifo(tmp_path))
    elif case == "loop":
        path, other = tmp_path / "a.json", tmp_path / "b.json"
        path.symlink_to(other)
        other.symlink_to(path)
    else:
        path = tmp_path / "link"
        path.symlink_to(tmp_path / "missing" / "x.json")
    before = sorted((p.name, os.lstat(p).st_mode) for p in tmp_path.iterdir())
    refused(match, check_destination, path, "report")
    refused(match, write_json, path, {"a": 1})
    refused(match, Gallery(8).save, path)
    assert sorted((p.name, os.lstat(p).st_mode) for p in tmp_path.iterdir()) == before     # nothing replaced


def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "g.npz"
    link.symlink_to(tmp_path / "real" / "g.npz")                   # dangling: the target is created
    gallery = Gallery(8)
    gallery.add(np.arange(5), X)
    gallery.save(link)
    gallery.save(link)                                             # and then replaced
    assert link.is_symlink() and len(Gallery.load(tmp_path / "real" / "g.npz")) == 5
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["g.npz"]


@pytest.mark.parametrize("stdout", ["file", "pipe"])
def test_own_standard_output_is_refused_not_replaced(tmp_path, stdout):
    # /proc/self/fd/1 is what /dev/stdout links to; a rename would replace a redirect's file (losing what was
    # printed before), and a pipe has no folder to put a temp in ("only 0 bytes is free" was the wrong cause)
    code = ("import sys; from han_edge.fileio import write_json\n"
            "print('table', flush=True)\n"
            "try:\n    write_json('/proc/self/fd/1', {'a': 1})\n"
            "except Exception as err:\n    sys.stderr.write(type(err).__name__ + ': ' + str(err))\n")
    out = tmp_path / "out.txt"
    with open(out, "w") as handle:
        done = subprocess.run([sys.executable, "-c", code], stdout=handle if stdout == "file" else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.stderr.startswith("HanEdgeError: "), done.stderr
    assert "free" not in done.stderr and "\n" not in done.stderr.strip()
    if stdout == "file":
        assert "standard output" in done.stderr and out.read_text() == "table\n"
    else:
        assert "is a FIFO" in done.stderr and done.stdout == "table\n"


def test_regular_files_still_overwrite(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_bytes(target, b"old")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


# -- C6, D1: gallery files that lie ------------------------------------------------------------------------------
def _npz(path, **changes):
    arrays = dict(format_version=np.int64(2), dim=np.int64(8), metric=np.array("l2"), feats=X, ids=np.arange(5),
                  cams=np.zeros(5, np.int64), times=np.zeros(5))
    arrays.update(changes)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("changes", [
    {"dim": np.float64(8.9)},                                                  # was read as 8
    {"dim": np.float64(8.0)},
    {"dim": np.bool_(True), "feats": X[:, :1]},                                # was read as 1
    {"format_version": np.bool_(True)},                                        # was read as version 1
    {"format_version": np.array("2")},                                         # was read as version 2
    {"format_version": np.array([2])},
    {"metric": np.array(["l2"])},
    {"metric": np.int64(2)},
])
def test_gallery_scalars_of_the_wrong_type_are_corrupt(tmp_path, changes):
    refused("is corrupt or not a han-edge gallery", Gallery.load, _npz(tmp_path / "g.npz", **changes))


def _lying_npz(path, key, shape, dtype="<f4", data=b"\0" * 64, compression=zipfile.ZIP_STORED):
    good = io.BytesIO(_npz(path).read_bytes())
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w", compression) as dst:
        for name in src.namelist():
            dst.writestr(name, header.getvalue() + data if name == f"{key}.npy" else src.read(name))
    return path


@pytest.mark.parametrize("key, shape, compression", [
    ("feats", (2**40, 8), zipfile.ZIP_STORED),                      # was: MemoryError for 32 TiB
    ("feats", (2**40, 8), zipfile.ZIP_DEFLATED),
    ("feats", (5, 2**30), zipfile.ZIP_STORED),
    ("ids", (2**50,), zipfile.ZIP_STORED),
    ("times", (2**62,), zipfile.ZIP_STORED),
])
def test_gallery_headers_claiming_more_than_the_file_holds(tmp_path, key, shape, compression):
    path = _lying_npz(tmp_path / "h.npz", key, shape, compression=compression)
    message = refused(f"gallery file .*h.npz is corrupt or not a han-edge gallery: its {key} claim",
                      Gallery.load, path)
    assert "TiB" in message or "GiB" in message or "PiB" in message or "EiB" in message, message


def test_gallery_zip_sizes_are_claims_too(tmp_path):
    # the zip directory says feats.npy holds ~4 GiB (stored): bounded by the 2 KiB archive, not believed
    path = _lying_npz(tmp_path / "z.npz", "feats", (2**27, 7))
    raw = bytearray(path.read_bytes())
    entry = raw.index(b"PK\x01\x02")                                                 # central directory
    while raw[entry + 46:entry + 46 + len(b"feats.npy")] != b"feats.npy":
        entry = raw.index(b"PK\x01\x02", entry + 4)
    raw[entry + 20:entry + 28] = (0xFFFFFFFE).to_bytes(4, "little") * 2              # compressed, uncompressed size
    path.write_bytes(bytes(raw))
    refused("z.npz is corrupt or not a han-edge gallery: its feats claim 3.5 GiB in a 1.8 KiB file", Gallery.load, path)


def test_honest_gallery_files_still_load(tmp_path):
    gallery = Gallery(8)
    gallery.add(np.arange(5), X)
    buffer = io.BytesIO()
    e = gallery.entries()
    np.savez_compressed(buffer, format_version=np.int64(2), dim=np.int64(8), metric=np.array("l2"), feats=e.feats,
                        ids=e.ids, cams=e.cams, times=e.times)
    (tmp_path / "c.npz").write_bytes(buffer.getvalue())
    assert len(Gallery.load(tmp_path / "c.npz")) == 5
    assert len(Gallery.load(_npz(tmp_path / "f.npz", format_version=np.float64(2.0)))) == 5
    assert len(Gallery.load(_npz(tmp_path / "u.npz", dim=np.uint8(8), format_version=np.int32(1)))) == 5


# -- D2, D3: Gallery.remove and Gallery.distances ----------------------------------------------------------------
def _gallery():
    gallery = Gallery(8)
    gallery.add(np.arange(5), X)
    return gallery


def test_remove_with_a_ragged_list(tmp_path):
    gallery = _gallery()
    refused("ids: id 0 is a list of 2, not an integer", gallery.remove, [[1, 2], [3]])
    refused("ids must be 1-D", gallery.remove, np.array([[1, 2]]))
    assert len(gallery) == 5
    assert gallery.remove(np.int64(1)) == 1 and gallery.remove(2) == 1 and gallery.remove(np.array(3)) == 1
    assert gallery.remove([4, 0]) == 2 and len(gallery) == 0


@pytest.mark.parametrize("args, match", [
    ((np.ones((1, 9)),), "queries must have shape \\(N, 8\\); got \\(1, 9\\)"),
    ((X, np.ones((2, 3))), "features must have shape \\(N, 8\\); got \\(2, 3\\)"),
    ((np.full((1, 8), np.nan),), "queries: NaN or infinite values in row 0"),
    ((X, np.full((2, 8), np.inf)), "features: NaN or infinite values in rows 0, 1"),
    ((np.ones(8),), "queries must have shape \\(N, 8\\); got \\(8,\\)"),
    (("abc",), "queries must be an \\(N, 8\\) array of numbers"),
    ((np.ones((1, 8), complex),), "queries must hold real numbers"),
])
def test_distances_validates_like_search(args, match):
    refused(match, _gallery().distances, *args)


def test_distances_still_match_search():
    gallery = _gallery()
    ids, dist = gallery.search(X, k=5)
    full = gallery.distances(X)
    assert full.shape == (5, 5) and np.allclose(np.sort(full, axis=1), dist, atol=1e-2)
    assert np.allclose(gallery.distances(X[:2], X.astype(np.float64)), full[:2], atol=1e-5)


# -- B3, D7: Embedder options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1025, 10**6, 2**40, 2**70])
def test_threads_are_bounded_like_the_cli(tmp_path, threads):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")                    # refused before the file is opened
    refused(f"threads must be a whole number >= 0 and at most 1024 .*; got {threads}", Embedder, model, threads=threads)


def test_threads_bound_applies_to_the_backend_too(tmp_path):
    from han_edge.backends.onnxruntime import OnnxRuntimeBackend

    refused("threads must be a whole number >= 0 and at most 1024", OnnxRuntimeBackend, tmp_path / "m.onnx", threads=10**6)
    refused("threads must be a whole number", OnnxRuntimeBackend, tmp_path / "m.onnx", threads=1.5)


@pytest.mark.parametrize("device, match", [
    ("meta", "unknown PyTorch device 'meta'; use 'cpu', 'cuda' or 'cuda:N'"),     # was: NotImplementedError later
    ("mps", "unknown PyTorch device 'mps'"),                                       # was: RuntimeError
    ("CPU", "unknown PyTorch device 'CPU'"),
    ("cuda:x", "unknown PyTorch device 'cuda:x'"),
    (True, "unknown PyTorch device True"),
    (1.0, "unknown PyTorch device 1.0"),
    ("", "unknown PyTorch device ''"),
])
def test_pytorch_devices_outside_cpu_and_cuda(tmp_path, device, match):
    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(b"refused before the file is read")
    refused(match, Embedder, checkpoint, device=device)


def test_pytorch_device_number_means_cuda(tmp_path):
    import torch

    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(b"refused before the file is read")
    if torch.cuda.is_available():                         # a number is a CUDA device, as torch reads it
        refused("device 99 means cuda:99", Embedder, checkpoint, device=99)
    else:                                                 # was: silently the CPU
        refused("device 0 means cuda:0, which needs PyTorch with CUDA and an NVIDIA GPU", Embedder, checkpoint,
                device=0)
    refused("unknown PyTorch device -1", Embedder, checkpoint, device=-1)



def test_a_fifo_given_as_an_input_file_is_named_as_such(tmp_path):
    from han_edge.checkpoint import load_checkpoint
    from han_edge.formats import format_of
    from han_edge.onnx_io import load_onnx

    for name, read in (("m.onnx", format_of), ("m2.onnx", load_onnx), ("c.pt", load_checkpoint), ("g.npz", Gallery.load)):
        os.mkfifo(tmp_path / name)
        with pytest.raises(HanEdgeError, match=rf"{name} is not a regular file"):
            read(tmp_path / name)
    with pytest.raises(HanEdgeError, match="missing.onnx not found"):
        load_onnx(tmp_path / "missing.onnx")


# -- round 3: lock files, over-long names, checkpoints, archives NumPy never writes, array subclasses, huge frames --
@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink"])
def test_a_lock_file_that_is_not_a_file_is_refused_without_waiting(tmp_path, kind):
    from han_edge.paths import folder_lock

    lock, outside = tmp_path / ".han-edge.lock", tmp_path.parent / f"{tmp_path.name}-outside.txt"
    {"fifo": lambda: os.mkfifo(lock), "folder": lock.mkdir, "symlink": lambda: lock.symlink_to(outside)}[kind]()
    with pytest.raises(HanEdgeError, match="lock file .* is not a regular file; remove it"):   # open() hung on a FIFO
        with folder_lock(tmp_path, "export folder"):
            pass
    assert not outside.exists()                                   # the link's target was not created


LONG = "a" * 300   # over NAME_MAX: Path.is_file() raises instead of answering


@pytest.mark.parametrize("call", ["onnx", "pt", "plan", "gallery", "checkpoint"])
def test_over_long_file_names_are_one_short_sentence(tmp_path, call):
    from han_edge.checkpoint import load_checkpoint

    name = tmp_path / f"{LONG}.{ {'gallery': 'npz', 'checkpoint': 'pt'}.get(call, call)}"
    fn = {"gallery": Gallery.load, "checkpoint": load_checkpoint}.get(call, Embedder)
    message = refused("the file name is too long", fn, name)
    assert len(message) < 250 and "..." in message                 # the name is shortened, not printed whole


def test_checkpoint_api_refuses_wrong_types_and_state_it_could_not_load(tmp_path):
    from han_edge.checkpoint import load_checkpoint, save_checkpoint
    from han_edge.config import get_config
    from han_edge.model import build_model

    config = get_config("small")
    model, path = build_model(config), tmp_path / "run.pt"
    save_checkpoint(path, model, config, epoch=1, history=[{"loss": 1.0}])
    before = path.read_bytes()
    for name in (None, 5, b"run.pt", ""):
        refused("a checkpoint name must be a non-empty str or Path", load_checkpoint, name)
    refused("needs a HAN model and its HANConfig", save_checkpoint, path, model, None)
    refused("needs a HAN model and its HANConfig", save_checkpoint, path, None, config)
    for state in (object(), lambda: 1):    # written before, then refused by load_checkpoint; now never written
        refused("not written: the training state given holds Python objects", save_checkpoint, path, model, config,
                extra=state)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.pt"]
    assert load_checkpoint(path)["epoch"] == 1
    for content in (os.urandom(64), b"\xff\xd8\xff\xe0 a JPEG", b"hello world"):   # was "it holds Python objects"
        (tmp_path / "other.pt").write_bytes(content)
        refused("not a file written by torch.save", load_checkpoint, tmp_path / "other.pt")


def test_gallery_archive_members_compressed_as_numpy_never_writes_are_refused(tmp_path):
    gallery = Gallery(dim=8)
    gallery.add(np.arange(5), X)
    gallery.save(tmp_path / "g.npz")
    with zipfile.ZipFile(tmp_path / "g.npz") as src, zipfile.ZipFile(tmp_path / "bz.npz", "w", zipfile.ZIP_BZIP2) as dst:
        for info in src.infolist():        # bzip2 has no bound on expansion to check a lying header against
            dst.writestr(info.filename, src.read(info))
    refused(r"is not a han-edge gallery: .* compressed with a method han-edge never writes \(bzip2\)", Gallery.load,
            tmp_path / "bz.npz")


def test_array_subclasses_are_plain_arrays_or_refused(fresh_onnx):
    gallery = Gallery(dim=8)
    gallery.add(np.arange(5), X)
    ids, dists = gallery.search(np.asmatrix(X[:2]), k=2)            # was a NumPy error (matrix products)
    want_ids, want_dists = gallery.search(X[:2], k=2)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(dists, want_dists)
    refused("masked array with masked values", gallery.search, np.ma.masked_array(X[:1], mask=X[:1] > 0), 1)
    emb, frame = Embedder(fresh_onnx[1]), np.random.default_rng(1).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    boxes = [[0, 0, 40, 100], [10, 5, 80, 110]]
    np.testing.assert_allclose(emb.embed_frame(frame, np.asmatrix(boxes)), emb.embed_frame(frame, boxes), atol=1e-6)


def test_frames_larger_than_any_camera_are_refused(fresh_onnx):
    emb = Embedder(fresh_onnx[1])
    huge = np.broadcast_to(np.uint8(5), (40_000, 40_000, 3))     # zero strides: 4.8 GB that OpenCV would copy (or crash)
    refused("40000 x 40000 pixels; han-edge takes at most 32768 on a side", emb.embed_frame, huge, [[0, 0, 100, 100]])
    refused("crop 0 is 2 x 40000 pixels", emb.embed_crops, [np.broadcast_to(np.uint8(5), (40_000, 2, 3))])


@pytest.mark.parametrize("index", ["exact", "faiss"])
def test_cosine_distances_hold_for_large_feature_norms(index):
    if index == "faiss":
        pytest.importorskip("faiss")
    feats = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], np.float32) * 1e10   # |q|^2 |g|^2 = 1e40 > float32
    gallery = Gallery(dim=4, metric="cosine", index=index)
    gallery.add([1, 2, 3], feats)
    ids, dists = gallery.search(feats[:1], k=3)                                       # was: all 1, insertion order
    np.testing.assert_array_equal(ids, [[1, 3, 2]])
    np.testing.assert_allclose(dists, [[0, 1 - 2 ** -0.5, 1]], atol=1e-6)
    np.testing.assert_allclose(gallery.distances(feats[:1]), [[0, 1, 1 - 2 ** -0.5]], atol=1e-6)


def test_names_with_a_nul_byte_are_one_sentence(tmp_path, fresh_onnx):
    from han_edge.fold import fold_file
    from han_edge.preprocess import load_image
    from han_edge.triton import write_repository

    gallery = Gallery(dim=8)
    gallery.add([1], X[:1])
    for fn, args in [(load_image, ("a\0b.jpg",)), (gallery.save, ("a\0b.npz",)), (Gallery.load, ("a\0b.npz",)),
                     (fold_file, ("a\0.onnx",)), (Embedder, ("a\0.onnx",)), (write_repository, (fresh_onnx[1], "r\0i")),
                     (check_destination, (str(tmp_path / "a\0b"),))]:
        refused("NUL byte|cannot read image", fn, *args)                        # were ValueError: embedded null byte


@pytest.mark.parametrize("content", ["[" * 200_000 + "]" * 200_000, json.dumps({"seed": 1, "junk": "A" * 5_000_000})])
def test_a_synthetic_marker_too_deep_or_too_large_is_damaged_in_one_short_sentence(tmp_path, content):
    from han_edge.synthetic import ensure_synthetic

    (tmp_path / "synthetic.json").write_text(content)
    message = refused("synthetic.json is damaged", ensure_synthetic, tmp_path)   # RecursionError; a 5 MB message
    assert len(message) < 300


def test_match_names_the_query_file_when_its_width_differs(tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app

    small, wide = Gallery(dim=8), Gallery(dim=16)
    small.add([1], X[:1])
    wide.add([1], np.ones((1, 16), np.float32))
    small.save(tmp_path / "q.npz")
    wide.save(tmp_path / "g.npz")
    result = CliRunner().invoke(app, ["match", "--gallery", str(tmp_path / "g.npz"), "--query", str(tmp_path / "q.npz")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "q.npz holds 8-D features and gallery" in text and "16-D" in text, text


def test_outputs_that_link_to_the_input_model_are_refused(tmp_path, fresh_onnx):
    from han_edge.deepstream import write_configs
    from han_edge.fold import fold_file

    model = tmp_path / "han_small.onnx"
    model.write_bytes(fresh_onnx[1].read_bytes())
    before = model.read_bytes()
    (tmp_path / "han_small.folded.onnx").symlink_to("han_small.onnx")      # fold's default output name
    refused("is the input .* under another name", fold_file, model)
    (tmp_path / "ds").mkdir()
    os.link(model, tmp_path / "ds" / "config_infer_secondary_han_small.txt")   # a hard link this time
    refused("nvinfer config .* is the input", write_configs, model, tmp_path / "ds")
    assert model.read_bytes() == before                                      # was replaced by the folded model


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_export_destinations_are_checked_before_any_work(tmp_path, kind):
    from han_edge.jobs import ExportOptions, export_all

    target = tmp_path / "han_small.onnx"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()    # a FIFO was replaced; a folder failed after the export
    refused(f"export file {target} is a", export_all, ExportOptions(out_dir=str(tmp_path)), log=lambda *_: None)
    assert (target.is_fifo() if kind == "fifo" else target.is_dir())
    assert not list(tmp_path.glob(".han-edge-export-*"))


def test_export_never_writes_through_a_link_to_its_checkpoint_nor_starts_before_every_file_is_checked(tmp_path):
    from han_edge.checkpoint import save_checkpoint
    from han_edge.config import get_config
    from han_edge.jobs import ExportOptions, export_all
    from han_edge.model import build_model

    config = get_config("small")
    checkpoint = tmp_path / "ck.pt"
    save_checkpoint(checkpoint, build_model(config), config, epoch=1)
    before = checkpoint.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "han_small.fp16.onnx").symlink_to(checkpoint)                 # the FP16 file was written through it
    refused("export file .*han_small.fp16.onnx is the input .*ck.pt under another name", export_all,
            ExportOptions(checkpoint=str(checkpoint), fp16=True, out_dir=str(out)), log=lambda *_: None)
    assert checkpoint.read_bytes() == before
    (out / "han_small.onnx").write_bytes(b"the previous export")
    (out / "han_small.int8-cpu.calib.json").mkdir()                      # failed only after calibrating, FP32 replaced
    refused("export file .*calib.json is a directory", export_all,
            ExportOptions(int8=True, int8_target="cpu", out_dir=str(out)), log=lambda *_: None)
    assert (out / "han_small.onnx").read_bytes() == b"the previous export"
