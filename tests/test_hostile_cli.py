"""Hostile input through the CLI: every bad option, path or file is exit 2 (3: missing dependency), one sentence,
no traceback, nothing written, and refused before any long work starts.

``refused`` runs ``han_edge.cli.app`` in-process (CliRunner); a few cases go through the real entry point
(``python -m han_edge.cli``) in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from han_edge import fileio, paths
from han_edge.cli import app
from han_edge.cli.common import HanEdgeGroup
from han_edge.config import get_config, model_metadata

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
BOX = str.maketrans("", "", "│╭╮╰╯─")


def message_of(output: str) -> str:
    """The error sentence: the `error:`/`missing:` line, or the text inside Click's usage-error panel."""
    lines = [line for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("error:", "missing:", "engine not built:")):
            return line.split(":", 1)[1].strip()
    panel = [line.translate(BOX).strip() for line in lines if line.startswith("│")]
    return " ".join(p for p in panel if p)


def one_sentence(text: str) -> bool:
    return bool(text) and not re.search(r"[.!?]\s+[A-Z]", text.rstrip(".")) and len(text) < 400


def refused(args, match=None, code=2, **kwargs) -> str:
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    output = result.output
    assert result.exit_code == code, f"exit {result.exit_code}: {output}{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)        # no exception escaped
    assert "Traceback" not in output
    message = message_of(output)
    assert one_sentence(message), output
    if match:
        assert re.search(match, message), f"{match!r} not in {message!r}"
    return message


