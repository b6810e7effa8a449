"""TensorRT engines: build a `.plan` from an exported ONNX (loading and running it is ``backends.tensorrt``).

Written to the TensorRT 10 and 11 Python APIs with one code path: networks are strongly typed
(the flag is required on 10.x and accepted on 11.x), precision comes from the ONNX (FP16 tensors,
Q/DQ nodes), never from the removed ``BuilderFlag.FP16/INT8``. The model metadata and the
TensorRT version / GPU the engine was built for are stored beside it in ``<engine>.json``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from han_edge.config import config_from_metadata
from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.paths import as_path, check_destination, require_file
from han_edge.validate import MAX_BATCH, whole_number

TRT_HINT = ("pip install 'han-edge[gpu-cu12]' or '[gpu-cu13]' (TensorRT for your CUDA major; on a Jetson it ships "
            "with JetPack) on an NVIDIA GPU machine; the .onnx files run on CPU with ONNX Runtime")


def require_tensorrt():
    """The tensorrt module, or one sentence saying what is missing and how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(f"building or running a TensorRT engine needs TensorRT, which is not "
                                     f"installed here: {TRT_HINT}") from None
    major = int(tensorrt.__version__.split(".")[0])
    if major < 10:
        raise MissingDependencyError(f"TensorRT {tensorrt.__version__} is too old; han-edge needs 10.x or 11.x")
    return tensorrt


def side_file(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def read_engine_metadata(engine_path: str | Path) -> dict:
    """The engine's side file ``<engine>.json``, checked against its schema, or one sentence saying what is wrong.

    Schema: ``metadata`` (the ONNX metadata: string keys and values, a valid ``han_edge.config``),
    ``precision`` (one of ``config.PRECISIONS``, equal to the metadata's), ``tensorrt`` (a version),
    ``gpu`` and ``compute_capability`` (strings), ``batch`` ({min, opt, max}: 1 <= min <= opt <= max),
    optional ``source_onnx``; optional ``plan_bytes`` / ``plan_sha256`` must match the ``.plan``
    (a side file copied next to another engine is caught). No TensorRT is needed to read it.
    """
    import hashlib
    import re

    from han_edge.config import PRECISIONS

    engine_path = as_path(engine_path, "engine")
    path = side_file(engine_path)
    require_file(engine_path, "engine")
    if not path.is_file():
        raise HanEdgeError(f"engine {engine_path} has no metadata file {path.name}; rebuild it with `han-edge export`")
    if engine_path.stat().st_size == 0:
        raise HanEdgeError(f"engine {engine_path} is empty")
    try:
        side = json.loads(path.read_bytes().decode("utf-8-sig"),
                          parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"{name} is not a JSON number")))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HanEdgeError(f"engine metadata {path} is corrupt: {str(err).splitlines()[0][:150]}") from None

    def bad(why: str) -> HanEdgeError:
        return HanEdgeError(f"engine metadata {path} is not a han-edge side file: {why}")

    if not isinstance(side, dict):
        raise bad(f"it holds a {type(side).__name__}, not an object")
    meta = side.get("metadata")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("'metadata' must be an object of strings")
    config, meta_precision = config_from_metadata(meta, f"engine metadata {path}")
    precision = side.get("precision")
    if precision not in PRECISIONS:
        raise bad(f"'precision' must be one of {', '.join(PRECISIONS)}")
    if "han_edge.precision" in meta and precision != meta_precision:
        raise bad(f"'precision' says {precision} but the model metadata says {meta_precision}")
    if not isinstance(side.get("tensorrt"), str) or not re.match(r"[0-9]+\.[0-9]+", side["tensorrt"]):
        raise bad("'tensorrt' must be a version such as 10.3.0")
    for key in ("gpu", "compute_capability"):
        if not isinstance(side.get(key), str) or not side[key]:
            raise bad(f"{key!r} must be a non-empty string")
    batch = side.get("batch")
    if not isinstance(batch, dict) or set(batch) != {"min", "opt", "max"} or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in batch.values()):
        raise bad("'batch' must be {min, opt, max} whole numbers")
    if not 1 <= batch["min"] <= batch["opt"] <= batch["max"] <= MAX_BATCH:
        raise bad(f"'batch' must satisfy 1 <= min <= opt <= max <= {MAX_BATCH}, not "
                  f"{batch['min']}/{batch['opt']}/{str(batch['max'])[:20]}")
    if "source_onnx" in side and not isinstance(side["source_onnx"], str):
        raise bad("'source_onnx' must be a string")
    size = engine_path.stat().st_size
    if "plan_bytes" in side and side["plan_bytes"] != size:
        raise HanEdgeError(f"engine {engine_path} does not match its metadata file: {size} bytes, the side file says "
                           f"{side['plan_bytes']}; rebuild it")
    if "plan_sha256" in side:
        digest = hashlib.sha256(engine_path.read_bytes()).hexdigest()
        if digest != side["plan_sha256"]:
            raise HanEdgeError(f"engine {engine_path} does not match its metadata file (its checksum differs); "
                               f"rebuild it")
    side["batch"] = {k: batch[k] for k in ("min", "opt", "max")}   # always in this order
    return side


