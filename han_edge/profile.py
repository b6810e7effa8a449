"""Cost profiler: parameters and multiply-adds per variant (against Table 1), latency per backend."""
from __future__ import annotations

from han_edge.config import VARIANTS, get_config
from han_edge.formats import model_digest


def count_cost(variant: str) -> dict:
    """Deployed parameters and MACs at 1x3xHxW, counted by PyTorch's own FLOP counter.

    ``torch.utils.flop_counter`` counts conv/linear (mm, addmm) as 2 FLOPs per multiply-add,
    which is also the paper's convention for Table 1; elementwise ops, pooling and
    grid_sample are not counted, as in the paper.
    """
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        from han_edge.errors import MissingDependencyError
        raise MissingDependencyError("counting FLOPs builds the PyTorch model: pip install torch") from None

    from han_edge.model import build_model, deployed_parameters

    config = get_config(variant)
    model = build_model(config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *config.input_size))
    flops = counter.get_total_flops()
    return {
        "variant": config.variant,
        "params": deployed_parameters(model),
        "macs": flops // 2,
        "flops": flops,
        "paper_flops": config.paper_flops,
        "ratio": flops / config.paper_flops,
        "strides": list(config.strides),
    }


def variants_of(selection: str) -> list[str]:
    return list(VARIANTS) if selection == "all" else [get_config(selection).variant]


def measure_throughput(model_path, batch: int = 32, iters: int = 10, warmup: int = 2) -> dict:
    """Median inference time of one batch through the runtime (pre-processing excluded)."""
    import time

    import numpy as np

    from han_edge.runtime import Embedder

    from han_edge.arrays import from_numpy
    from han_edge.cuda import synchronize

    embedder = Embedder(model_path)
    x = np.random.default_rng(0).normal(size=(batch, 3, *embedder.config.input_size)).astype(np.float32)
    x = from_numpy(embedder.xp, x, embedder.array_device)          # on the backend's device, as in production
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        out = embedder.embed_batch(x, on_device=True)
        if embedder.device == "cuda":
            synchronize(embedder.xp)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"backend": embedder.name, "precision": embedder.precision, "variant": embedder.config.variant,
            "ms_per_image": median / batch * 1e3, "images_per_s": batch / median, "feature_dim": out.shape[1]}


def cost_table(models, batch: int = 32, iters: int = 10, eval_result: dict | None = None) -> list[dict]:
    """One row per model file: MACs/params of its variant and measured speed (and rank-1 if given)."""
    rows = []
    costs = {}
    for path in models:
        speed = measure_throughput(path, batch, iters)
        variant = speed["variant"]
        if variant not in costs:
            costs[variant] = count_cost(variant)
        rank1 = None   # only for the very file the eval report scored (other weights of the same variant differ)
        if eval_result and eval_result.get("model_digest") == model_digest(path):
            rank1 = eval_result.get("rank1")
        rows.append({"model": str(path), **speed, "macs": costs[variant]["macs"],
                     "params": costs[variant]["params"], "rank1": rank1})
    return rows