@pytest.fixture
def model_file(tmp_path):
    """An existing file for options that need one before the option under test is reached."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not used")
    return path


# -- option values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--batch-size", "-1"], "--batch-size"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--lr", "nan"], "--lr.*finite number above 0, not nan"),
    (["train", "--lr", "inf"], "--lr.*not inf"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "-0.1"], "--lr"),
    (["train", "--batch-size", "1"], "--batch-size.*greater than or equal to 2"),                  # BatchNorm: was a traceback
    (["train", "--lr", "1e39"], "lr must be a number above 0 up to 100"),            # SGD's float32 overflow
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--variant", "huge"], "--variant.*'huge' is not one of"),
    (["train", "--dataset", "market"], "--dataset"),
    (["eval", "--checkpoint", "{model}", "--dataset", "nope"], "--dataset"),
    (["export", "--calib-size", "-5"], "--calib-size"),
    (["export", "--target", "tensorrtt"], "--target.*not one of 'tensorrt', 'cpu'"),
    (["export", "--calibration", "entrpy"], "--calibration.*not one of"),
    (["export", "--variant", "xl"], "--variant"),
    (["export", "--max-batch", "0"], "--max-batch"),
    (["export", "--opt-batch", "64", "--max-batch", "16"], "--opt-batch 64 is larger than --max-batch 16"),
    (["export", "--workspace", "0"], "--workspace"),
    (["build", "{model}", "--max-batch", "-1"], "--max-batch"),
    (["build", "{model}", "--opt-batch", "0"], "--opt-batch"),
    (["build", "{model}", "--workspace", "-5"], "--workspace"),
    (["bench", "--engine", "{model}", "--batch", "-1"], "batch size -1 is outside 1..4096"),
    (["bench", "--engine", "{model}", "--batch", "abc"], "'abc' is not a whole number"),
    (["bench", "--engine", "{model}", "--batch", "0"], "batch size 0 is outside"),
    (["bench", "--engine", "{model}", "--batch", ""], "give at least one batch size"),
    (["bench", "--engine", "{model}", "--batch", "1,,8"], "empty entry"),
    (["bench", "--engine", "{model}", "--batch", "100000"], "100000 is outside 1..4096"),
    (["bench", "--engine", "{model}", "--batch", "1_0"], "'1_0' is not a whole number"),         # int() reads 10
    (["bench", "--engine", "{model}", "--batch", "\u0663"], "is not a whole number"),              # Arabic-Indic 3
    (["triton", "{model}", "--repo", "r", "--preferred", "\u0663"], "is not a whole number"),
    (["deepstream", "{model}", "--out", "d", "--person-class", "1_0"], "--person-class .* whole numbers"),
    (["fold", "{model}", "--out", "f/a.txt"], "give --out a name ending in .onnx"),
    (["export", "--target", "cpu", "--int8-exclude", "stem"], "--target, --int8-exclude only apply with --int8"),
    (["bench", "--engine", "{model}", "--iters", "0"], "--iters"),
    (["bench", "--engine", "{model}", "--iters", "-3"], "--iters"),
    (["bench", "--engine", "{model}", "--gallery-size", "-1"], "--gallery-size"),
    (["bench", "--engine", "{model}", "--threads", "-1"], "--threads"),
    (["profile", "cost", "--model", "{model}", "--batch", "0"], "--batch"),
    (["profile", "cost", "--model", "{model}", "--iters", "0"], "--iters"),
    (["profile", "flops", "--variant", "tiny"], "--variant"),
    (["match", "--gallery", "{model}", "--query", "{model}", "-k", "0"], "-k"),
    (["match", "--gallery", "{model}", "--query", "{model}", "-k", "abc"], "-k"),
    (["demo", "--epochs", "-1"], "--epochs"),
    (["demo", "--batch", "0"], "--batch"),
])
def test_bad_option_values(tmp_path, model_file, args, match):
    before = set(os.listdir(tmp_path))
    refused([a.replace("{model}", str(model_file)) for a in args], match, catch_exceptions=True)
    assert set(os.listdir(tmp_path)) == before                    # nothing written


def test_bench_threads_for_a_backend_without_them_is_refused_not_ignored(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"never read")    # the option is refused before the file is opened
    refused(["bench", "--model", tmp_path / "m.pt", "--threads", "2"], r"pytorch models take no option\(s\) \['threads'\]")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="0123456789,-+ .xe", max_size=12))
def test_bench_batch_list_is_parsed_or_refused_in_one_sentence(model_file, text):
    from han_edge.cli.common import batch_list

    try:
        sizes = batch_list(text)
    except typer.BadParameter as err:
        assert one_sentence(str(err)), str(err)
        return
    assert sizes and all(1 <= s <= 4096 for s in sizes) and len(set(sizes)) == len(sizes)


def test_typos_are_refused_before_the_export(tmp_path):
    # refused while parsing: no FP32 export (11 s) first, no ONNX written
    refused(["export", "--int8", "--target", "cpux", "--out", tmp_path / "e"], "--target")
    refused(["export", "--int8", "--calibration", "minmax2", "--out", tmp_path / "e"], "--calibration")
    refused(["export", "--int8", "--out", tmp_path / "e", "--opt-batch", "65"], "--opt-batch 65 is larger than --max-batch 64")
    for steps in ("-1", "100001", "2.5", "many"):
        refused(["export", "--int8", "--int8-finetune", steps, "--out", tmp_path / "e"], "--int8-finetune")
    for text, match in ((",,", "has an empty entry"), ("stem,,global_fc", "has an empty entry"), ("stem,stem", "twice")):
        refused(["export", "--int8", "--int8-exclude", text, "--out", tmp_path / "e"], match)
    assert not list(tmp_path.rglob("*.onnx"))


def test_export_problems_found_late_keep_the_previous_model(tmp_path):
    """A typo in a group name or a calibration folder of junk is found after the FP32 export: the old file stays."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "han_small.onnx").write_bytes(b"the user's previous export")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    refused(["export", "--int8", "--no-engine", "--int8-exclude", "stem, bogus", "--out", out],
            r"unknown layer groups \['bogus'\]")
    refused(["export", "--int8", "--no-engine", "--int8-exclude", "global_fc", "--out", out],   # always float
            r"unknown layer groups \['global_fc'\].*embedding heads .* are never quantised")
    refused(["export", "--int8", "--no-engine", "--calib", tmp_path / "junk", "--out", out], "cannot read image")
    assert (out / "han_small.onnx").read_bytes() == b"the user's previous export"
    assert sorted(p.name for p in out.iterdir()) == [".han-edge.lock", "han_small.onnx"]   # no staging folder left
    from han_edge.paths import folder_lock

    with folder_lock(out, "export folder"):   # another export writing there: refused, nothing touched
        refused(["export", "--no-engine", "--out", out], "another han-edge process is writing into export folder")
    assert (out / "han_small.onnx").read_bytes() == b"the user's previous export"


