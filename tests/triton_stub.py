"""A stand-in Triton server for the tests: tritonclient's own gRPC service definitions, ONNX Runtime behind.

The only stand-in in the Triton tests: the protocol (KServe v2 / Triton's ``GRPCInferenceService``)
and the client (``tritonclient.grpc``) are the real ones. It serves a model repository as written by
``han-edge triton`` (``config.pbtxt`` parsed with Triton's ``ModelConfig`` protobuf, ``<version>/model.onnx``
run by ONNX Runtime), answers ServerLive / ServerReady / ModelReady / ModelMetadata / ModelConfig /
ModelInfer, listens on 127.0.0.1 only, and stops answering after ``max_requests`` requests.
"""
from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

_NP_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16", np.dtype(np.int64): "INT64"}
_TRITON_TO_NP = {v: k for k, v in _NP_TO_TRITON.items()}
_CONFIG_TO_TRITON = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16", "TYPE_INT64": "INT64"}


class _Model:
    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort

        self.config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        self.versions = [str(v) for v in versions]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads      # 0: ONNX Runtime's default
        level = ort.GraphOptimizationLevel        # Triton's onnxruntime backend (src/onnxruntime.cc) maps these
        options.graph_optimization_level = {-1: level.ORT_ENABLE_BASIC, 1: level.ORT_ENABLE_EXTENDED,
                                            2: level.ORT_DISABLE_ALL}.get(self.config.optimization.graph.level,
                                                                          level.ORT_ENABLE_ALL)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / self.versions[-1] / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])


class StubServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repo: Path, max_requests: int, threads: int = 1):
        self.models = {p.name: _Model(p, threads) for p in sorted(Path(repo).iterdir()) if (p / "config.pbtxt").is_file()}
        self.max_requests = max_requests
        self.requests = 0
        self.infer_batches: list[int] = []
        self._lock = threading.Lock()

    def _count(self, context) -> None:
        with self._lock:
            self.requests += 1
            over = self.requests > self.max_requests
        if over:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "test server request budget used up")

    def _model(self, name: str, version: str, context) -> _Model:
        model = self.models.get(name)
        if model is None or (version and version not in model.versions):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        return model

    def ServerLive(self, request, context):
        self._count(context)
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        self._count(context)
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        self._count(context)
        model = self.models.get(request.name)
        return service_pb2.ModelReadyResponse(
            ready=model is not None and (not request.version or request.version in model.versions))

    def ModelMetadata(self, request, context):
        self._count(context)
        model = self._model(request.name, request.version, context)
        cfg = model.config

        def tensors(values):
            return [service_pb2.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=_CONFIG_TO_TRITON[model_config_pb2.DataType.Name(t.data_type)],
                shape=[-1, *t.dims]) for t in values]
        return service_pb2.ModelMetadataResponse(name=request.name, versions=model.versions, platform=cfg.platform,
                                                 inputs=tensors(cfg.input), outputs=tensors(cfg.output))

    def ModelConfig(self, request, context):
        self._count(context)
        model = self._model(request.name, request.version, context)
        return service_pb2.ModelConfigResponse(config=model.config)

    def ModelInfer(self, request, context):
        self._count(context)
        model = self._model(request.model_name, request.model_version, context)
        cfg = model.config
        feeds = {}
        for i, tensor in enumerate(request.inputs):
            dtype = _TRITON_TO_NP.get(tensor.datatype)
            if dtype is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported datatype {tensor.datatype}")
            shape = list(tensor.shape)
            if shape[0] > cfg.max_batch_size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"inference request batch-size must be <= {cfg.max_batch_size} for '{request.model_name}'")
            if shape[1:] != list(cfg.input[i].dims):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected shape for input '{tensor.name}'")
            feeds[tensor.name] = np.frombuffer(request.raw_input_contents[i], dtype).reshape(shape)
        self.infer_batches.append(int(next(iter(feeds.values())).shape[0]))
        names = [o.name for o in request.outputs] or [o.name for o in cfg.output]
        results = model.session.run(names, feeds)
        response = service_pb2.ModelInferResponse(model_name=request.model_name,
                                                  model_version=model.versions[-1], id=request.id)
        for name, value in zip(names, results):
            value = np.ascontiguousarray(value)
            response.outputs.add(name=name, datatype=_NP_TO_TRITON[value.dtype], shape=list(value.shape))
            response.raw_output_contents.append(value.tobytes())
        return response


class TritonStub:
    """``with TritonStub(repo) as stub: ...`` -> ``stub.url`` is ``127.0.0.1:<free port>``."""

    def __init__(self, repo: str | Path, max_requests: int = 500, threads: int = 1):
        self.servicer = StubServicer(Path(repo), max_requests, threads)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                                  options=[("grpc.max_receive_message_length", 64 << 20),
                                           ("grpc.max_send_message_length", 64 << 20)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.url = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "TritonStub":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=1).wait(5)
