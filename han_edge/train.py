"""Training: multi-branch softmax cross-entropy with SGD as in Section 4, scaled to a few epochs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from han_edge.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from han_edge.config import HANConfig, get_config
from han_edge.data import Item
from han_edge.errors import HanEdgeError
from han_edge.validate import MAX_BATCH, MIN_TRAIN_BATCH, whole_number
from han_edge.model import HAN
from han_edge.preprocess import images_to_batch, load_image

# Section 4: 300 epochs, lr x0.1 at 100, 200, 250 -> the same fractions of any epoch budget.
MILESTONE_FRACTIONS = (1 / 3, 2 / 3, 5 / 6)
MAX_LR = 100.0     # far above any useful rate; beyond ~3e38 SGD's float32 update overflows with a traceback


@dataclass
class TrainOptions:
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = False
    random_erasing: bool = False
    seed: int = 0
    workers: int = 0

    def check(self) -> "TrainOptions":
        """Self, or one sentence naming the first option out of range (before any data is read)."""
        def whole(name, low, high):
            whole_number(getattr(self, name), f"training option {name}", low, high)

        def real(name, positive, high):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0) or value > high:
                raise HanEdgeError(f"training option {name} must be a number {'above' if positive else 'from'} 0 "
                                   f"{'up ' if positive else ''}to {high:g}; got {value!r}")
        whole("epochs", 0, 100_000)
        whole("batch_size", MIN_TRAIN_BATCH, MAX_BATCH)
        whole("seed", 0, 2**32 - 1)
        whole("workers", 0, 1024)
        real("lr", True, MAX_LR)
        real("momentum", False, 1)
        real("weight_decay", False, 1)
        return self


class ReidImages(Dataset):
    """(image tensor, label) pairs, pre-processed by the same sampling code the runtime uses."""

    def __init__(self, items: list[Item], config: HANConfig, options: TrainOptions | None = None):
        self.items, self.config = items, config
        self.options = options or TrainOptions()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, pid, _ = self.items[index]
        x = torch.from_numpy(images_to_batch([load_image(path)], self.config.input_size,
                                             self.config.mean, self.config.std)[0])
        if self.options.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.options.random_erasing:
            x = random_erase(x)
        return x, pid


def random_erase(x: torch.Tensor, p: float = 0.5, area=(0.02, 0.4), aspect=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017b): one rectangle of noise, the paper's "RE" option."""
    if torch.rand(()) >= p:
        return x
    _, h, w = x.shape
    for _ in range(10):
        target = float(torch.empty(()).uniform_(*area)) * h * w
        ratio = float(torch.empty(()).uniform_(*aspect))
        eh, ew = int(round((target * ratio) ** 0.5)), int(round((target / ratio) ** 0.5))
        if 0 < eh < h and 0 < ew < w:
            y0, x0 = int(torch.randint(0, h - eh, ())), int(torch.randint(0, w - ew, ()))
            x = x.clone()
            x[:, y0:y0 + eh, x0:x0 + ew] = torch.randn(3, eh, ew)
            return x
    return x