# -- output paths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option_args", [
    ["train", "--out", "{dir}"],
    ["visualize", "--checkpoint", "{file}", "--image", "{file}", "--out", "{dir}"],
    ["eval", "--checkpoint", "{file}", "--json", "{dir}"],
    ["bench", "--engine", "{file}", "--json", "{dir}"],
    ["profile", "cost", "--model", "{file}", "--json", "{dir}"],
    ["match", "--gallery", "{file}", "--query", "{file}", "--json", "{dir}"],
    ["embed", "--engine", "{file}", "--images", "{dir}", "--out", "{dir}"],
    ["build", "{file}", "--engine", "{dir}"],
    ["export", "--json", "{dir}"],
])
def test_output_that_is_a_directory(tmp_path, model_file, option_args):
    args = [a.replace("{dir}", str(tmp_path)).replace("{file}", str(model_file)) for a in option_args]
    refused(args, "is a directory; give a file name")


def test_output_under_a_file_or_read_only(tmp_path, model_file, monkeypatch):
    refused(["train", "--out", model_file / "x.pt"], "is not a folder|exists and is not a folder")
    refused(["demo", "--workdir", model_file], "demo --workdir .* exists and is not a folder")
    refused(["export", "--out", model_file], "exists and is not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != ro)    # root ignores chmod: simulate
    refused(["train", "--out", ro / "x.pt"], "folder .*ro is read-only")
    refused(["eval", "--checkpoint", model_file, "--json", ro / "r.json"], "read-only")


def test_missing_output_folders_are_created(tmp_path, model_file):
    from han_edge.cli.common import output_file

    from types import SimpleNamespace

    target, ctx = tmp_path / "new" / "deeper" / "r.json", SimpleNamespace(meta={})
    assert output_file("JSON report")(ctx, SimpleNamespace(name="as_json"), target) == target
    assert target.parent.is_dir() and not target.exists() and ctx.meta["han_edge.outputs"] == {"as_json": target}


def test_full_disk_while_writing_a_report_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    report = tmp_path / "flops.json"
    from han_edge.cli.common import write_json

    write_json(report, {"old": True})

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio.os, "replace", full)
    probe = typer.Typer(cls=HanEdgeGroup)

    @probe.command()
    def save():
        write_json(report, {"old": False})

    @probe.command()
    def other():
        pass
    result = runner.invoke(probe, ["save"])
    assert result.exit_code == 2 and "no space left on the device; the previous file is unchanged" in result.output
    assert json.loads(report.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["flops.json"]


@pytest.mark.parametrize("error, code, match", [
    (OSError(5, "Input/output error", "/data/x.jpg"), 2, "cannot use /data/x.jpg: input/output error"),
    (MemoryError(), 2, "out of memory"),
    (IsADirectoryError(21, "Is a directory", "crops"), 2, "cannot use crops: it is a directory"),
])
def test_library_errors_become_one_sentence(error, code, match):
    probe = typer.Typer(cls=HanEdgeGroup)

    @probe.command()
    def boom():
        raise error

    @probe.command()
    def other():
        pass
    result = runner.invoke(probe, ["boom"])
    assert result.exit_code == code and "Traceback" not in result.output
    assert re.search(match, message_of(result.output)), result.output


def test_unsafe_advice_is_stripped_from_any_message():
    from han_edge.cli.common import one_line

    text = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
            "succeed, but it can result in arbitrary code execution.\nPlease file an issue.")
    assert "weights_only" not in one_line(text) and "\n" not in one_line(text)
    assert "allow_pickle" not in one_line("Object arrays cannot be loaded when allow_pickle=False")
    plain = "checkpoint runs/weights_only.pt cannot be resumed: it holds no training state (pickled by trust.py)"
    assert one_line(plain) == plain                                        # names are not advice


