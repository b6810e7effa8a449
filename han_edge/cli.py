"""Command-line interface: `han-edge train | eval | export | build | inspect | embed | match | bench | profile | visualize | demo`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from han_edge.errors import HanEdgeError, MissingDependencyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
profile_app = typer.Typer(no_args_is_help=True, help="FLOPs/params per variant and cost-effectiveness tables.")
app.add_typer(profile_app, name="profile")
console = Console()


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def write_json(path: Optional[Path], data) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=_jsonable))
        console.print(f"wrote {path}")


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# -- train / eval ------------------------------------------------------------------------------------------
@app.command()
def train(
    dataset: str = typer.Option("synthetic", help="synthetic, market1501, dukemtmc, msmt17, cuhk03, cuhk03-detected, imagefolder"),
    root: Optional[Path] = typer.Option(None, help="dataset folder (synthetic: where to generate it; default data/synthetic)"),
    variant: Optional[str] = typer.Option(None, help="small, medium or large (Table 1); default small, or the --resume checkpoint's"),
    epochs: int = typer.Option(12, help="epoch budget; lr milestones at 1/3, 2/3, 5/6 of it (paper: 300)"),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(3e-2),
    flip: bool = typer.Option(False, help="random horizontal flip"),
    random_erasing: bool = typer.Option(False, help="random erasing (the paper's RE rows)"),
    resume: Optional[Path] = typer.Option(None, help="checkpoint to continue from"),
    out: Path = typer.Option(Path("runs/han_small.pt"), help="checkpoint written after every epoch"),
    seed: int = typer.Option(0),
):
    """Train HAN with multi-branch cross-entropy and SGD (Section 4); runs on CPU, uses CUDA when present."""
    from han_edge.data import load_dataset
    from han_edge.train import TrainOptions
    from han_edge.train import train as run_training

    data = load_dataset(dataset, root)
    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, flip=flip, random_erasing=random_erasing,
                           seed=seed)
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
            bar.update(task, completed=per_epoch * load_checkpoint(resume)["epoch"])
        summary = run_training(data.train, data.num_train_pids, out, variant, options, resume, data.name, report)
    last = summary["history"][-1] if summary["history"] else {}
    console.print(f"wrote {out} (HAN({summary['variant']}), {summary['device']}, final loss {last.get('loss', float('nan')):.3f})")


def print_metrics(result: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("rank-1", "rank-5", "rank-10", "mAP", "queries"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{100 * result[k]:.1f}" for k in ("rank1", "rank5", "rank10", "mAP")),
                  f"{result['num_valid_query']}/{result['num_query']}")
    console.print(table)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "--model", help=".pt checkpoint, .onnx or .plan"),
    dataset: str = typer.Option("synthetic"),
    root: Optional[Path] = typer.Option(None),
    rerank: bool = typer.Option(False, help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)"),
    multi_query: bool = typer.Option(False, help="Market-1501 multi-query (same-camera query average)"),
    as_json: Optional[Path] = typer.Option(None, "--json", help="write rank1/5/10, mAP (0..1) and num_query here"),
):
    """CMC rank-1/5/10 and mAP under the Market-1501 protocol, with any runtime backend."""
    from han_edge.data import load_dataset
    from han_edge.evaluate import evaluate_model

    data = load_dataset(dataset, root)
    with progress_bar() as bar:
        task = bar.add_task("embed", total=len(data.query) + len(data.gallery), info=str(checkpoint))
        result = evaluate_model(checkpoint, data, rerank, multi_query, progress=lambda n: bar.advance(task, n))
    print_metrics(result, f"{data.name} · {result['backend']} {result['precision']} · HAN({result['variant']})"
                          f"{' · re-ranked' if rerank else ''}{' · multi-query' if multi_query else ''}")
    write_json(as_json, {k: v for k, v in result.items() if k != "cmc"} | {"cmc": result["cmc"][:20]})


# -- export / inspect ----------------------------------------------------------------------------------------
@app.command()
def export(
    variant: str = typer.Option("small"),
    checkpoint: Optional[Path] = typer.Option(None, help="trained checkpoint (default: fresh weights)"),
    fp16: bool = typer.Option(False, help="also write the FP16 model"),
    int8: bool = typer.Option(False, help="also write the calibrated INT8 Q/DQ model"),
    target: str = typer.Option("tensorrt", help="INT8 flavour: tensorrt (symmetric S8) or cpu (U8 activations, ORT)"),
    int8_exclude: Optional[str] = typer.Option(None, help="comma-separated layer groups kept in float (skips the sensitivity analysis)"),
    calibration: str = typer.Option("percentile", help="percentile, entropy or minmax"),
    calib: Optional[Path] = typer.Option(None, help="folder of calibration crops (default: synthetic training images)"),
    calib_size: int = typer.Option(256, help="number of calibration images"),
    max_batch: int = typer.Option(64, help="engine profile maximum batch"),
    opt_batch: int = typer.Option(32, help="engine profile optimum batch"),
    workspace: int = typer.Option(1024, help="TensorRT workspace limit in MiB"),
    no_engine: bool = typer.Option(False, "--no-engine", help="write the ONNX files only"),
    out: Path = typer.Option(Path("export")),
    engines: Path = typer.Option(Path("engines")),
    as_json: Optional[Path] = typer.Option(None, "--json"),
):
    """Export ONNX (FP32, FP16, INT8), then build the TensorRT engine when TensorRT and a GPU are present."""
    from han_edge.export import ExportOptions, export_all

    options = ExportOptions(variant=variant, checkpoint=str(checkpoint) if checkpoint else None, fp16=fp16,
                            int8=int8, int8_target=target,
                            int8_exclude=[g for g in int8_exclude.split(",") if g] if int8_exclude is not None else None,
                            calibration=calibration, calib_dir=str(calib) if calib else None, calib_size=calib_size,
                            out_dir=str(out))
    with progress_bar() as bar:
        task = bar.add_task("INT8 sensitivity", total=None, info="", visible=False)

        def progress(done, total):
            bar.update(task, completed=done, total=total, visible=True, info="layer groups")
        result = export_all(options, log=console.print, progress=progress)
    write_json(as_json, result)
    if no_engine:
        return
    if int8 and target == "cpu":
        console.print("the CPU-flavour INT8 model is for ONNX Runtime; no TensorRT engine is built from it")
        return
    key = "int8" if int8 else ("fp16" if fp16 else None)
    source = Path(result[key]["path"]) if key else Path(result["fp32"])
    suffix = {"int8": ".int8.plan", "fp16": ".fp16.plan"}.get(key, ".plan")
    compile_engine(source, engines / f"han_{variant}{suffix}", opt_batch, max_batch, workspace, engines / "timing.cache")


@app.command("build")
def build_command(
    onnx_path: Path = typer.Argument(..., help="an ONNX file written by `han-edge export`"),
    engine: Optional[Path] = typer.Option(None, help="output .plan (default: engines/<onnx name>.plan)"),
    max_batch: int = typer.Option(64),
    opt_batch: int = typer.Option(32),
    workspace: int = typer.Option(1024, help="TensorRT workspace limit in MiB"),
):
    """Compile an exported ONNX into a TensorRT engine on this machine (e.g. on the Jetson: no PyTorch needed)."""
    engine = engine or Path("engines") / (onnx_path.name.removesuffix(".onnx") + ".plan")
    compile_engine(onnx_path, engine, opt_batch, max_batch, workspace, engine.parent / "timing.cache")


def compile_engine(onnx_path: Path, engine_path: Path, opt_batch: int, max_batch: int, workspace: int, cache: Path) -> None:
    from han_edge.engine import BuildOptions, build_engine

    options = BuildOptions(opt_batch=min(opt_batch, max_batch), max_batch=max_batch, workspace_mib=workspace,
                           timing_cache=cache)
    try:
        with progress_bar() as bar:
            tasks = {}

            def report(phase, step, steps):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase[:40], total=steps, info="")
                bar.update(tasks[phase], completed=step, total=steps)
            build_engine(onnx_path, engine_path, options, report)
    except MissingDependencyError as err:
        Console(stderr=True).print(f"[bold red]engine not built:[/] {err}. The ONNX files above are complete; "
                                   "pass --no-engine to skip this step.", highlight=False)
        raise typer.Exit(3)
    console.print(f"wrote {engine_path} (+ {engine_path.name}.json)")


@app.command("inspect")
def inspect_file(path: Path = typer.Argument(..., help=".onnx or .plan/.engine")):
    """What a model file is: variant, precision, input size, batch range, op counts, size on disk."""
    from han_edge.config import HANConfig

    if not path.is_file():
        raise HanEdgeError(f"{path} not found")
    table = Table(title=str(path), show_header=False)
    if path.suffix in (".plan", ".engine"):
        from han_edge.engine import read_engine_metadata

        side = read_engine_metadata(path)
        config = HANConfig.from_json(side["metadata"]["han_edge.config"])
        rows = {"precision": side["precision"], "batch (min/opt/max)": "/".join(str(v) for v in side["batch"].values()),
                "built with": f"TensorRT {side['tensorrt']} on {side['gpu']} (sm {side['compute_capability']})"}
    else:
        from han_edge.export import load_onnx, onnx_metadata, op_counts
        from han_edge.config import config_from_metadata

        model = load_onnx(path)
        meta = onnx_metadata(model)
        config, precision = config_from_metadata(meta, str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        counts = op_counts(model)
        rows = {"precision": precision,
                "batch": f"dynamic (axis '{dims[0].dim_param}')" if dims[0].dim_param else str(dims[0].dim_value),
                "ops": ", ".join(f"{op} {counts.get(op, 0)}" for op in
                                 ("Conv", "Gemm", "GridSample", "QuantizeLinear", "DequantizeLinear", "Cast")),
                "opset": str(max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))),
                "han-edge": meta.get("han_edge.version", "?")}
        if "han_edge.int8_excluded" in meta:
            rows["kept in float"] = ", ".join(json.loads(meta["han_edge.int8_excluded"])) or "none"
    rows = {"variant": config.variant, "input": f"3x{config.input_size[0]}x{config.input_size[1]}",
            "feature": f"{config.feature_dim}-D", "mean/std": f"{config.mean} / {config.std}", **rows,
            "size": f"{path.stat().st_size / 2**20:.2f} MiB"}
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


# -- runtime: embed / match / bench -----------------------------------------------------------------------
@app.command()
def embed(
    engine: Path = typer.Option(..., "--engine", "--model", help=".plan/.engine, .onnx or .pt"),
    images: Optional[Path] = typer.Option(None, help="folder of images (whole images are crops unless --boxes)"),
    video: Optional[Path] = typer.Option(None, help="video file; needs --boxes keyed by frame index"),
    boxes: Optional[Path] = typer.Option(None, help='JSON {"image name" or "frame index": [[x1,y1,x2,y2], ...]}'),
    out: Path = typer.Option(..., help="output .npz (a gallery file han-edge match reads)"),
):
    """Embed person crops from images or video frames into a gallery file."""
    from han_edge.pipeline import embed_sources

    if (images is None) == (video is None):
        raise HanEdgeError("give exactly one of --images DIR or --video FILE")
    with progress_bar() as bar:
        task = bar.add_task("embed", total=None, info=str(engine))
        gallery, count = embed_sources(engine, images, video, boxes, progress=lambda n: bar.advance(task, n))
    gallery.save(out)
    console.print(f"wrote {out}: {count} features")


@app.command()
def match(
    gallery: Path = typer.Option(..., help="gallery .npz (from embed or Gallery.save)"),
    query: Path = typer.Option(..., help="query .npz (from embed)"),
    k: int = typer.Option(5, "-k", help="matches per query"),
    exclude_same_camera: bool = typer.Option(False, help="skip gallery entries of the query's camera"),
    as_json: Optional[Path] = typer.Option(None, "--json"),
):
    """Top-k gallery identities for every query feature."""
    from han_edge.gallery import Gallery

    gal = Gallery.load(gallery)
    qry = Gallery.load(query, dim=gal.dim)
    q_feats, q_ids, q_cams = qry._snapshot()
    ids, dists = gal.search(q_feats, k, q_cams, exclude_same_camera)
    table = Table(title=f"top-{ids.shape[1]} of {len(gal)} gallery entries")
    table.add_column("query")
    table.add_column("query id")
    for i in range(ids.shape[1]):
        table.add_column(f"#{i + 1} id (dist)")
    for row in range(min(len(ids), 50)):
        table.add_row(str(row), str(q_ids[row]), *(f"{ids[row, j]} ({dists[row, j]:.3f})" for j in range(ids.shape[1])))
    console.print(table)
    write_json(as_json, {"ids": ids, "distances": dists, "query_ids": q_ids})


@app.command()
def bench(
    engine: Path = typer.Option(..., "--engine", "--model", help=".plan/.engine, .onnx or .pt"),
    batch: str = typer.Option("1,8,32,64", help="comma-separated batch sizes"),
    iters: int = typer.Option(20, help="timed iterations per batch size (after warm-up)"),
    gallery_size: int = typer.Option(10000, help="gallery entries to match against"),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: default)"),
    as_json: Optional[Path] = typer.Option(None, "--json"),
):
    """Latency (p50/p90/p99) and images/s of pre-process, inference, matching and end to end."""
    from han_edge.bench import run_bench

    sizes = [int(b) for b in batch.split(",") if b.strip()]
    with progress_bar() as bar:
        task = bar.add_task("bench", total=len(sizes), info=str(engine))
        result = run_bench(engine, sizes, iters, gallery_size, threads=threads, progress=lambda: bar.advance(task))
    table = Table(title=f"{engine} · {result['backend']} {result['precision']} · {result['device']}")
    for col in ("batch", "stage", "p50 ms", "p90 ms", "p99 ms", "img/s"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["batch"]), row["stage"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{row['p99_ms']:.2f}", f"{row['images_per_s']:.1f}")
    console.print(table)
    write_json(as_json, result)


# -- profile -----------------------------------------------------------------------------------------------
@profile_app.command("flops")
def profile_flops(
    variant: str = typer.Option("all", help="small, medium, large or all"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table"),
):
    """Parameters and multiply-adds per variant at 1x3x160x64, next to Table 1's FLOPs."""
    from han_edge.profile import count_cost, variants_of

    rows = [count_cost(v) for v in variants_of(variant)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="HAN cost at 1x3x160x64 (FLOPs = 2 x MACs, as Table 1)")
    for col in ("variant", "strides", "params", "MACs", "FLOPs", "Table 1", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["variant"], str(tuple(r["strides"])), f"{r['params'] / 1e6:.2f}M", f"{r['macs']:.3e}",
                      f"{r['flops']:.3e}", f"{r['paper_flops']:.2e}", f"{r['ratio']:.3f}")
    console.print(table)


