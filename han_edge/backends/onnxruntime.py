"""ONNX Runtime: the CPU provider everywhere; with onnxruntime-gpu, the CUDA provider on device buffers (I/O binding)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from han_edge.backends.base import Backend
from han_edge.config import config_from_metadata
from han_edge.errors import HanEdgeError
from han_edge.onnx_io import _onnx, check_folding, ort_session, ort_workarounds

CUDA_PROVIDER = "CUDAExecutionProvider"


class OnnxRuntimeBackend(Backend):
    def __init__(self, path: Path, threads: int = 0, providers: list[str] | None = None, max_batch: int | None = None):
        import onnxruntime as ort

        from han_edge.validate import thread_count

        threads = thread_count(threads)           # ORT hangs creating a pool of 10**6 threads
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in (CUDA_PROVIDER, "CPUExecutionProvider") if p in available]
        elif not isinstance(providers, (list, tuple)) or not providers or \
                not all(isinstance(p, str) and p for p in providers):
            raise HanEdgeError(f"providers must be a non-empty list of ONNX Runtime provider names such as "
                               f"['CPUExecutionProvider']; got {providers!r:.60}")
        elif unknown := [p for p in providers if p not in available]:     # ORT would fall back silently
            raise HanEdgeError(f"ONNX Runtime provider(s) {', '.join(unknown)} are not available here; "
                               f"available: {', '.join(available)}")
        providers = list(providers)
        if CUDA_PROVIDER in providers:
            from han_edge.cuda import device_arrays, device_index
            from han_edge.errors import MissingDependencyError

            try:   # the provider runs on the GPU that holds the bound buffers (the array library's current one)
                self.xp, self.device = device_arrays()
                providers = [(p, {"device_id": device_index(self.device)}) if p == CUDA_PROVIDER else p
                             for p in providers]
            except MissingDependencyError:
                pass   # no CuPy/PyTorch to hold device buffers: the CUDA provider with host I/O (ORT copies)
        self.session = ort_session(path, threads, providers)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if ort_workarounds(self.metadata):        # known ORT rewrites that hurt this file: without them
            self.session = ort_session(path, threads, providers, ort_workarounds(self.metadata))
        self.config, self.precision = config_from_metadata(self.metadata, str(path))
        self._check_graph(path)
        check_folding(_onnx().load(str(path), load_external_data=False), self.metadata, str(path))
        self.provider = self.session.get_providers()[0]
        self.name = f"onnxruntime/{self.provider.replace('ExecutionProvider', '')}"
        self.batch_profile = (1, min(32, max_batch or 64), max_batch or 64)
        if self.provider != CUDA_PROVIDER:                 # asked for CUDA, got the CPU: host arrays after all
            from han_edge.backends.base import Backend

            self.xp, self.device = Backend.xp, Backend.device

    def _check_graph(self, path) -> None:
        """The graph's I/O must be what the metadata says: one (N, 3, H, W) float input, (N, D) float output."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise HanEdgeError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; a HAN model has one each")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        h, w = self.config.input_size
        want_in, want_out = ["batch", 3, h, w], ["batch", self.config.feature_dim]
        got_in = [d if isinstance(d, int) else "batch" for d in inputs[0].shape]
        got_out = [d if isinstance(d, int) else "batch" for d in outputs[0].shape]
        if got_in[1:] != want_in[1:] or got_out[1:] != want_out[1:] or inputs[0].type != "tensor(float)":
            raise HanEdgeError(f"{path} takes {inputs[0].type} {inputs[0].shape} and gives {outputs[0].shape}, but its "
                               f"metadata describes HAN({self.config.variant}) with input (N, 3, {h}, {w}) float and "
                               f"{self.config.feature_dim}-D features")

    def infer(self, batch):
        if self.kind == "cpu":
            return self.check_output(self.session.run([self.output_name], {self.input_name: batch})[0], len(batch))
        return self._infer_device(batch)

    def _infer_device(self, batch):
        """CUDA provider on device memory: the input and output stay on the GPU (no host round trip)."""
        from han_edge.cuda import contiguous, data_ptr, device_index, empty, synchronize

        xp = self.xp
        batch = contiguous(xp, batch, xp.float32)
        out = empty(xp, (batch.shape[0], self.config.feature_dim), xp.float32, self.device)
        device_id = device_index(self.device)   # CuPy Device.id / torch device.index (0 is falsy: no `or` chains)
        binding = self.session.io_binding()            # one per call: concurrent calls never rebind each other
        binding.bind_input(self.input_name, "cuda", device_id, np.float32, tuple(batch.shape), data_ptr(batch))
        binding.bind_output(self.output_name, "cuda", device_id, np.float32, tuple(out.shape), data_ptr(out))
        synchronize(xp)                  # the batch was written on the library's stream; ORT uses its own
        self.session.run_with_iobinding(binding)
        return out