# -- model files that lie ---------------------------------------------------------------------------------------
def test_inspect_refuses_what_is_not_a_model(tmp_path):
    refused(["inspect", tmp_path], "is a directory, not a model file")
    refused(["inspect", tmp_path / "nothing.onnx"], "not found")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(256))
    refused(["inspect", tmp_path / "junk.onnx"], "junk.onnx is not a han-edge model: not a valid ONNX model")


@pytest.mark.parametrize("kwargs, match", [
    ({"out_width": 128}, "not a han-edge model: the graph's output is Nx128 but its metadata says 1024-D"),
    ({"in_shape": ("N", 3, 256, 128)}, "not a han-edge model: the graph's input is Nx3x256x128"),
    ({"meta": {"han_edge.config": "{not json"}}, "not a han-edge model: the HAN config is not valid JSON"),
    ({"meta": {}}, "not a han-edge model: carries no han-edge metadata"),
])
def test_inspect_refuses_onnx_that_lies(tmp_path, kwargs, match):
    import onnx

    from tests.test_hostile_inputs import tiny_graph

    onnx.save(tiny_graph(**kwargs), str(tmp_path / "other.onnx"))
    refused(["inspect", tmp_path / "other.onnx"], match)


def test_inspect_accepts_a_small_honest_graph(tmp_path):
    import onnx

    from tests.test_hostile_inputs import tiny_graph

    onnx.save(tiny_graph(), str(tmp_path / "ok.onnx"))
    result = runner.invoke(app, ["inspect", str(tmp_path / "ok.onnx")])
    assert result.exit_code == 0 and "1024-D" in result.output, result.output


def test_inspect_shows_unreadable_int8_metadata_as_such(tmp_path):
    import onnx

    from tests.test_hostile_inputs import tiny_graph

    meta = {**model_metadata(get_config("small"), "fp32"), "han_edge.int8_excluded": "[not json",
            "han_edge.float_precision": "fp16", "han_edge.fp32_nodes": "{nor this"}
    onnx.save(tiny_graph(meta=meta), str(tmp_path / "odd.onnx"))
    result = runner.invoke(app, ["inspect", str(tmp_path / "odd.onnx")])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert re.search(r"kept in float\s*│\s*unreadable", result.output), result.output
    assert "FP16, FP32 nodes unreadable" in result.output, result.output


def test_inspect_plan_with_side_files(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(os.urandom(64))
    side = {"metadata": model_metadata(get_config("medium"), "fp16"), "precision": "fp16", "tensorrt": "10.3.0",
            "gpu": "Orin", "compute_capability": "8.7", "batch": {"min": 1, "opt": 8, "max": 16}}
    (tmp_path / "m.plan.json").write_text(json.dumps(side))
    result = runner.invoke(app, ["inspect", str(plan)])
    assert result.exit_code == 0 and "medium" in result.output and "1/8/16" in result.output, result.output
    (tmp_path / "m.plan.json").write_text(json.dumps({**side, "batch": {"min": 1, "opt": 8}}))
    refused(["inspect", plan], "m.plan is not a han-edge model: .*'batch' must be")
    (tmp_path / "m.plan.json").write_text(json.dumps({**side, "plan_bytes": 1}))
    refused(["inspect", plan], "does not match its metadata file")
    (tmp_path / "m.plan.json").unlink()
    refused(["inspect", plan], "no metadata file m.plan.json")


def test_checkpoint_payloads_are_refused_in_safe_words(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Boom()}))
    image = tmp_path / "i.png"
    import cv2

    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    message = refused(["visualize", "--checkpoint", evil, "--image", image, "--out", tmp_path / "a.png"],
                      "cannot be read as a han-edge checkpoint: it holds Python objects")
    assert "weights_only" not in message
    refused(["visualize", "--checkpoint", evil, "--image", image, "--out", tmp_path / "a.jpg"], "PNG")
    refused(["train", "--resume", evil, "--out", tmp_path / "x.pt"], "Python objects")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "x.pt").exists()