def branch_loss(out: dict, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the global- and local-branch cross-entropies (Eq. 2 per branch, Section 3.1)."""
    return F.cross_entropy(out["global_logits"], labels) + F.cross_entropy(out["local_logits"], labels)


# The hard-attention FC gets the loss gradient summed over every sampled pixel of the crops it
# places; at the backbone's lr 3e-2 its translations saturate at +-1 within an epoch (regions
# pushed half outside the image, the local branch then learns from padding). As for spatial
# transformers' localisation nets, it learns at a reduced rate.
HARD_ATTENTION_LR_SCALE = 0.01


def make_optimizer(model: HAN, options: TrainOptions):
    hard = [p for name, p in model.named_parameters() if ".hard." in name]
    hard_ids = {id(p) for p in hard}
    rest = [p for p in model.parameters() if id(p) not in hard_ids]
    groups = [{"params": rest}, {"params": hard, "lr": options.lr * HARD_ATTENTION_LR_SCALE}]
    optimizer = torch.optim.SGD(groups, lr=options.lr, momentum=options.momentum,
                                weight_decay=options.weight_decay)
    milestones = sorted({max(1, round(options.epochs * f)) for f in MILESTONE_FRACTIONS})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return optimizer, scheduler


def train(train_items: list[Item], num_classes: int, out: str | Path, variant: str | None = "small",
          options: TrainOptions | None = None, resume: str | Path | None = None, dataset_name: str = "",
          progress=None) -> dict:
    """Train (or resume) and write the checkpoint after every epoch; returns a summary.

    Options and the destination are checked before anything is read or trained. A non-finite loss
    (or non-finite weights at the end of an epoch) stops training with one sentence naming the epoch
    and step; the checkpoint already at ``out`` is never overwritten with such weights.
    """
    from han_edge.paths import check_destination, ensure_folder

    options = (options or TrainOptions()).check()
    out = Path(out)
    if not out.parent.exists():
        ensure_folder(out.parent, "checkpoint folder")
    check_destination(out, "checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    start_epoch = 0
    if resume:
        state = load_checkpoint(resume)
        config = checkpoint_config(state, resume)
        missing = [k for k in ("epoch", "num_classes", "optimizer", "scheduler", "loader_rng", "torch_rng")
                   if k not in state]
        if missing:
            raise HanEdgeError(f"checkpoint {resume} cannot be resumed: it holds no training state ({', '.join(missing)})")
        if variant is not None and config.variant != variant:
            raise HanEdgeError(f"checkpoint {resume} holds HAN({config.variant}), not HAN({variant})")
        if isinstance(state["num_classes"], bool) or state["num_classes"] != num_classes:
            raise HanEdgeError(f"checkpoint {resume} was trained on {state['num_classes']} identities, "
                               f"this dataset has {num_classes}")
        model = HAN(config, num_classes)
        try:
            model.load_state_dict(state["state_dict"])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
            raise HanEdgeError(f"checkpoint {resume} does not fit HAN({config.variant}): "
                               f"{str(err).splitlines()[0][:200]}") from None
    else:
        config = get_config(variant or "small")
        model = HAN(config, num_classes)
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, options)
    generator = torch.Generator().manual_seed(options.seed)
    if resume:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["loader_rng"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
            raise HanEdgeError(f"checkpoint {resume} cannot be resumed: its training state is damaged "
                               f"({str(err).splitlines()[0][:150]})") from None
        start_epoch = state["epoch"]
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise HanEdgeError(f"checkpoint {resume} cannot be resumed: its epoch {start_epoch!r} is not a count")
        if start_epoch >= options.epochs:   # nothing to train: say so, never "wrote" a file that was not written
            raise HanEdgeError(f"checkpoint {resume} has trained {start_epoch} epochs, the whole --epochs "
                               f"{options.epochs} budget; raise --epochs to train on")
    if len(train_items) < options.batch_size:
        raise HanEdgeError(f"only {len(train_items)} training images; need at least one batch of {options.batch_size}")
    loader = DataLoader(ReidImages(train_items, config, options), batch_size=options.batch_size, shuffle=True,
                        drop_last=True, num_workers=options.workers, generator=generator)
    history = []

    def write(epoch: int) -> None:
        save_checkpoint(out, model, config, epoch=epoch, optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), loader_rng=generator.get_state(),
                        torch_rng=torch.get_rng_state(), dataset=dataset_name, history=history)

    for epoch in range(start_epoch, options.epochs):
        seen, loss_sum, started = 0, 0.0, time.perf_counter()
        for step, (images, labels) in enumerate(loader, 1):
            images, labels = images.to(device), labels.to(device)
            loss = branch_loss(model(images), labels)
            value = loss.detach().item()
            if not math.isfinite(value):
                raise HanEdgeError(f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step} "
                                   f"(lr {options.lr:g}); {_kept(out)}, try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            loss_sum += value * len(labels)
            if progress:
                progress(epoch=epoch + 1, epochs=options.epochs, loss=loss_sum / seen,
                         rate=seen / (time.perf_counter() - started), advance=len(labels))
        scheduler.step()
        bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise HanEdgeError(f"training diverged: weights {bad} are not finite after epoch {epoch + 1}, step {step} "
                               f"(lr {options.lr:g}); {_kept(out)}, try a lower --lr")
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen,
                        "images_per_s": seen / (time.perf_counter() - started)})
        write(epoch + 1)
    if start_epoch >= options.epochs and not resume:   # --epochs 0: the untrained baseline, same file format
        write(0)
    return {"checkpoint": str(out), "variant": config.variant, "device": str(device), "history": history}


def _kept(out: Path) -> str:
    return f"the checkpoint {out} of the last finite epoch is kept" if out.is_file() else "nothing was written"
