"""INT8 fine-tuning on the Q/DQ graph itself: the file's own quantisation, learned against FP32.

Post-training quantisation leaves HAN's features at a centred cosine of ~0.997-0.998 against FP32,
and on some trained models that moves the nearest neighbour of ~5% of crops (issue 11); nine out of
ten parts of that error come from the 8-bit *activations* (INT8 weights alone: 0.99975). Calibration
choices (percentile, entropy, MinMax, MSE clipping), bias correction and range equalisation did not
move it, nor did a fake-quantised distillation in PyTorch whose quantisers were not where ONNX
Runtime puts them. So the fine-tune runs the quantised ONNX graph as it is:
``QDQGraph`` executes it in PyTorch node by node, every QuantizeLinear/DequantizeLinear pair a fake
quantiser at the file's own place, with the file's scales and zero points (straight-through
rounding). It learns, against the FP32 model's features of the calibration images (and their
mirror images), the INT8 weights (per-channel scales fixed), the float biases and the activation
scales (as a log-ratio to the calibrated scale, LSQ-style); ``write_back`` puts them into the same
graph. Nothing else of the file changes: placement, zero points, op types and the ONNX Runtime kernels
that run it. Measured on four trained HAN-S (README, Measurements): 14-24% less squared feature
distance to FP32 on held-out crops; the nearest-neighbour agreement does not move beyond its noise.

Hand-written because no converter takes Q/DQ graphs: onnx2torch (1.5.15) has no QuantizeLinear,
DequantizeLinear or GridSample and needs Conv weights as initializers, where a Q/DQ graph has them
behind DequantizeLinear. ``han_edge.torch_ops.OPS`` covers the operators han-edge's export writes;
any other is one sentence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.onnx_io import node_attributes
from han_edge.torch_ops import OPS, torch_and_functional, unsupported


def _ste_round(v):
    return v + (v.round() - v).detach()


def _qrange(zero_point_dtype) -> tuple[int, int]:
    info = np.iinfo(zero_point_dtype)
    return int(info.min), int(info.max)


def QDQGraph(model):   # noqa: N802 - a class made on first use, so this module imports without torch
    """PyTorch module executing the Q/DQ ONNX ``model`` with fake quantisation (see the module docstring)."""
    torch, _ = torch_and_functional()
    from onnx import numpy_helper

    class _QDQGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            graph = model.graph
            self.model = model
            self.consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
            self.nodes = [(n, node_attributes(n)) for n in graph.node]
            unknown = sorted({n.op_type for n, _ in self.nodes} - set(OPS) - {"QuantizeLinear", "DequantizeLinear"})
            if unknown:
                raise HanEdgeError(f"INT8 fine-tuning cannot run operators {', '.join(unknown)}")
            self.params = torch.nn.ParameterDict()
            self.param_of: dict[str, str] = {}   # initializer -> parameter key
            self.weights: dict[int, tuple] = {}  # index of a weight DequantizeLinear -> (int8 initializer, scale)
            self.scales: dict[str, float] = {}   # activation scale initializer -> calibrated value (learned: log-ratio)
            self.last_use: dict[str, int] = {}   # tensor -> index of the last node reading it (freed after it)
            for index, (node, attrs) in enumerate(self.nodes):
                for name in node.input:
                    self.last_use[name] = index
                if node.op_type == "DequantizeLinear" and self._is_weight(node.input[0]):
                    self.weights[index] = self._weight(node, attrs)
                elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    self._activation_quantizer(node)
                elif node.op_type in ("Conv", "Gemm"):
                    for name in node.input[1:3]:   # float weights (kept out of INT8) and biases
                        if name in self.consts and self.consts[name].dtype == np.float32:
                            self._learn(name, self.consts[name])
            for name in (o.name for o in graph.output):
                self.last_use[name] = len(self.nodes)

        def _is_weight(self, name: str) -> bool:
            value = self.consts.get(name)
            return value is not None and value.dtype == np.int8 and value.ndim > 1

        def _weight(self, node, attrs) -> tuple:
            q, zero = self.consts[node.input[0]], node.input[2] if len(node.input) > 2 else ""
            if zero and (zero not in self.consts or self.consts[zero].any()):
                raise unsupported(f"INT8 weights with a zero point ({node.input[0]})")
            shape = [1] * q.ndim
            shape[attrs.get("axis", 1) % q.ndim] = -1
            scale = torch.from_numpy(np.array(self.consts[node.input[1]], np.float32).reshape(shape))
            self._learn(node.input[0], q.astype(np.float32) * scale.numpy())
            return node.input[0], scale

        def _activation_quantizer(self, node) -> None:
            scale, zero = node.input[1], node.input[2] if len(node.input) > 2 else ""
            value = self.consts.get(scale)
            if value is None or value.ndim != 0 or value.dtype != np.float32 or (zero and zero not in self.consts):
                raise unsupported(f"{node.op_type} {node.name!r} other than per-tensor with a float32 scale "
                                   "and zero point stored in the file")
            if scale not in self.scales:
                self.scales[scale] = float(value)
                self._learn(scale, np.zeros((), np.float32))

        def _learn(self, name: str, value: np.ndarray) -> None:
            if name not in self.param_of:
                self.param_of[name] = f"p{len(self.params)}"
                self.params[self.param_of[name]] = torch.nn.Parameter(torch.from_numpy(np.array(value, np.float32)))

        def scale_parameters(self) -> list:
            return [self.params[self.param_of[n]] for n in self.scales]

        def other_parameters(self) -> list:
            return [self.params[k] for n, k in self.param_of.items() if n not in self.scales]

        def _value(self, name: str, env: dict):
            if name in env:
                return env[name]
            if name in self.scales:
                return self.scales[name] * self.params[self.param_of[name]].exp()
            if name in self.param_of:
                return self.params[self.param_of[name]]
            return torch.from_numpy(np.array(self.consts[name]))

        def _quantizer(self, node, ins):
            zero_name = node.input[2] if len(node.input) > 2 else ""
            zero_type = self.consts[zero_name].dtype if zero_name else np.uint8   # ONNX's default: uint8, 0
            zero = float(self.consts[zero_name]) if zero_name else 0.0
            if node.op_type == "QuantizeLinear":   # levels as floats, consumed by the DequantizeLinear after it
                lo, hi = _qrange(zero_type)
                return (_ste_round(ins[0] / ins[1]) + zero).clamp(lo, hi)
            return (ins[0].float() - zero) * ins[1]

        def forward(self, x):
            env = {self.model.graph.input[0].name: x}
            for index, (node, attrs) in enumerate(self.nodes):
                if index in self.weights:
                    q_name, scale = self.weights[index]
                    out = _ste_round(self.params[self.param_of[q_name]] / scale).clamp(-127, 127) * scale
                else:
                    ins = [self._value(i, env) if i else None for i in node.input]
                    quantizer = node.op_type in ("QuantizeLinear", "DequantizeLinear")
                    out = self._quantizer(node, ins) if quantizer else OPS[node.op_type](ins, attrs)
                env[node.output[0]] = out
                for name in node.input:            # activations no later node reads
                    if self.last_use.get(name) == index:
                        env.pop(name, None)
            return env[self.model.graph.output[0].name]

        def write_back(self):
            """The ONNX model with the learned INT8 weights, float biases and activation scales."""
            import onnx

            out = onnx.ModelProto()
            out.CopyFrom(self.model)
            inits = {i.name: i for i in out.graph.initializer}
            with torch.no_grad():
                learned = dict(self.weights.values())
                for name, key in self.param_of.items():
                    value = self.params[key].detach()
                    if name in learned:   # the forward pass's own rounding
                        array = (value / learned[name]).round().clamp(-127, 127).numpy().astype(np.int8)
                    elif name in self.scales:
                        array = np.array(self._value(name, {}).item(), dtype=np.float32)
                    else:
                        array = value.numpy().astype(np.float32)
                    inits[name].CopyFrom(numpy_helper.from_array(array, name))
            return out

    return _QDQGraph()


MAX_STEPS = 100_000


def check_steps(steps) -> None:
    """``steps`` of fine-tuning as an option: a whole number from 0 (no fine-tune) to ``MAX_STEPS``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
        raise HanEdgeError(f"int8_finetune must be a whole number of steps from 0 to {MAX_STEPS}, not {steps!r}")