def test_eval_json_that_is_not_a_report(tmp_path, model_file):
    bad = tmp_path / "r.json"
    bad.write_bytes(b"\xff")
    refused(["profile", "cost", "--model", model_file, "--eval-json", bad], "is not a JSON report")
    bad.write_text(json.dumps({"rank1": "high"}))
    refused(["profile", "cost", "--model", model_file, "--eval-json", bad], "no rank1 between 0 and 1")


# -- inputs: boxes files through embed ---------------------------------------------------------------------------
@pytest.mark.parametrize("raw, match", [
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "must hold one object"),
    (b'{"f0.png": "0 0 10 10"}', "key 'f0.png'"),
    (b'{"f0.png": [[0, 0, 10]]}', "box 0 has 3 values"),
    (b'{"f0.png": [[0, 0, "a", 10]]}', "box 0 coordinate 2"),
    (b'{"f0.png": 3}', "got 3"),
])
def test_embed_with_malformed_boxes(tmp_path, fresh_onnx, raw, match):
    import cv2

    _, onnx_path = fresh_onnx
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames" / "f0.png"), np.zeros((64, 32, 3), np.uint8))
    (tmp_path / "boxes.json").write_bytes(raw)
    refused(["embed", "--engine", onnx_path, "--images", tmp_path / "frames", "--boxes", tmp_path / "boxes.json",
             "--out", tmp_path / "g.npz"], match)
    assert not (tmp_path / "g.npz").exists()


def test_boxes_keyed_by_a_name_two_subfolders_share_are_refused(tmp_path, fresh_onnx):
    import cv2

    from han_edge.gallery import Gallery

    _, onnx_path = fresh_onnx
    for cam in ("cam1", "cam2"):
        (tmp_path / "dup" / cam).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "dup" / cam / "f.png"), np.zeros((64, 32, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "dup" / "solo.png"), np.zeros((64, 32, 3), np.uint8))
    args = ["embed", "--engine", onnx_path, "--images", tmp_path / "dup", "--boxes", tmp_path / "b.json",
            "--out", tmp_path / "g.npz"]
    (tmp_path / "b.json").write_text('{"f.png": [[0, 0, 20, 40]]}')
    refused(args, r"key 'f.png' matches 2 images under .*cam1/f.png.*cam2/f.png.*by the path")
    assert not (tmp_path / "g.npz").exists()
    # by path under the folder, or by a name only one image has: one box each, no other image embedded
    (tmp_path / "b.json").write_text('{"cam2/f.png": [[0, 0, 20, 40]], "solo.png": [[0, 0, 10, 10]]}')
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert len(Gallery.load(tmp_path / "g.npz")) == 2
    (tmp_path / "b.json").write_text('{"cam3/f.png": [[0, 0, 20, 40]]}')
    refused(args, "names 1 image not among the images in")


def test_embed_needs_exactly_one_source(tmp_path, model_file):
    refused(["embed", "--engine", model_file, "--out", tmp_path / "g.npz"], "exactly one of --images DIR or --video")
    refused(["embed", "--engine", model_file, "--images", tmp_path / "missing", "--out", tmp_path / "g.npz"],
            "--images")


