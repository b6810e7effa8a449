"""Triton: repositories checked with Triton's own ModelConfig schema; the client backend over real gRPC.

The server is ``tests/triton_stub.py`` — tritonclient's service definitions backed by ONNX Runtime (the
only stand-in: the protocol and the client are the real ones).
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from han_edge.errors import HanEdgeError  # noqa: E402
from han_edge.onnx_io import load_onnx, onnx_metadata, ort_session  # noqa: E402
from han_edge.triton import RepoOptions, write_repository  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from triton_stub import TritonStub  # noqa: E402


def parse(path) -> model_config_pb2.ModelConfig:
    """Strict parse: an unknown field or a wrong type fails here, as it would in Triton."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(fresh_onnx, tmp_path_factory):
    """A repository with the unfolded model (han_small) and its folded form (han_small_folded)."""
    from han_edge.fold import fold_file

    _, path = fresh_onnx
    root = tmp_path_factory.mktemp("triton") / "models"
    folded = fold_file(path, tmp_path_factory.mktemp("f") / "han_small.folded.onnx")
    write_repository(path, root, RepoOptions(max_batch=8, preferred=(4, 8), instance_kind="cpu"))
    write_repository(folded, root, RepoOptions(max_batch=8, instance_kind="cpu"))
    return root


@pytest.fixture(scope="module")
def server(repo):
    with TritonStub(repo) as stub:
        yield stub


