"""PyTorch: a training checkpoint on CUDA (or the CPU), run on torch tensors through the array API.

On a GPU machine this is the device pipeline without TensorRT or CuPy: pre-processing, inference and
matching all run on torch CUDA tensors. On the CPU the same code runs on CPU tensors, which is how
CI executes what a CUDA machine runs.
"""
from __future__ import annotations

import re
from pathlib import Path

from han_edge.backends.base import Backend
from han_edge.errors import HanEdgeError, MissingDependencyError

PRECISIONS = ("fp32", "fp16")


class TorchBackend(Backend):
    def __init__(self, path: Path, device: str | None = None, max_batch: int | None = None, precision: str = "fp32"):
        try:
            import torch
        except ImportError:
            raise MissingDependencyError("running a .pt checkpoint needs PyTorch: pip install torch") from None
        import array_api_compat.torch as xp

        from han_edge.checkpoint import model_from_checkpoint
        from han_edge.config import model_metadata

        if precision not in PRECISIONS:
            raise HanEdgeError(f"PyTorch runs checkpoints in {' or '.join(PRECISIONS)}, not {precision!r}")
        self.device = _device(torch, device)
        if precision == "fp16" and self.device.type != "cuda":
            raise HanEdgeError("fp16 PyTorch inference is for CUDA; on the CPU use fp32")
        model, self.config, _ = model_from_checkpoint(path)
        self.precision = precision
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        self.model = model.to(self.device, self._dtype).eval()
        self.metadata = model_metadata(self.config, precision)
        self.xp = xp
        self.name = f"pytorch/{self.device.type}"
        self.batch_profile = (1, min(32, max_batch or 64), max_batch or 64)
        self._torch = torch

    def infer(self, batch):
        torch = self._torch
        with torch.inference_mode():
            x = batch.to(self.device, self._dtype).contiguous()
            return self.check_output(self.model(x).float(), batch.shape[0])


def _device(torch, device):
    """'cpu', 'cuda', 'cuda:N' or a torch.device of those; a number N is cuda:N, as torch reads it (never the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    number = isinstance(device, int) and not isinstance(device, bool) and device >= 0
    text = f"cuda:{device}" if number else str(device) if isinstance(device, (str, torch.device)) else None
    if text is None or not re.fullmatch(r"cpu|cuda(:\d{1,4})?", text):      # meta, mps, xla: not what runs here
        raise HanEdgeError(f"unknown PyTorch device {device!r:.40}; use 'cpu', 'cuda' or 'cuda:N'")
    said = f"device {device} means {text}, which" if number else f"device {text!r}"
    if text != "cpu" and not torch.cuda.is_available():
        raise MissingDependencyError(f"{said} needs PyTorch with CUDA and an NVIDIA GPU; none is usable here")
    device = torch.device(text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise HanEdgeError(f"{said} is not here: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