@dataclass
class FinetuneResult:
    steps: int
    loss_before: float   # squared feature distance to FP32, mean over the held-out crops
    loss_after: float
    kept: bool           # False: the fine-tune did not lower the held-out loss and the PTQ model stands


def finetune_qdq(model, images: np.ndarray, teacher, heldout: np.ndarray, heldout_reference: np.ndarray,
                 steps: int = 200, batch: int = 32, lr: float = 3e-5, scale_lr: float = 2e-3, seed: int = 0,
                 judge=None, progress=None):
    """(Q/DQ model after ``steps`` of fine-tuning towards ``teacher``'s features, ``FinetuneResult``).

    ``teacher(batch) -> features`` is the FP32 model; ``images`` (calibration crops) and their mirror
    images are the training set. The result is kept only if it lowers the squared feature distance
    to FP32 on ``heldout`` (crops it never trained on, with their FP32 ``heldout_reference``), as
    ``judge(model) -> distance`` measures it (default: this module's own execution; the INT8 export
    judges with ONNX Runtime, whose integer kernels round differently). A step whose loss or
    gradients are not finite is skipped.
    """
    torch, _ = torch_and_functional()
    if steps < 1 or len(images) == 0:
        raise HanEdgeError("INT8 fine-tuning needs at least one step and one image")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    graph = QDQGraph(model)
    train = np.concatenate([images, images[..., ::-1]])
    targets = np.concatenate([teacher(images), teacher(np.ascontiguousarray(images[..., ::-1]))])

    def own_distance(_model) -> float:   # the module's current state is the model judged (before, then after)
        with torch.no_grad():
            return float(sum(((graph(torch.from_numpy(heldout[i:i + 64])) - torch.from_numpy(heldout_reference[i:i + 64]))
                              ** 2).sum() for i in range(0, len(heldout), 64)) / len(heldout))

    judge = judge or own_distance
    before = judge(model)
    parameters = graph.other_parameters() + graph.scale_parameters()
    optimiser = torch.optim.Adam([{"params": graph.other_parameters(), "lr": lr},
                                  {"params": graph.scale_parameters(), "lr": scale_lr}])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for step in range(steps):
        pick = rng.choice(len(train), min(batch, len(train)), replace=False)
        x, y = torch.from_numpy(np.ascontiguousarray(train[pick])), torch.from_numpy(targets[pick])
        loss = ((graph(x) - y) ** 2).sum(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        if torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None):
            optimiser.step()
        schedule.step()
        if progress:
            progress(step + 1, steps)
    tuned = graph.write_back()
    after = judge(tuned)
    kept = bool(after < before)   # NaN compares False
    return (tuned if kept else model), FinetuneResult(steps, float(before), float(after), kept)