@dataclass
class BuildOptions:
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    workspace_mib: int = 1024
    cache_dir: Path | None = None        # timing caches live here, one per TensorRT version + GPU + sm


def check(result, step: str):
    """One error checker for TensorRT calls that report failure by None / False / -1 instead of raising."""
    if result is None or result is False or (isinstance(result, int) and not isinstance(result, bool) and result < 0):
        raise HanEdgeError(f"TensorRT failed to {step} (see the TensorRT log above)")
    return result


def timing_cache_path(cache_dir: str | Path, trt_version: str, device: dict) -> Path:
    """A timing cache per TensorRT version, GPU and compute capability: caches never cross machines."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device["gpu"]).strip("-").lower()
    return Path(cache_dir) / f"timing-trt{trt_version}-{gpu}-sm{device['compute_capability'].replace('.', '')}.cache"


class _Progress:
    """Adapts TensorRT's IProgressMonitor callbacks to a simple ``report(phase, step, steps)``."""

    def __new__(cls, trt, report):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.steps = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.steps[phase_name] = num_steps
                report(phase_name, 0, num_steps)

            def step_complete(self, phase_name, step):
                report(phase_name, step + 1, self.steps.get(phase_name, step + 1))
                return True   # False would cancel the build

            def phase_finish(self, phase_name):
                report(phase_name, self.steps.get(phase_name, 1), self.steps.get(phase_name, 1))

        return Monitor()


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions | None = None,
                 report=None) -> Path:
    """Compile an exported ONNX into a serialized engine plus its metadata side file."""
    from han_edge.cuda import device_description
    from han_edge.fileio import atomic_write_bytes, write_json
    from han_edge.onnx_io import INPUT, load_onnx, onnx_metadata

    options = options or BuildOptions()
    for name in ("min_batch", "opt_batch", "max_batch"):
        whole_number(getattr(options, name), name, 1, MAX_BATCH)
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise HanEdgeError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {options.min_batch}, "
                           f"{options.opt_batch}, {options.max_batch}")
    engine_path = check_destination(engine_path, "engine")
    meta = onnx_metadata(load_onnx(onnx_path))
    config, precision = config_from_metadata(meta, str(onnx_path))
    trt = require_tensorrt()
    device = device_description()        # raises the one-sentence "no GPU" error
    logger = trt.Logger(trt.Logger.WARNING)
    builder = check(trt.Builder(logger), "create a builder (is the GPU usable?)")
    # Strongly typed: the ONNX's types (FP16 tensors, Q/DQ) are the precision; required for that on 10.x.
    network = check(builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                    "create a strongly typed network")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HanEdgeError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    build_config = check(builder.create_builder_config(), "create a builder config")
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    height, width = config.input_size
    if network.num_inputs != 1:
        raise HanEdgeError(f"{onnx_path} has {network.num_inputs} inputs; a HAN model has one ('{INPUT}')")
    input_name = network.get_input(0).name    # the parsed graph's own name: a profile for another name builds nothing
    profile = check(builder.create_optimization_profile(), "create an optimization profile")
    shapes = [(b, 3, height, width) for b in (options.min_batch, options.opt_batch, options.max_batch)]
    try:
        profile.set_shape(input_name, *shapes)
    except (RuntimeError, TypeError, ValueError) as err:
        raise HanEdgeError(f"TensorRT refused the batch profile {shapes} for input '{input_name}': {err}") from None
    check(build_config.add_optimization_profile(profile), f"add the batch profile {shapes}")
    cache_path = timing_cache_path(options.cache_dir, trt.__version__, device) if options.cache_dir else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    timing_cache = check(build_config.create_timing_cache(cache_bytes), "read the timing cache "
                         f"{cache_path} (delete it to start a new one)")
    check(build_config.set_timing_cache(timing_cache, ignore_mismatch=False),
          f"use the timing cache {cache_path}: it was written by another TensorRT or GPU; delete it")
    if report is not None:
        build_config.progress_monitor = _Progress(trt, report)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise HanEdgeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan = bytes(serialized)
    atomic_write_bytes(engine_path, plan, "engine")     # (side file last: it vouches for the plan)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(build_config.get_timing_cache().serialize()), "timing cache")
    side = {"metadata": meta, "precision": precision, "tensorrt": trt.__version__, **device,
            "plan_bytes": len(plan), "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "batch": {"min": options.min_batch, "opt": options.opt_batch, "max": options.max_batch},
            "source_onnx": str(onnx_path)}
    write_json(side_file(engine_path), side, "engine metadata")
    return engine_path
