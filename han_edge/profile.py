"""Cost profiler: parameters and multiply-adds per variant (against Table 1), latency per backend."""
from __future__ import annotations

from han_edge.config import VARIANTS, get_config


def count_cost(variant: str) -> dict:
    """Deployed parameters and MACs at 1x3xHxW, counted by PyTorch's own FLOP counter.

    ``torch.utils.flop_counter`` counts conv/linear (mm, addmm) as 2 FLOPs per multiply-add,
    which is also the paper's convention for Table 1; elementwise ops, pooling and
    grid_sample are not counted, as in the paper.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

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