# -- the real entry point -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, code, match", [
    (["inspect", "{tmp}"], 2, "is a directory"),
    (["train", "--lr", "nan"], 2, "--lr"),
    (["bench", "--engine", "{tmp}/m.onnx", "--batch", "abc"], 2, "not a whole number"),
    (["build", "{tmp}/m.onnx", "--engine", "{tmp}/m.plan"], 3, "TensorRT"),
])
def test_entry_point_in_a_subprocess(tmp_path, args, code, match):
    import importlib.util

    if code == 3 and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the build would run")
    import onnx

    from tests.test_hostile_inputs import tiny_graph

    onnx.save(tiny_graph(), str(tmp_path / "m.onnx"))          # an honest model: what is missing is TensorRT
    proc = subprocess.run([sys.executable, "-m", "han_edge.cli", *[a.replace("{tmp}", str(tmp_path)) for a in args]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert "Traceback" not in output and re.search(match, output), output
    assert one_sentence(message_of(output)), output


def test_resume_from_a_checkpoint_without_training_state(tmp_path, synthetic_root):
    from han_edge.checkpoint import save_checkpoint
    from han_edge.model import build_model

    model = build_model("small", 100)
    save_checkpoint(tmp_path / "weights_only.pt", model, model.config, epoch=2)
    refused(["train", "--resume", tmp_path / "weights_only.pt", "--epochs", "3", "--out", tmp_path / "x.pt"],
            "cannot be resumed: it holds no training state \\(optimizer, scheduler, loader_rng, torch_rng\\)")
    assert not (tmp_path / "x.pt").exists()


# -- an output that is one of the inputs ----------------------------------------------------------------------
@pytest.mark.parametrize("make_args, output, match", [
    (lambda d: ["embed", "--engine", d / "m.onnx", "--images", d, "--out", d / "m.onnx"], "m.onnx", "--out .* is the --engine input"),
    (lambda d: ["embed", "--engine", d / "m.onnx", "--images", d, "--boxes", d / "b.json", "--out", d / "b.json"], "b.json",
     "--out .* is (the --boxes input|a file inside the --images input folder)"),
    (lambda d: ["match", "--gallery", d / "g.npz", "--query", d / "q.npz", "--json", d / "g.npz"], "g.npz", "--json .* --gallery"),
    (lambda d: ["match", "--gallery", d / "g.npz", "--query", d / "q.npz", "--json", d / "q.npz"], "q.npz", "--json .* --query"),
    (lambda d: ["profile", "cost", "--model", d / "m.onnx", "--json", d / "m.onnx"], "m.onnx", "--json .* --model"),
    (lambda d: ["bench", "--engine", d / "m.onnx", "--json", d / "link.onnx"], "m.onnx", "--json .*link.onnx is the --engine"),
    (lambda d: ["fold", d / "m.onnx", "--out", d / "hard.onnx"], "m.onnx", "--out .* is the model input"),
    (lambda d: ["eval", "--checkpoint", d / "ck.pt", "--json", d / "ck.pt"], "ck.pt", "--json .* --checkpoint"),
    (lambda d: ["export", "--checkpoint", d / "ck.pt", "--json", d / "ck.pt"], "ck.pt", "--json .* --checkpoint"),
    (lambda d: ["visualize", "--checkpoint", d / "ck.pt", "--image", d / "i.png", "--out", d / "i.png"], "i.png", "--out"),
    (lambda d: ["build", d / "m.onnx", "--engine", d / "m.onnx"], "m.onnx", "--engine .* is the onnx_path input"),
])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, make_args, output, match):
    for name in ("m.onnx", "b.json", "g.npz", "q.npz", "ck.pt", "i.png"):
        (tmp_path / name).write_bytes(f"the user's {name}".encode())
    (tmp_path / "link.onnx").symlink_to(tmp_path / "m.onnx")
    os.link(tmp_path / "m.onnx", tmp_path / "hard.onnx")
    refused(make_args(tmp_path), match)
    assert (tmp_path / output).read_bytes() == f"the user's {output}".encode()


def test_resume_may_write_back_to_its_own_checkpoint(tmp_path):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"not a checkpoint")
    message = refused(["train", "--resume", ck, "--out", ck, "--epochs", "0"])
    assert "is the --resume input" not in message and "ck.pt" in message   # refused for its content instead


