"""Model formats as data (boxmot's ``ReIDFormat``, ultralytics' export table): one row per format.

Every place that needs to know "what is this file and what runs it" — the runtime, ``inspect``,
``export``, ``build``, ``bench``, the demo — asks this table instead of testing suffixes itself.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from han_edge.errors import HanEdgeError
from han_edge.paths import require_file


@dataclass(frozen=True)
class ModelFormat:
    name: str
    suffixes: tuple[str, ...]          # file suffixes (or URI schemes ending in "://")
    backend: str                       # "module:Class" opened lazily, so no optional import happens early
    options: tuple[str, ...]           # keyword options the backend accepts
    description: str

    def open(self, source, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise HanEdgeError(f"{self.name} models take no option(s) {unknown}; they accept: "
                               f"{', '.join(self.options) or 'none'}")
        module, cls = self.backend.split(":")
        return getattr(importlib.import_module(module), cls)(source if self.is_uri else Path(source), **options)

    @property
    def is_uri(self) -> bool:
        return self.suffixes[0].endswith("://")


FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat("pytorch", (".pt", ".pth"), "han_edge.backends.torch:TorchBackend", ("device", "max_batch", "precision"),
                "training checkpoint run by PyTorch (CPU or CUDA)"),
    ModelFormat("onnx", (".onnx",), "han_edge.backends.onnxruntime:OnnxRuntimeBackend",
                ("threads", "providers", "max_batch"),
                "ONNX run by ONNX Runtime (CUDA execution provider when onnxruntime-gpu is installed)"),
    ModelFormat("tensorrt", (".plan", ".engine"), "han_edge.backends.tensorrt:TensorRTBackend", (),
                "TensorRT engine built on this GPU by `han-edge build`"),
    ModelFormat("triton", ("grpc://",), "han_edge.backends.triton:TritonBackend", ("max_batch", "timeout_s"),
                "a model served by Triton Inference Server, over gRPC"),
)


def format_of(source) -> ModelFormat:
    """The format of a model file or URI, or one sentence saying why none fits."""
    if isinstance(source, bytes) or not isinstance(source, (str, os.PathLike)):
        raise HanEdgeError(f"a model must be named by a str or Path (a file, or a grpc:// URI); got {source!r:.60}")
    text = str(source)
    for fmt in FORMATS:
        if fmt.is_uri and any(text.startswith(s) for s in fmt.suffixes):
            return fmt
    path = Path(text)
    with contextlib.suppress(OSError):   # a name the OS refuses: require_file below says why
        if path.is_dir():
            raise HanEdgeError(f"model {path} is a directory, not a model file")
    suffix = path.suffix.lower()
    fmt = next((f for f in FORMATS if not f.is_uri and suffix in f.suffixes), None)
    if fmt is None:
        known = ", ".join(f"{'/'.join(f.suffixes)} ({f.name})" for f in FORMATS)
        raise HanEdgeError(f"cannot tell the format of {path.name or text}: use {known}")
    require_file(path, "model file")
    return fmt


# -- what `export` and `build` write: one row per precision ----------------------------------------------
@dataclass(frozen=True)
class Artefact:
    precision: str           # the precision its metadata names
    suffix: str              # han_<variant><suffix>
    plan_suffix: str | None  # han_<variant><plan_suffix>, None where no engine is built from it
    description: str


ARTEFACTS: dict[str, Artefact] = {
    "fp32": Artefact("fp32", ".onnx", ".plan",
                     "FP32, opset 17, simplified; the reference every other file is checked against"),
    "fp16": Artefact("fp16", ".fp16.onnx", ".fp16.plan", "FP16 weights and activations, FP32 I/O (onnxconverter-common)"),
    "int8": Artefact("int8", ".int8.onnx", ".int8.plan",
                     "TensorRT: INT8 Q/DQ on Conv/Gemm inputs, FP16 elsewhere, FP32 I/O, opset 19"),
    "int8-cpu": Artefact("int8-cpu", ".int8-cpu.onnx", None, "ONNX Runtime CPU: U8/S8 Q/DQ fused into integer kernels"),
}


def artefact_path(out_dir: str | Path, variant: str, precision: str) -> Path:
    """``<out_dir>/han_<variant><suffix>`` for a row of ``ARTEFACTS``."""
    return Path(out_dir) / onnx_name(variant, precision)


def onnx_name(variant: str, precision: str) -> str:
    return f"han_{variant}{ARTEFACTS[precision].suffix}"


def engine_name(variant: str, precision: str) -> str:
    suffix = ARTEFACTS[precision].plan_suffix
    if suffix is None:
        raise HanEdgeError(f"the {precision} model is for ONNX Runtime on the CPU; no TensorRT engine is built from it")
    return f"han_{variant}{suffix}"


def engine_name_for(onnx_path: str | Path) -> str:
    """The engine file name `han-edge build` writes for an ONNX file (same stem, .plan)."""
    return Path(onnx_path).name.removesuffix(".onnx") + ".plan"


def model_digest(source) -> str:
    """What identifies one model across reports: the SHA-256 of a model file, or a URI as given (a served model)."""
    import hashlib

    if format_of(source).is_uri:
        return str(source)
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
