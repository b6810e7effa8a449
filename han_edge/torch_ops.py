"""ONNX operators in PyTorch, as han-edge's export writes them: the table ``qdq_finetune.QDQGraph`` runs.

One function per operator over (inputs, attributes); each follows the ONNX definition for the forms the
export produces (opset 17 and 19) and refuses any other form with one sentence rather than computing
something else. Tested against ONNX Runtime in ``tests/test_qdq_finetune.py``.
"""
from __future__ import annotations

import numpy as np

from han_edge.errors import HanEdgeError


def torch_and_functional():
    import torch
    import torch.nn.functional as F

    return torch, F


def unsupported(what: str):
    return HanEdgeError(f"INT8 fine-tuning does not support {what} (han-edge's export never writes it)")


def _axes(ins, attrs, rank: int) -> tuple[int, ...]:
    if "axes" in attrs:
        return tuple(attrs["axes"])
    if len(ins) > 1 and ins[1] is not None and ins[1].numel():
        return tuple(int(a) for a in ins[1].tolist())
    if attrs.get("noop_with_empty_axes", 0):
        raise unsupported("a reduction with noop_with_empty_axes")
    return tuple(range(rank))   # no axes: every axis


def _reduce(ins, attrs, how: str):
    torch, _ = torch_and_functional()
    dims, keep = _axes(ins, attrs, ins[0].dim()), bool(attrs.get("keepdims", 1))
    if how == "mean":
        return ins[0].mean(dim=dims, keepdim=keep)
    return torch.linalg.vector_norm(ins[0], dim=dims, keepdim=keep)   # gradient 0, not NaN, at a zero row


def _conv(ins, attrs):
    _, F = torch_and_functional()
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if ins[0].dim() != 4 or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" or pads[:2] != pads[2:]:
        raise unsupported("a Conv other than 2-D with explicit symmetric padding")
    return F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs.get("strides", 1),
                    tuple(pads[:2]), attrs.get("dilations", 1), attrs.get("group", 1))


def _gemm(ins, attrs):
    a = ins[0].t() if attrs.get("transA", 0) else ins[0]
    b = ins[1].t() if attrs.get("transB", 0) else ins[1]
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out + attrs.get("beta", 1.0) * ins[2] if len(ins) > 2 and ins[2] is not None else out


def _batch_norm(ins, attrs):
    x, scale, bias, mean, var = ins
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - mean.view(shape)) / (var.view(shape) + attrs.get("epsilon", 1e-5)).sqrt() * scale.view(shape)
            + bias.view(shape))


def _flatten(ins, attrs):
    x = ins[0]
    axis = attrs.get("axis", 1)
    axis += x.dim() if axis < 0 else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _reshape(ins, attrs):
    shape = [int(v) for v in ins[1].tolist()]
    if not attrs.get("allowzero", 0):
        shape = [ins[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return ins[0].reshape(shape)


def _slice(ins, attrs):
    data, starts, ends = ins[0], ins[1].tolist(), ins[2].tolist()
    axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else range(len(starts))
    steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    if any(step < 1 for step in steps):
        raise unsupported("a Slice with a negative step")
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, min(end, data.shape[axis]), step)
    return data[tuple(index)]


def _resize(ins, attrs):
    _, F = torch_and_functional()
    if (attrs.get("mode") != b"linear" or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"half_pixel"
            or len(ins) < 4 or ins[3] is None or ins[0].dim() != 4 or attrs.get("antialias", 0) or "axes" in attrs
            or attrs.get("keep_aspect_ratio_policy", b"stretch") != b"stretch"):
        raise unsupported("a Resize other than 2-D bilinear, half-pixel, to given sizes")
    return F.interpolate(ins[0], size=[int(v) for v in ins[3].tolist()[2:]], mode="bilinear", align_corners=False)


def _grid_sample(ins, attrs):
    _, F = torch_and_functional()
    return F.grid_sample(ins[0], ins[1], mode=attrs.get("mode", b"bilinear").decode(),
                         padding_mode=attrs.get("padding_mode", b"zeros").decode(),
                         align_corners=bool(attrs.get("align_corners", 0)))


def _constant(ins, attrs):
    torch, _ = torch_and_functional()
    from onnx import numpy_helper

    if "value" not in attrs:
        raise unsupported("a Constant without a tensor 'value'")
    return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))


def _shape(ins, attrs):
    torch, _ = torch_and_functional()
    shape = list(ins[0].shape)[attrs.get("start", 0):attrs.get("end", None)]
    return torch.tensor(shape, dtype=torch.int64)


def _expand(ins, attrs):
    torch, _ = torch_and_functional()
    return ins[0].expand(torch.broadcast_shapes(ins[0].shape, tuple(int(v) for v in ins[1].tolist())))


def _div(ins, attrs):
    torch, _ = torch_and_functional()
    floating = ins[0].is_floating_point() or ins[1].is_floating_point()
    return ins[0] / ins[1] if floating else torch.div(ins[0], ins[1], rounding_mode="trunc")


def _transpose(ins, attrs):
    return ins[0].permute(*attrs.get("perm", range(ins[0].dim() - 1, -1, -1)))


OPS = {
    "Conv": _conv, "Gemm": _gemm, "BatchNormalization": _batch_norm,
    "Relu": lambda i, a: i[0].clamp(min=0), "Sigmoid": lambda i, a: i[0].sigmoid(), "Tanh": lambda i, a: i[0].tanh(),
    "Add": lambda i, a: i[0] + i[1], "Mul": lambda i, a: i[0] * i[1], "Div": _div,
    "GlobalAveragePool": lambda i, a: i[0].mean(dim=(2, 3), keepdim=True),
    "ReduceMean": lambda i, a: _reduce(i, a, "mean"), "ReduceL2": lambda i, a: _reduce(i, a, "l2"),
    "Clip": lambda i, a: i[0].clamp(i[1] if len(i) > 1 else None, i[2] if len(i) > 2 else None),
    "Flatten": _flatten, "Reshape": _reshape, "Shape": _shape, "Slice": _slice, "Expand": _expand,
    "Concat": lambda i, a: torch_and_functional()[0].cat(i, dim=a["axis"]), "Transpose": _transpose,
    "Resize": _resize, "GridSample": _grid_sample, "Constant": _constant,
}