@profile_app.command("cost")
def profile_cost(
    model: List[Path] = typer.Option(..., "--model", "--engine", help="model files (.onnx/.plan/.pt), repeatable"),
    batch: int = typer.Option(32),
    iters: int = typer.Option(10),
    eval_json: Optional[Path] = typer.Option(None, help="an `han-edge eval --json` result to show rank-1 from"),
    as_json: Optional[Path] = typer.Option(None, "--json"),
):
    """Cost-effectiveness: MACs and params next to measured ms/image and images/s (and rank-1)."""
    from han_edge.profile import cost_table

    rows = cost_table(model, batch, iters, json.loads(eval_json.read_text()) if eval_json else None)
    write_json(as_json, rows)
    table = Table(title=f"cost-effectiveness at batch {batch}")
    for col in ("model", "variant", "precision", "backend", "MACs", "params", "ms/img", "img/s", "rank-1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], r["variant"], r["precision"], r["backend"], f"{r['macs']:.2e}",
                      f"{r['params'] / 1e6:.2f}M", f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.1f}",
                      "-" if r["rank1"] is None else f"{100 * r['rank1']:.1f}")
    console.print(table)


# -- visualize / demo --------------------------------------------------------------------------------------
@app.command()
def visualize(
    checkpoint: Path = typer.Option(...),
    image: Path = typer.Option(...),
    out: Path = typer.Option(Path("attention.png")),
):
    """PNG of the hard-attention regions (3 levels x 4) and soft spatial attention maps (Fig. 7)."""
    from han_edge.visualize import attention_figure

    attention_figure(checkpoint, image, out)
    console.print(f"wrote {out}")


@app.command()
def demo(
    epochs: int = typer.Option(8, help="training epochs on the synthetic set"),
    workdir: Path = typer.Option(Path("runs/demo")),
    batch: int = typer.Option(32, help="batch size for the throughput column"),
):
    """Synthetic set -> train HAN(Small) -> export FP32 + INT8 -> gallery search per precision, one table."""
    from han_edge.pipeline import run_demo

    run_demo(epochs, workdir, batch, console, progress_bar)


def main() -> None:
    """Entry point: bad input ends in one red sentence and a non-zero exit, never a traceback."""
    try:
        app()
    except MissingDependencyError as err:
        Console(stderr=True).print(f"[bold red]missing:[/] {err}", highlight=False)
        sys.exit(3)
    except HanEdgeError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
