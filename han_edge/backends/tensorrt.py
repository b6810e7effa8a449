"""TensorRT: load a `.plan` built on this GPU and run it on device buffers (a Jetson only loads; building is ``engine``).

Small explicit buffers and one error checker, as in TensorRT's ``common_runtime.py``: the engine's
I/O names, dtypes and shapes are read from the engine, not assumed; every call that reports failure
by a return value is checked with one sentence naming the step.
"""
from __future__ import annotations

import threading
from pathlib import Path

from han_edge.backends.base import Backend
from han_edge.config import config_from_metadata
from han_edge.engine import check, read_engine_metadata, require_tensorrt
from han_edge.errors import HanEdgeError


class TensorRTBackend(Backend):
    name = "tensorrt/cuda"

    def __init__(self, path: Path):
        trt = require_tensorrt()          # the first thing a user without TensorRT needs to hear
        side = read_engine_metadata(path)
        self.metadata = dict(side["metadata"])
        self.config, self.precision = config_from_metadata(self.metadata, str(path))
        from han_edge.cuda import device_arrays, device_description

        self.xp, self.device = device_arrays()
        here = {"tensorrt": trt.__version__, **device_description()}
        built = {k: side.get(k) for k in here}
        if built != here:
            raise HanEdgeError(f"engine {path} was built for TensorRT {built['tensorrt']} on {built['gpu']} "
                               f"(sm {built['compute_capability']}) but this is TensorRT {here['tensorrt']} on "
                               f"{here['gpu']} (sm {here['compute_capability']}); rebuild it on this machine with "
                               f"`han-edge build {side.get('source_onnx', 'MODEL.onnx')}`")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = check(trt.Runtime(self._logger), "create a runtime")
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise HanEdgeError(f"TensorRT {trt.__version__} cannot deserialize {path}: corrupt file or built by "
                               "another TensorRT version")
        self.context = check(self.engine.create_execution_context(),
                             "create an execution context (out of GPU memory?)")
        self.input_name, self.output_name = self._io_names(trt)
        self._check_io(trt, path)
        low, opt, high = (int(s[0]) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.batch_profile = (low, opt, high)
        self._output = None
        self._stream = None
        self._lock = threading.Lock()          # one execution context and output buffer: one call at a time

    def _io_names(self, trt) -> tuple[str, str]:
        inputs, outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if len(inputs) != 1 or len(outputs) != 1:
            raise HanEdgeError(f"engine has inputs {inputs} and outputs {outputs}; a HAN engine has one of each")
        return inputs[0], outputs[0]

    def _check_io(self, trt, path) -> None:
        """I/O dtypes and shapes from the engine, checked against the metadata (FP32 I/O, (N,3,H,W) -> (N,D))."""
        import numpy as np

        dtypes = [self.engine.get_tensor_dtype(name) for name in (self.input_name, self.output_name)]
        try:     # trt.nptype raises TypeError for types NumPy lacks (BF16, FP8, INT4): samples/python/common_runtime.py
            self.input_dtype, self.output_dtype = (np.dtype(trt.nptype(t)) for t in dtypes)
        except TypeError:
            raise HanEdgeError(f"engine {path} has {dtypes[0]} input / {dtypes[1]} output; han-edge engines have "
                               "float32 or float16 I/O (re-export the ONNX with float I/O)") from None
        in_shape = tuple(self.engine.get_tensor_shape(self.input_name))
        out_shape = tuple(self.engine.get_tensor_shape(self.output_name))
        h, w = self.config.input_size
        if in_shape[1:] != (3, h, w) or out_shape[1:] != (self.config.feature_dim,):
            raise HanEdgeError(f"engine {path} maps {in_shape} to {out_shape}, but its metadata describes "
                               f"HAN({self.config.variant}) with input (N, 3, {h}, {w}) and "
                               f"{self.config.feature_dim}-D features")
        if self.input_dtype.kind != "f" or self.output_dtype.kind != "f":
            raise HanEdgeError(f"engine {path} has {self.input_dtype} input / {self.output_dtype} output; "
                               "han-edge engines have floating-point I/O")

    def infer(self, batch):
        """(n, 3, H, W) device batch -> (n, D) float32 device features, ordered with the caller's stream."""
        from han_edge.cuda import contiguous, data_ptr, empty, new_stream, ordered_on

        xp = self.xp
        n = batch.shape[0]
        low, _, high = self.batch_profile
        if not low <= n <= high:
            raise HanEdgeError(f"batch of {n} is outside the engine's profile {low}..{high}")
        batch = contiguous(xp, batch, getattr(xp, self.input_dtype.name))
        with self._lock:
            if self._output is None:
                self._output = empty(xp, (high, self.config.feature_dim), getattr(xp, self.output_dtype.name),
                                     self.device)
                self._stream = new_stream(xp)
            check(self.context.set_input_shape(self.input_name, tuple(batch.shape)),
                  f"set the input shape {tuple(batch.shape)}")
            check(self.context.set_tensor_address(self.input_name, data_ptr(batch)), "bind the input buffer")
            check(self.context.set_tensor_address(self.output_name, data_ptr(self._output)), "bind the output buffer")
            # A private stream (TensorRT's default-stream penalty), ordered both ways with the caller's:
            # pre-processing before, the copy below and matching after, with no host synchronisation.
            with ordered_on(xp, self._stream) as handle:
                check(self.context.execute_async_v3(handle), "execute the engine")
            return xp.astype(self._output[:n, ...], xp.float32, copy=True)   # the buffer is reused next call