def test_export_without_engine_leaves_no_engines_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "--no-engine", "--out", "ex"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ex" / "han_small.onnx").is_file() and not (tmp_path / "engines").exists()
    (tmp_path / "a_file").write_text("")
    refused(["export", "--engines", tmp_path / "a_file" / "e", "--out", "ex"], "--engines folder .* not a writable folder")
    assert not (tmp_path / "a_file" / "e").exists()


def test_train_without_steps_says_so(tmp_path, synthetic_root):
    result = runner.invoke(app, ["train", "--root", str(synthetic_root), "--epochs", "0", "--out", str(tmp_path / "c.pt")])
    assert result.exit_code == 0, result.output
    assert "no training steps" in result.output and "nan" not in result.output


def test_demo_does_not_overwrite_a_folder_it_did_not_make(tmp_path):
    workdir = tmp_path / "runs"
    workdir.mkdir()
    (workdir / "han_small.pt").write_bytes(b"my trained checkpoint")
    refused(["demo", "--epochs", "0", "--workdir", workdir], "already holds files the demo did not write")
    assert (workdir / "han_small.pt").read_bytes() == b"my trained checkpoint"
    assert sorted(p.name for p in workdir.iterdir()) == ["han_small.pt"]


def test_an_output_over_an_image_of_an_input_folder_is_refused(tmp_path, fresh_onnx):
    import cv2

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"0001_c1s1_00000{i}_00.jpg"), np.full((64, 32, 3), 40 * i, np.uint8))
    victim = images / "0001_c1s1_000000_00.jpg"
    before = victim.read_bytes()
    refused(["embed", "--engine", fresh_onnx[1], "--images", images, "--out", victim],      # was: exit 0, JPEG -> npz
            "--out .* is a file inside the --images input folder")
    assert victim.read_bytes() == before
    for _ in range(2):    # a gallery beside the images, written again by a rerun: fine (the embedder reads no .npz)
        result = runner.invoke(app, ["embed", "--engine", str(fresh_onnx[1]), "--images", str(images),
                                     "--out", str(images / "features.npz")])
        assert result.exit_code == 0, result.output


def test_an_output_over_a_data_set_file_is_refused(tmp_path, fresh_onnx):
    root = tmp_path / "set"
    (root / "gallery" / "1").mkdir(parents=True)
    (root / "list_query.txt").write_text("the data set's own list")
    refused(["eval", "--checkpoint", fresh_onnx[1], "--dataset", "imagefolder", "--root", root,   # was replaced by JSON
             "--json", root / "list_query.txt"], "--json .* is a file inside the --root input folder")
    assert (root / "list_query.txt").read_text() == "the data set's own list"


def test_reruns_with_reports_in_their_own_output_folders_are_not_refused(tmp_path, fresh_onnx, synthetic_root):
    """Output folders and plain string options are no input folders (a rerun was refused as writing into one)."""
    (tmp_path / "small").mkdir()                                   # a folder named like the --variant value
    for _ in range(2):
        for args in (["triton", fresh_onnx[1], "--repo", tmp_path / "repo", "--json", tmp_path / "repo" / "r.json"],
                     ["deepstream", fresh_onnx[1], "--out", tmp_path / "ds", "--json", tmp_path / "ds" / "r.json"],
                     ["train", "--variant", "small", "--epochs", "0", "--root", synthetic_root,
                      "--out", tmp_path / "small" / "han.pt"]):
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, (args, result.output)