def test_onnx_config_matches_the_model(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    result = write_repository(path, tmp_path / "repo", RepoOptions(max_batch=32, queue_delay_us=250, instances=2))
    cfg = parse(result["config"])
    model = load_onnx(path)
    meta = onnx_metadata(model)
    config = json.loads(meta["han_edge.config"])
    assert cfg.name == "han_small" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert [i.name for i in cfg.input] == [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in cfg.output] == [o.name for o in model.graph.output] == ["features"]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32 == cfg.output[0].data_type
    assert list(cfg.input[0].dims) == [3, *config["input_size"]]
    assert list(cfg.output[0].dims) == [config["global_dim"] + config["local_dim"]]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for key, value in meta.items():           # every metadata entry travels as a parameter, verbatim
        assert cfg.parameters[key].string_value == value
    assert cfg.parameters["han_edge.normalization"].string_value == "external"
    assert Path(result["model"]) == tmp_path / "repo" / "han_small" / "1" / "model.onnx"
    assert Path(result["model"]).read_bytes() == Path(path).read_bytes()


def test_engine_config_takes_the_profile(fresh_onnx, tmp_path):
    """A .plan: max_batch_size and preferred sizes from its side file (the engine bytes are copied as is)."""
    _, path = fresh_onnx
    meta = onnx_metadata(load_onnx(path))
    plan = tmp_path / "han_small.fp16.plan"
    plan.write_bytes(b"engine bytes")
    Path(str(plan) + ".json").write_text(json.dumps({"metadata": {**meta, "han_edge.precision": "fp16"},
                                                     "precision": "fp16", "tensorrt": "10.9.0", "gpu": "L4", "compute_capability": "8.9",
                                                     "batch": {"min": 1, "opt": 16, "max": 48}}))
    result = write_repository(plan, tmp_path / "repo")
    cfg = parse(result["config"])
    assert cfg.platform == "tensorrt_plan" and cfg.name == "han_small_fp16"
    assert cfg.max_batch_size == 48 and list(cfg.dynamic_batching.preferred_batch_size) == [16, 48]
    assert (tmp_path / "repo" / "han_small_fp16" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert cfg.parameters["han_edge.precision"].string_value == "fp16"
    with pytest.raises(HanEdgeError, match="built for batches up to 48"):
        write_repository(plan, tmp_path / "repo2", RepoOptions(max_batch=64))
    with pytest.raises(HanEdgeError, match="runs on a GPU"):
        write_repository(plan, tmp_path / "repo3", RepoOptions(instance_kind="cpu"))
    assert not (tmp_path / "repo2").exists() and not (tmp_path / "repo3").exists()


def test_bad_repository_options(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    with pytest.raises(HanEdgeError, match="outside 1..8"):
        write_repository(path, tmp_path / "r", RepoOptions(max_batch=8, preferred=(16,)))
    for name in ("../x", "a b", "a\nb", "", "-" * 129, "x.y"):
        with pytest.raises(HanEdgeError, match="invalid Triton model name"):
            write_repository(path, tmp_path / "r", RepoOptions(name=name))
    with pytest.raises(HanEdgeError, match="model version must be a whole number from 1 to 9223372036854775807"):
        write_repository(path, tmp_path / "r", RepoOptions(version=2**63))
    assert not (tmp_path / "r").exists()
    with pytest.raises(HanEdgeError, match="Triton serves"):
        write_repository(tmp_path / "m.pt", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    for option, match in [({"version": True}, "model version must be a whole number"), ({"version": 1.5}, "version"),
                          ({"max_batch": 10**12}, "max_batch must be a whole number from 1 to 4096"),
                          ({"max_batch": "64"}, "max_batch"), ({"preferred": (1.5,)}, "a preferred batch size"),
                          ({"preferred": "16"}, "preferred batch sizes must be a non-empty list"),
                          ({"instances": 2.5}, "instances"), ({"instances": 10**30}, "instances must be .* to 64"),
                          ({"queue_delay_us": float("inf")}, "queue_delay_us"), ({"instance_kind": None}, "instance_kind"),
                          ({"name": 5}, "invalid Triton model name")]:    # were TypeErrors, or written into the config
        with pytest.raises(HanEdgeError, match=match):
            write_repository(path, tmp_path / "r", RepoOptions(**option))
    for model, repo in ((None, tmp_path / "r"), (path, None)):
        with pytest.raises(HanEdgeError, match="name must be a non-empty str or Path"):
            write_repository(model, repo)
    assert not (tmp_path / "r").exists()


def test_a_failed_repository_write_replaces_nothing(fresh_onnx, tmp_path):
    _, path = fresh_onnx
    (tmp_path / "r" / "a" / "1").mkdir(parents=True)
    (tmp_path / "r" / "a" / "config.pbtxt").mkdir()
    (tmp_path / "r" / "a" / "1" / "model.onnx").write_bytes(b"OLD")
    with pytest.raises(HanEdgeError, match="config.pbtxt is a directory"):
        write_repository(path, tmp_path / "r", RepoOptions(name="a"))
    assert (tmp_path / "r" / "a" / "1" / "model.onnx").read_bytes() == b"OLD"   # was replaced before the failure


def test_a_graph_that_is_not_what_its_metadata_says_is_not_served(fresh_onnx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    _, path = fresh_onnx
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["features"])], "ident",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 160, 64])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3, 160, 64])])
    ident = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(ident, meta)
    onnx.save(ident, str(tmp_path / "ident.onnx"))
    with pytest.raises(HanEdgeError, match="the graph's output is .* but its metadata says 1024-D features"):
        write_repository(tmp_path / "ident.onnx", tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_triton_writes_a_valid_repository(fresh_onnx, tmp_path):
    from typer.testing import CliRunner

    from han_edge.cli import app

    _, path = fresh_onnx
    result = CliRunner().invoke(app, ["triton", str(path), "--repo", str(tmp_path / "models"), "--name", "reid",
                                      "--max-batch", "16", "--preferred", "4,16", "--instance-kind", "cpu"])
    assert result.exit_code == 0, result.output
    cfg = parse(tmp_path / "models" / "reid" / "config.pbtxt")
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    result = CliRunner().invoke(app, ["triton", str(path), "--repo", str(tmp_path / "m2"), "--max-batch", "4",
                                      "--preferred", "8"])
    assert result.exit_code == 2 and "outside 1..4" in result.output


def test_backend_over_grpc_matches_onnx_runtime(server, fresh_onnx):
    from han_edge.backends.triton import TritonBackend

    _, path = fresh_onnx
    backend = TritonBackend(f"grpc://{server.url}/han_small")
    try:
        assert backend.config.variant == "small" and backend.precision == "fp32"
        assert backend.normalization == "external" and backend.batch_profile == (1, 8, 8)
        assert backend.xp is np and backend.device == "cpu"
        x = np.random.default_rng(0).standard_normal((5, 3, 160, 64)).astype(np.float32)
        got = backend.infer(x)
        want = ort_session(path).run(["features"], {"images": x})[0]
        np.testing.assert_allclose(got, want, atol=1e-6)
    finally:
        backend.close()
    with pytest.raises(HanEdgeError, match="outside 1..8"):
        TritonBackend(f"grpc://{server.url}/han_small", max_batch=9)


def test_embedder_through_triton_equals_local(server, fresh_onnx):
    """Embedder("grpc://...") gives the local model's features, for the unfolded and the folded model."""
    from han_edge.runtime import Embedder

    _, path = fresh_onnx
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (int(rng.integers(60, 240)), int(rng.integers(30, 100)), 3), dtype=np.uint8)
             for _ in range(19)]                          # more than max_batch 8: split into chunks
    local = Embedder(path).embed_crops(crops)
    before = len(server.servicer.infer_batches)
    for name in ("han_small", "han_small_folded"):
        remote = Embedder(f"grpc://{server.url}/{name}")
        assert remote.backend.normalization == ("folded" if name.endswith("folded") else "external")
        np.testing.assert_allclose(remote.embed_crops(crops), local, atol=3e-5)
    batches = server.servicer.infer_batches[before:]
    assert max(batches) <= 8 and sum(batches) >= 2 * 19


