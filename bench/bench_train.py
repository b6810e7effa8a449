"""Training throughput (images/s, forward + backward + SGD step, batch 32) per variant on this CPU."""
from __future__ import annotations

import time

import torch

from common import write_result
from han_edge.model import build_model
from han_edge.train import TrainOptions, branch_loss, make_optimizer


def main(iters: int = 6, warmup: int = 2, batch: int = 32) -> None:
    rows = []
    for variant in ("small", "medium", "large"):
        torch.manual_seed(0)
        model = build_model(variant, num_classes=751).train()
        optimizer, _ = make_optimizer(model, TrainOptions())
        x, y = torch.randn(batch, 3, 160, 64), torch.randint(0, 751, (batch,))
        times = []
        for i in range(warmup + iters):
            start = time.perf_counter()
            loss = branch_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        rows.append({"variant": variant, "batch": batch, "seconds_per_step": median, "images_per_s": batch / median,
                     "torch_threads": torch.get_num_threads()})
        print(f"{variant:7s} {batch / median:7.1f} img/s")
    write_result("train", rows, torch=torch.__version__)


if __name__ == "__main__":
    main()
