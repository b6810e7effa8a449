"""Where INT8 goes: the quantisable layer groups, the float-only sampling grid, the exclusion search.

Plain functions over ONNX graphs and a scoring callback, apart from the quantiser that uses them
(``han_edge.quantize``), so the placement rules can be read and tested on their own.
"""
from __future__ import annotations

import numpy as np

WEIGHTED_OPS = ("Conv", "Gemm")
QUANTIZED_OPS = ("Conv", "Gemm", "Relu", "Sigmoid", "Mul", "Add")


def sampling_grid_nodes(model) -> list[str]:
    """Nodes computing GridSample's sampling grid, back to and including the layer that regresses it."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found: list[str] = []
    for sampler in (n for n in model.graph.node if n.op_type == "GridSample"):
        stack = [sampler.input[1]]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in found:
                continue
            found.append(node.name)
            if node.op_type not in WEIGHTED_OPS:
                stack += list(node.input)
    return found


def embedding_heads(model) -> list[str]:
    """The embedding heads' nodes (each Gemm outside the sampling grid and the ReLU after it): kept float.

    They are under 0.1% of HAN-S's multiply-adds, but their 8-bit inputs (the pooled maps) and outputs
    (the embedding itself) carried about a quarter of the INT8 error: on the demo's trained HAN-S,
    keeping both in float took the held-out squared feature distance to FP32 from 0.0069 to 0.0052
    (CPU flavour) and from 0.0116 to 0.0103 (TensorRT flavour), calibration only. ONNX Runtime CPU:
    the same speed at batch 32, 3-5% less at batch 1, where their 4 MB of float weights are read for
    every image (README, Measurements).
    """
    return [name for nodes in _groups(model)[1].values() for name in nodes]


def layer_groups(model) -> dict[str, list[str]]:
    """Quantisable nodes grouped by network part and conv kind, e.g. ``blocks.1:dw``, ``attention.2``.

    A Conv/Gemm is grouped by its name's first part (``:dw``/``:pw`` for the units' depthwise and
    pointwise convs); a ReLU, Sigmoid, Mul or Add joins the group of the first of its inputs made by
    a grouped node, so excluding a group keeps a conv and its activation in float together. The
    sampling grid (``sampling_grid_nodes``) and the embedding heads (``embedding_heads``) are never
    quantised and belong to no group.
    """
    return _groups(model)[0]


def _groups(model) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(layer groups, embedding-head groups): a group holding a Gemm is a head (the grid's are in none)."""
    groups: dict[str, list[str]] = {}
    group_of: dict[str, str] = {}   # tensor -> group of its producer
    grid = set(sampling_grid_nodes(model))
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or node.name in grid:
            continue
        part = node.name.strip("/").split("/")[0] or node.name
        if node.op_type in WEIGHTED_OPS:
            if part.startswith(("blocks.", "local_units.")) and node.op_type == "Conv":
                depthwise = any(a.name == "group" and a.i > 1 for a in node.attribute)
                part += ":dw" if depthwise else ":pw"
        else:
            part = next((group_of[i] for i in node.input if i in group_of), part)
        groups.setdefault(part, []).append(node.name)
        for out in node.output:
            group_of[out] = part
    ops = {n.name: n.op_type for n in model.graph.node}
    heads = {part: nodes for part, nodes in groups.items() if any(ops[n] == "Gemm" for n in nodes)}
    return {part: nodes for part, nodes in groups.items() if part not in heads}, heads


def check_exclusions(model, names: list[str]) -> dict[str, list[str]]:
    """``layer_groups(model)``, after checking that ``names`` (``--int8-exclude``) are among them."""
    from han_edge.errors import HanEdgeError

    groups = layer_groups(model)
    unknown = sorted(set(names) - set(groups))
    if unknown:
        raise HanEdgeError(f"--int8-exclude names unknown layer groups {unknown}; known: {', '.join(groups)} (the "
                           "embedding heads and the sampling grid are never quantised)")
    return groups


def choose_exclusions(score, groups: list[str], targets: tuple[float, float], max_excluded: int,
                      progress=None) -> tuple[dict[str, float], list[str]]:
    """Sensitivity analysis: quantise each group alone, then keep the worst out of INT8 until ``targets``.

    ``score(excluded_groups)`` is (centred cosine, nearest-neighbour agreement) against FP32 with
    those groups left unquantised; groups are ranked by the cosine they lose alone (the agreement
    of one group alone is too coarse to rank by), and both ``targets`` must be met to stop.
    Returns ({group: cosine lost quantised alone}, groups to keep in float).
    """
    sensitivity: dict[str, float] = {}
    for i, group in enumerate(groups):
        sensitivity[group] = 1 - score([g for g in groups if g != group])[0]
        if progress:
            progress(i + 1, len(groups), "sensitivity: layer groups")
    excluded: list[str] = []
    for group in sorted(sensitivity, key=sensitivity.get, reverse=True)[:max_excluded]:
        excluded.append(group)
        if all(got >= want for got, want in zip(score(excluded), targets)):
            break
    return sensitivity, excluded


def agreement_floor(min_agreement: float, crops: int) -> float:
    """``min_agreement`` less one binomial standard error of an agreement measured on ``crops`` crops.

    0.95 on 512 crops (the export's default): 0.940; on 256: 0.936. On the demo model, eleven
    calibrations and placements (full INT8 to three groups in float) all scored 0.942-0.964 on 534
    held-out crops, and isotropic noise of the same centred cosine (0.9975) 0.966: differences below
    this error are near-ties between crops (5% of them have a second neighbour within 1% of the
    first; on the benchmark's model the crops INT8 moves have a median FP32 margin of 0.25% of the
    neighbour's similarity), not the quantiser.
    """
    return min_agreement - float(np.sqrt(min_agreement * (1 - min_agreement) / max(crops, 1)))