def test_unreachable_server_and_unknown_model(server, tmp_path):
    from han_edge.backends.triton import TritonBackend, parse_uri
    from han_edge.runtime import Embedder

    with pytest.raises(HanEdgeError, match="cannot reach Triton at 127.0.0.1:1"):
        Embedder("grpc://127.0.0.1:1/han_small", timeout_s=3)
    with pytest.raises(HanEdgeError, match="has no ready model 'nope'"):
        TritonBackend(f"grpc://{server.url}/nope")
    with pytest.raises(HanEdgeError, match="has no ready model 'han_small' version 7"):
        TritonBackend(f"grpc://{server.url}/han_small/7")
    for bad in ("grpc://host:8001", "grpc://127.0.0.1:1/m\n", "grpc://a\x00b/m", "grpc://user@host/m", "grpc://h/a b"):
        with pytest.raises(HanEdgeError, match="expected grpc://HOST"):
            parse_uri(bad)
    assert parse_uri("grpc://[::1]:8001/m/2") == ("[::1]:8001", "m", "2")
    assert parse_uri("grpc://triton.local/han_small") == ("triton.local:8001", "han_small", "")
    assert parse_uri("grpc://10.0.0.2:9001/m/3") == ("10.0.0.2:9001", "m", "3")


def test_model_without_han_edge_parameters_is_refused(fresh_onnx, tmp_path):
    from han_edge.backends.triton import TritonBackend

    _, path = fresh_onnx
    root = tmp_path / "models"
    write_repository(path, root, RepoOptions(name="bare", max_batch=4))
    cfg = parse(root / "bare" / "config.pbtxt")
    for key in list(cfg.parameters):
        del cfg.parameters[key]
    (root / "bare" / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    with TritonStub(root) as stub:
        with pytest.raises(HanEdgeError, match="carries no han-edge metadata"):
            TritonBackend(f"grpc://{stub.url}/bare")
    shutil.rmtree(root)


def test_optional_clients_are_imported_lazily():
    """`import han_edge`, the runtime, the CLI and the serving modules load without tritonclient/pymilvus."""
    import subprocess

    code = ("import sys, han_edge, han_edge.runtime, han_edge.cli, han_edge.gallery, han_edge.formats, "
            "han_edge.triton, han_edge.deepstream, han_edge.fold, han_edge.backends.triton, han_edge.milvus_index; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tritonclient', 'pymilvus', 'milvus_lite')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_bench_through_triton(server, tmp_path):
    """`han-edge bench --model grpc://...`: the CLI takes a Triton URI wherever it takes a model file."""
    import json

    from typer.testing import CliRunner

    from han_edge.cli import app

    result = CliRunner().invoke(app, ["bench", "--model", f"grpc://{server.url}/han_small", "--batch", "2",
                                      "--iters", "1", "--gallery-size", "10", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["backend"].startswith("triton")
    result = CliRunner().invoke(app, ["bench", "--model", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "not found" in result.output


@pytest.mark.slow
def test_tensorrt_flavour_onnx_is_served_without_the_ort_rewrite_that_breaks_it(fresh_onnx, tmp_path):
    """The INT8 + FP16 file through Triton's onnxruntime backend gives han-edge's runtime's features.

    ONNX Runtime's default graph rewrites quantise this file's biases in FP16 (``onnx_io.ORT_FP16_ARTEFACTS``):
    on fresh weights its features then move ~50x further from FP32 than the file's own INT8 error (on a
    trained HAN-S its centred cosine falls to ~0.3). The config turns Triton's graph rewrites off.
    """
    from han_edge.quantize import export_int8
    from han_edge.runtime import Embedder

    _, path = fresh_onnx
    rng = np.random.default_rng(5)
    images = rng.standard_normal((16, 3, 160, 64)).astype(np.float32)
    int8 = tmp_path / "han_small_int8.onnx"
    export_int8(path, int8, images[:8], images[8:], flavour="tensorrt", exclude=[])
    result = write_repository(int8, tmp_path / "repo", RepoOptions(max_batch=8, instance_kind="cpu"))
    assert parse(result["config"]).optimization.graph.level == 2      # Triton: ORT_DISABLE_ALL
    fp32 = write_repository(path, tmp_path / "repo", RepoOptions(max_batch=8, instance_kind="cpu"))
    assert not parse(fp32["config"]).HasField("optimization")        # other files keep Triton's defaults
    crops = [rng.integers(0, 256, (128, 48, 3), dtype=np.uint8) for _ in range(6)]
    local, reference = Embedder(int8).embed_crops(crops), Embedder(path).embed_crops(crops)
    with TritonStub(tmp_path / "repo") as stub:
        remote = Embedder(f"grpc://{stub.url}/han_small_int8").embed_crops(crops)
    assert np.abs(local - reference).max() < 1e-3                      # the file's own INT8 error
    np.testing.assert_allclose(remote, local, atol=2e-4)
