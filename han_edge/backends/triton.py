"""A HAN model served by Triton Inference Server, run over gRPC (KServe v2 protocol, tritonclient).

``Embedder("grpc://HOST:8001/han_small")`` (optionally ``/<version>``) embeds through a remote server
with the same API as a local file. What the model is (config, precision, normalisation form) is read
from the server's model configuration ``parameters``, which ``han-edge triton`` writes from the
model's metadata; input/output names, data type and the batch limit come from the same config.
tritonclient is imported here only (``pip install 'han-edge[serve]'``).
"""
from __future__ import annotations

import re

import numpy as np

from han_edge.backends.base import Backend
from han_edge.config import config_from_metadata
from han_edge.errors import HanEdgeError, MissingDependencyError

DEFAULT_PORT = 8001
# host: a DNS name or IPv4 (letters, digits, '.', '-', '_') or a bracketed IPv6; model: Triton's name characters
_URI = re.compile(r"grpc://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]+))?"
                  r"/(?P<model>[A-Za-z0-9_.-]+)(?:/(?P<version>[0-9]+))?/?")


def parse_uri(source: str) -> tuple[str, str, str]:
    """``grpc://host[:port]/model[/version]`` -> ("host:port", model, version or "")."""
    match = _URI.fullmatch(str(source))
    if not match:
        raise HanEdgeError(f"cannot read Triton address {str(source)[:120]!r}: expected grpc://HOST[:PORT]/MODEL[/VERSION]")
    port = int(match["port"] or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise HanEdgeError(f"port {port} in {source!r} is out of range")
    return f"{match['host']}:{port}", match["model"], match["version"] or ""


def _grpc_client():
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise MissingDependencyError("Triton models (grpc://...) need tritonclient: pip install 'han-edge[serve]'") from None
    return grpcclient, InferenceServerException


def _first_line(err) -> str:
    text = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return (text or type(err).__name__).strip().splitlines()[0][:200]


class TritonBackend(Backend):
    """A Triton-served HAN model: numpy in, numpy out (the work happens on the server)."""

    xp = np
    device = "cpu"

    def __init__(self, source: str, max_batch: int | None = None, timeout_s: float = 10.0):
        grpcclient, server_error = _grpc_client()
        self._grpc, self._error = grpcclient, server_error
        self.url, self.model, self.version = parse_uri(source)
        if timeout_s <= 0:
            raise HanEdgeError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.name = f"triton/grpc://{self.url}/{self.model}"
        self.client = grpcclient.InferenceServerClient(url=self.url)
        try:
            self._connect()
        except BaseException:
            self.client.close()
            raise
        limit = self.served_max_batch
        if max_batch is not None:
            if not 1 <= max_batch <= limit:
                self.close()
                raise HanEdgeError(f"max_batch {max_batch} is outside 1..{limit}, the max_batch_size of "
                                   f"{self.model} on {self.url}")
            limit = max_batch
        preferred = [p for p in self._preferred if p <= limit]
        self.batch_profile = (1, max(preferred) if preferred else limit, limit)

    def _connect(self) -> None:
        where = f"Triton at {self.url}"
        try:
            live = self.client.is_server_live(client_timeout=self.timeout_s)
        except self._error as err:
            raise HanEdgeError(f"cannot reach {where} within {self.timeout_s:g} s: {_first_line(err)}") from None
        if not live:
            raise HanEdgeError(f"{where} answers but is not live")
        try:
            ready = self.client.is_model_ready(self.model, self.version, client_timeout=self.timeout_s)
        except self._error as err:
            raise HanEdgeError(f"{where} cannot tell whether model {self.model!r} is ready: {_first_line(err)}") from None
        if not ready:
            version = f" version {self.version}" if self.version else ""
            raise HanEdgeError(f"{where} has no ready model {self.model!r}{version}")
        try:
            config = self.client.get_model_config(self.model, self.version, client_timeout=self.timeout_s).config
        except self._error as err:
            raise HanEdgeError(f"{where} did not give the config of {self.model!r}: {_first_line(err)}") from None
        from han_edge.triton import parse_metadata_parameters

        self.metadata = parse_metadata_parameters(config.parameters)
        if "han_edge.config" not in self.metadata:
            raise HanEdgeError(f"model {self.model!r} on {self.url} carries no han-edge metadata in its config "
                               "parameters; write its repository with `han-edge triton`")
        self.config, self.precision = config_from_metadata(self.metadata, f"{self.model} on {self.url}")
        if len(config.input) != 1 or len(config.output) < 1:
            raise HanEdgeError(f"model {self.model!r} on {self.url} has {len(config.input)} inputs and "
                               f"{len(config.output)} outputs; a HAN model has one input and one feature output")
        self.input_name = config.input[0].name
        outputs = [o.name for o in config.output]
        self.output_name = "features" if "features" in outputs else outputs[0]
        height, width = self.config.input_size
        dims = list(config.input[0].dims)
        if dims != [3, height, width]:
            raise HanEdgeError(f"model {self.model!r} on {self.url} takes input dims {dims}; its metadata says "
                               f"[3, {height}, {width}]")
        if config.max_batch_size < 1:
            raise HanEdgeError(f"model {self.model!r} on {self.url} has max_batch_size {config.max_batch_size}; "
                               "han-edge needs a batching model (max_batch_size >= 1)")
        self.served_max_batch = int(config.max_batch_size)
        self._preferred = [int(p) for p in config.dynamic_batching.preferred_batch_size]

    def infer(self, batch):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[0] > self.max_batch:
            raise HanEdgeError(f"{self.name} takes (n <= {self.max_batch}, 3, H, W) batches, got {batch.shape}")
        inp = self._grpc.InferInput(self.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        out = self._grpc.InferRequestedOutput(self.output_name)
        try:
            result = self.client.infer(self.model, [inp], model_version=self.version, outputs=[out],
                                       client_timeout=self.timeout_s)
        except self._error as err:
            raise HanEdgeError(f"{self.name} failed on a batch of {batch.shape[0]}: {_first_line(err)}") from None
        features = result.as_numpy(self.output_name)
        if features is None:
            raise HanEdgeError(f"{self.name} returned no {self.output_name!r} tensor")
        return self.check_output(np.asarray(features, np.float32), batch.shape[0])

    def close(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
