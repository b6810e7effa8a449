"""`han-edge triton MODEL --repo DIR`: a Triton Inference Server model repository from a han-edge model.

Writes ``DIR/<name>/config.pbtxt`` and ``DIR/<name>/<version>/model.onnx`` (platform
``onnxruntime_onnx``) or ``model.plan`` (``tensorrt_plan``), every value taken from the model file:
input/output names, data types and dims from the ONNX graph (or, for an engine, from its side file
``<engine>.json``), ``max_batch_size`` from the engine's optimisation profile (a flag for ONNX, whose
batch axis is dynamic), ``dynamic_batching`` with preferred sizes, ``instance_group``, and the model's
han-edge metadata (config, precision, normalisation form) as ``parameters``, so a client
(``han_edge.backends.triton.TritonBackend``) knows what the served model expects without a side channel.

The text is written here without tritonclient (a deployment box needs no client library to prepare a
repository); the tests parse it with the ``ModelConfig`` protobuf tritonclient ships, so a key Triton
does not know fails there. Checked against Triton's model-configuration docs (model_config.proto of
the tritonclient 2.73 package; the r25.x server documentation). A ``.plan`` is tied to the TensorRT
version and GPU it was built with: build it with the TensorRT of the Triton release that serves it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from han_edge.config import HANConfig, config_from_metadata, normalization_of
from han_edge.errors import HanEdgeError
from han_edge.fileio import atomic_write_bytes
from han_edge.onnx_io import ort_workarounds
from han_edge.paths import as_path, check_destination, ensure_folder, require_file
from han_edge.validate import INT64_MAX, MAX_BATCH, whole_number

ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32",
              7: "TYPE_INT64"}
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan"),
             ".engine": ("tensorrt_plan", "model.plan")}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}


@dataclass
class Tensor:
    name: str
    data_type: str            # Triton's TYPE_*
    dims: list[int]           # without the batch axis


@dataclass
class ServedModel:
    """What a repository entry says about one model file."""

    path: Path
    platform: str
    filename: str
    config: HANConfig
    precision: str
    metadata: dict[str, str]
    inputs: list[Tensor]
    outputs: list[Tensor]
    profile_max: int | None = None      # engine profile maximum (None for ONNX: dynamic batch axis)
    profile_opt: int | None = None
    extra: dict = field(default_factory=dict)


def describe_model(path: str | Path) -> ServedModel:
    """Read a .onnx (graph + metadata) or .plan/.engine (side file) into a ``ServedModel``."""
    path = as_path(path, "model file")
    suffix = path.suffix.lower()
    if suffix not in PLATFORMS:
        raise HanEdgeError(f"{path.name}: Triton serves .onnx (onnxruntime_onnx) or .plan/.engine (tensorrt_plan) "
                           "files written by han-edge")
    require_file(path, "model file")
    platform, filename = PLATFORMS[suffix]
    if suffix == ".onnx":
        return _describe_onnx(path, platform, filename)
    return _describe_engine(path, platform, filename)


def _describe_onnx(path: Path, platform: str, filename: str) -> ServedModel:
    from han_edge.onnx_io import load_onnx, onnx_metadata, validate_han_model

    model = load_onnx(path)
    meta = onnx_metadata(model)
    config, precision = validate_han_model(model, meta, str(path))   # the graph is what its metadata says
    initialisers = {t.name for t in model.graph.initializer}

    def tensors(values) -> list[Tensor]:
        out = []
        for v in values:
            if v.name in initialisers:
                continue
            t = v.type.tensor_type
            if t.elem_type not in ONNX_TYPES:
                raise HanEdgeError(f"{path.name}: tensor {v.name!r} has an ONNX type ({t.elem_type}) Triton config "
                                   "writing does not handle here")
            dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim]
            if not dims or dims[0] != -1:
                raise HanEdgeError(f"{path.name}: tensor {v.name!r} has no dynamic batch axis; export it with "
                                   "`han-edge export` (batch axis 'batch')")
            out.append(Tensor(v.name, ONNX_TYPES[t.elem_type], dims[1:]))
        return out
    return ServedModel(path, platform, filename, config, precision, meta, tensors(model.graph.input),
                       tensors(model.graph.output))


def _describe_engine(path: Path, platform: str, filename: str) -> ServedModel:
    from han_edge.engine import read_engine_metadata
    from han_edge.onnx_io import INPUT, OUTPUT

    side = read_engine_metadata(path)
    meta = side.get("metadata") or {}
    config, precision = config_from_metadata(meta, str(path))
    batch = side.get("batch") or {}
    if "max" not in batch:
        raise HanEdgeError(f"engine metadata {path.name}.json has no batch profile; rebuild it with `han-edge build`")
    height, width = config.input_size
    return ServedModel(path, platform, filename, config, side.get("precision", precision), meta,
                       [Tensor(INPUT, "TYPE_FP32", [3, height, width])],
                       [Tensor(OUTPUT, "TYPE_FP32", [config.feature_dim])],
                       profile_max=int(batch["max"]), profile_opt=int(batch.get("opt", batch["max"])),
                       extra={"tensorrt": side.get("tensorrt"), "gpu": side.get("gpu")})


@dataclass
class RepoOptions:
    name: str | None = None              # default: the file's stem, dots as underscores (han_small_int8)
    version: int = 1
    max_batch: int | None = None         # ONNX only (an engine's comes from its profile); default 64
    preferred: tuple[int, ...] | None = None   # default: (opt or max/2, max)
    queue_delay_us: int = 100
    instance_kind: str = "gpu"           # gpu, cpu or auto (a .plan needs gpu)
    instances: int = 1

    def check(self) -> "RepoOptions":
        """Self, or one sentence naming the first option of the wrong kind or out of range (before any work)."""
        if self.name is not None:
            _check_name(self.name)
        whole_number(self.version, "model version", 1, INT64_MAX)          # Triton reads it as int64
        if self.max_batch is not None:
            whole_number(self.max_batch, "max_batch", 1, MAX_BATCH)
        if self.preferred is not None:
            if not isinstance(self.preferred, (list, tuple)) or not self.preferred:
                raise HanEdgeError(f"preferred batch sizes must be a non-empty list of whole numbers; got {self.preferred!r:.60}")
            for size in self.preferred:
                whole_number(size, "a preferred batch size", 1, MAX_BATCH)
        whole_number(self.queue_delay_us, "queue_delay_us", 0, 10_000_000)
        if not isinstance(self.instance_kind, str) or self.instance_kind not in INSTANCE_KINDS:
            raise HanEdgeError(f"instance_kind must be one of {', '.join(INSTANCE_KINDS)}; got {self.instance_kind!r:.40}")
        whole_number(self.instances, "instances", 1, 64)
        return self


def default_name(path: str | Path) -> str:
    stem = Path(path).name
    for suffix in (".onnx", ".plan", ".engine"):
        stem = stem.removesuffix(suffix)
    return stem.replace(".", "_").replace("-", "_")


def _check_name(name: str) -> str:
    """A model name Triton and every file system take (it is the repository's folder name)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", name):
        raise HanEdgeError(f"invalid Triton model name {name!r}: use 1 to 128 letters, digits, '_' or '-' (--name)")
    return name


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def plan_batching(served: ServedModel, options: RepoOptions) -> tuple[int, list[int]]:
    """(max_batch_size, preferred sizes) for a model and the user's options, or one sentence why not."""
    if served.profile_max is not None:
        if options.max_batch is not None and options.max_batch != served.profile_max:
            raise HanEdgeError(f"{served.path.name} was built for batches up to {served.profile_max}; "
                               f"--max-batch {options.max_batch} would not run (rebuild the engine instead)")
        max_batch = served.profile_max
        default_preferred = [served.profile_opt or max_batch, max_batch]
    else:
        max_batch = 64 if options.max_batch is None else options.max_batch
        default_preferred = [max(1, max_batch // 2), max_batch]
    if max_batch < 1:
        raise HanEdgeError(f"max batch must be at least 1, got {max_batch}")
    preferred = sorted(set(options.preferred if options.preferred else default_preferred))
    bad = [p for p in preferred if not 1 <= p <= max_batch]
    if bad:
        raise HanEdgeError(f"preferred batch sizes {bad} are outside 1..{max_batch} (the model's max_batch_size)")
    return max_batch, preferred


def config_text(served: ServedModel, name: str, options: RepoOptions) -> str:
    """The ``config.pbtxt`` of one model (protobuf text format of Triton's ``ModelConfig``)."""
    kind = INSTANCE_KINDS.get(options.instance_kind.lower())
    if kind is None:
        raise HanEdgeError(f"unknown instance kind {options.instance_kind!r}; one of {', '.join(INSTANCE_KINDS)}")
    if served.platform == "tensorrt_plan" and kind == "KIND_CPU":
        raise HanEdgeError("a TensorRT engine runs on a GPU; use --instance-kind gpu for a .plan")
    if options.instances < 1:
        raise HanEdgeError(f"instance count must be at least 1, got {options.instances}")
    if options.queue_delay_us < 0:
        raise HanEdgeError(f"the queue delay must be >= 0 microseconds, got {options.queue_delay_us}")
    max_batch, preferred = plan_batching(served, options)
    cfg = served.config
    lines = [
        f"# Written by han-edge from {served.path.name}: HAN({cfg.variant}) {served.precision}, "
        f"{cfg.feature_dim}-D features.",
        f"# Input: {served.metadata.get('han_edge.input', 'see parameters')}",
        f"name: {_quote(name)}",
        f"platform: {_quote(served.platform)}",
        f"max_batch_size: {max_batch}",
    ]
    for section, tensors in (("input", served.inputs), ("output", served.outputs)):
        lines.append(f"{section} [")
        for i, t in enumerate(tensors):
            sep = "," if i < len(tensors) - 1 else ""
            lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {t.data_type}",
                      f"    dims: [ {', '.join(str(d) for d in t.dims)} ]", "  }" + sep]
        lines.append("]")
    lines += ["dynamic_batching {",
              f"  preferred_batch_size: [ {', '.join(str(p) for p in preferred)} ]",
              f"  max_queue_delay_microseconds: {options.queue_delay_us}",
              "}",
              "instance_group [",
              "  {",
              f"    count: {options.instances}",
              f"    kind: {kind}",
              "  }",
              "]"]
    if served.platform == "onnxruntime_onnx" and ort_workarounds(served.metadata):
        # ONNX Runtime rewrites this file's biases in FP16 (onnx_io.ORT_FP16_ARTEFACTS) and its features go wrong;
        # han-edge's runtime turns that one rewrite off, Triton's onnxruntime backend can only turn off all of them
        # (graph level 2 = ORT_DISABLE_ALL in its src/onnxruntime.cc; -1 basic, 1 extended, otherwise all).
        lines += ["# INT8 + FP16 (TensorRT flavour): ONNX Runtime's graph rewrites off, see han_edge.onnx_io "
                  "ORT_FP16_ARTEFACTS; serve its TensorRT engine (.plan) for speed",
                  "optimization {", "  graph {", "    level: 2", "  }", "}"]
    # The han-edge metadata, so clients read the config, precision and normalisation form from the server.
    params = dict(sorted(served.metadata.items()))
    params.setdefault("han_edge.normalization", "external")
    params["han_edge.source_file"] = served.path.name
    for key, value in params.items():
        lines += ["parameters {", f"  key: {_quote(key)}", f"  value: {{ string_value: {_quote(value)} }}", "}"]
    return "\n".join(lines) + "\n"


def write_repository(model_path: str | Path, repo: str | Path, options: RepoOptions | None = None) -> dict:
    """Write ``repo/<name>/config.pbtxt`` and ``repo/<name>/<version>/model.{onnx,plan}``; returns the paths."""
    options = (options or RepoOptions()).check()
    served = describe_model(model_path)
    name = _check_name(default_name(served.path) if options.name is None else options.name)
    normalization = normalization_of(served.metadata, str(model_path))
    text = config_text(served, name, options)       # all checks before anything is written
    repo = as_path(repo, "Triton model repository")
    if repo.exists() and not repo.is_dir():
        raise HanEdgeError(f"repository {repo} exists and is not a folder")
    version_dir = ensure_folder(repo / name / str(options.version), "Triton model version folder")
    model_out = version_dir / served.filename
    check_destination(repo / name / "config.pbtxt", "Triton config.pbtxt")   # before the model file is replaced
    atomic_write_bytes(model_out, served.path.read_bytes(), "Triton model file")
    config_out = atomic_write_bytes(repo / name / "config.pbtxt", text.encode(), "Triton config.pbtxt")
    max_batch, preferred = plan_batching(served, options)
    return {"name": name, "config": str(config_out), "model": str(model_out), "platform": served.platform,
            "max_batch_size": max_batch, "preferred_batch_size": preferred,
            "normalization": normalization,
            "precision": served.precision}


def parse_metadata_parameters(parameters) -> dict[str, str]:
    """han-edge metadata from a ``ModelConfig.parameters`` map (protobuf or JSON dict form)."""
    out = {}
    for key, value in dict(parameters).items():
        if not key.startswith("han_edge."):
            continue
        out[key] = value["string_value"] if isinstance(value, dict) else value.string_value
    return out
