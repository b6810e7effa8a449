"""`han-edge train | eval | visualize | demo`."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer
from rich.table import Table

from han_edge.cli.common import (MAX_BATCH, app, console, finite_positive, model_source, output_file, output_folder, progress_bar,
                                 write_json)
from han_edge.validate import MIN_TRAIN_BATCH

Dataset = Literal["synthetic", "market1501", "dukemtmc", "msmt17", "cuhk03", "cuhk03-detected", "imagefolder"]
Variant = Literal["small", "medium", "large"]


# -- train / eval ------------------------------------------------------------------------------------------
@app.command()
def train(
    dataset: Dataset = typer.Option("synthetic", help="which dataset (see --root)"),
    root: Optional[Path] = typer.Option(None, help="dataset folder (synthetic: where to generate it; default data/synthetic)"),
    variant: Optional[Variant] = typer.Option(None, help="small, medium or large (Table 1); default small, or the --resume checkpoint's"),
    epochs: int = typer.Option(12, min=0, max=100_000, help="epoch budget; lr milestones at 1/3, 2/3, 5/6 of it (paper: 300); 0 writes the untrained baseline"),
    batch_size: int = typer.Option(32, min=MIN_TRAIN_BATCH, max=MAX_BATCH, help="images per SGD step (at least 2: BatchNorm)"),
    lr: float = typer.Option(3e-2, callback=finite_positive, help="SGD learning rate (above 0, at most 100)"),
    flip: bool = typer.Option(False, help="random horizontal flip"),
    random_erasing: bool = typer.Option(False, help="random erasing (the paper's RE rows)"),
    resume: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="checkpoint to continue from"),
    out: Path = typer.Option(Path("runs/han_small.pt"), callback=output_file("checkpoint"),
                             help="checkpoint written after every epoch (checked before training starts)"),
    seed: int = typer.Option(0, min=0, max=2**32 - 1),
):
    """Train HAN with multi-branch cross-entropy and SGD (Section 4); runs on CPU, uses CUDA when present."""
    from han_edge.data import load_dataset
    from han_edge.train import TrainOptions
    from han_edge.train import train as run_training

    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, flip=flip, random_erasing=random_erasing,
                           seed=seed).check()   # before the data set is read (or generated)
    data = load_dataset(dataset, root)
    console.print(f"{data.name}: {len(data.train)} training images of {data.num_train_pids} identities")
    with progress_bar() as bar:
        task = bar.add_task("train", total=None, info="")

        def report(epoch, epochs, loss, rate, advance):
            bar.update(task, advance=advance, description=f"epoch {epoch}/{epochs}",
                       info=f"loss {loss:.3f}  {rate:.1f} img/s")
        per_epoch = len(data.train) // batch_size * batch_size
        bar.update(task, total=per_epoch * epochs)
        if resume:
            from han_edge.checkpoint import load_checkpoint
            done = load_checkpoint(resume).get("epoch", 0)     # train() refuses a checkpoint without training state
            bar.update(task, completed=per_epoch * min(done, epochs) if isinstance(done, int) else 0)
        summary = run_training(data.train, data.num_train_pids, out, variant, options, resume, data.name, report)
    last = summary["history"][-1] if summary["history"] else {}
    loss = f"final loss {last['loss']:.3f}" if "loss" in last else "no training steps: untrained weights"
    console.print(f"wrote {out} (HAN({summary['variant']}), {summary['device']}, {loss})")


def print_metrics(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("rank-1", "rank-5", "rank-10", "mAP", "queries"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{100 * result[k]:.1f}" for k in ("rank1", "rank5", "rank10", "mAP")),
                  f"{result['num_valid_query']}/{result['num_query']}")
    console.print(table)


@app.command("eval")
def evaluate(
    checkpoint: str = typer.Option(..., "--checkpoint", "--model", callback=model_source,
                                   help=".pt checkpoint, .onnx, .plan or grpc://host:8001/name (Triton)"),
    dataset: Dataset = typer.Option("synthetic"),
    root: Optional[Path] = typer.Option(None),
    rerank: bool = typer.Option(False, help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)"),
    multi_query: bool = typer.Option(False, help="Market-1501 multi-query (same-camera query average)"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report"),
                                           help="write rank1/5/10, mAP (0..1) and num_query here"),
):
    """CMC rank-1/5/10 and mAP under the Market-1501 protocol, with any runtime backend."""
    from han_edge.data import load_dataset
    from han_edge.jobs import evaluate_model

    data = load_dataset(dataset, root)
    with progress_bar() as bar:
        task = bar.add_task("embed", total=len(data.query) + len(data.gallery), info=str(checkpoint))
        result = evaluate_model(checkpoint, data, rerank, multi_query, progress=lambda n: bar.advance(task, n))
    print_metrics(result, f"{data.name} · {result['backend']} {result['precision']} · HAN({result['variant']})"
                          f"{' · re-ranked' if rerank else ''}{' · multi-query' if multi_query else ''}")
    write_json(as_json, {k: v for k, v in result.items() if k not in ("cmc", "first_rank")} | {"cmc": result["cmc"][:20]})


# -- visualize / demo --------------------------------------------------------------------------------------
@app.command()
def visualize(
    checkpoint: Path = typer.Option(..., exists=True, dir_okay=False),
    image: Path = typer.Option(..., exists=True, dir_okay=False),
    out: Path = typer.Option(Path("attention.png"), callback=output_file("attention picture"), help="a .png file"),
):
    """PNG of the hard-attention regions (3 levels x 4) and soft spatial attention maps (Fig. 7)."""
    from han_edge.visualize import attention_figure

    attention_figure(checkpoint, image, out)
    console.print(f"wrote {out}")


@app.command()
def demo(
    epochs: int = typer.Option(8, min=0, max=100_000, help="training epochs on the synthetic set"),
    workdir: Path = typer.Option(Path("runs/demo"), callback=output_folder("demo --workdir")),
    batch: int = typer.Option(32, min=1, max=MAX_BATCH, help="batch size for the throughput column"),
):
    """Synthetic set -> train HAN(Small) -> export FP32 + INT8 -> gallery search per precision, one table."""
    from han_edge.jobs import run_demo

    run_demo(epochs, workdir, batch, console, progress_bar)


