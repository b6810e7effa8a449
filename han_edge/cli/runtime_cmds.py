"""`han-edge embed | match | bench | profile`: the runtime."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Literal, Optional

import typer
from rich.table import Table

from han_edge.cli.common import (MAX_BATCH, MAX_GALLERY, app, batch_list, console, model_source, output_file,
                                 profile_app, progress_bar, write_json)
from han_edge.errors import HanEdgeError
from han_edge.validate import MAX_THREADS


# -- runtime: embed / match / bench -----------------------------------------------------------------------
@app.command()
def embed(
    engine: str = typer.Option(..., "--engine", "--model", callback=model_source,
                               help=".plan/.engine, .onnx, .pt or grpc://host:8001/name (Triton)"),
    images: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="folder of images (whole images are crops unless --boxes)"),
    video: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="video file; needs --boxes keyed by frame index"),
    boxes: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help='JSON {"path under --images" (or a unique image name) or "frame index": [[x1,y1,x2,y2], ...]}'),
    out: Optional[Path] = typer.Option(None, callback=output_file("gallery file"), help="output .npz (a gallery file han-edge match reads)"),
    gallery: Optional[str] = typer.Option(None, "--gallery", help="also add to a Milvus gallery: milvus:PATH.db (Milvus Lite) or milvus:http://host:19530"),
    milvus_index: Literal["flat", "hnsw"] = typer.Option("flat", help="index of a new Milvus gallery"),
):
    """Embed person crops from images or video frames into a gallery file and/or a Milvus gallery."""
    from han_edge.cli.serve_cmds import milvus_uri, open_milvus_gallery
    from han_edge.pipeline import embed_sources

    if (images is None) == (video is None):
        raise HanEdgeError("give exactly one of --images DIR or --video FILE")
    uri = milvus_uri(gallery)
    if gallery is not None and uri is None:
        raise HanEdgeError(f"--gallery {gallery!r} is not milvus:PATH.db or milvus:http://host:19530 (use --out for .npz)")
    if out is None and uri is None:
        raise HanEdgeError("give --out FILE.npz and/or --gallery milvus:PATH_OR_URI")
    with progress_bar() as bar:
        task = bar.add_task("embed", total=None, info=str(engine))
        gallery, count = embed_sources(engine, images, video, boxes, progress=lambda n: bar.advance(task, n))
    if out is not None:
        gallery.save(out)
        console.print(f"wrote {out}: {count} features")
    if uri is not None:
        target = open_milvus_gallery(uri, gallery.dim, None, milvus_index)
        e = gallery.entries()
        target.add(e.ids, e.feats, e.cams, e.times)
        console.print(f"added {count} features to the Milvus gallery at {uri} ({len(target)} entries)")


@app.command()
def match(
    gallery: str = typer.Option(..., help="gallery .npz (from embed or Gallery.save), or milvus:PATH.db / milvus:http://host:19530"),
    query: Path = typer.Option(..., exists=True, dir_okay=False, help="query .npz (from embed)"),
    k: int = typer.Option(5, "-k", min=1, max=10_000, help="matches per query"),
    exclude_same_camera: bool = typer.Option(False, help="skip gallery entries of the query's camera"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """Top-k gallery identities for every query feature."""
    from han_edge.gallery import Gallery

    from han_edge.cli.serve_cmds import milvus_uri, open_milvus_gallery

    uri = milvus_uri(gallery)
    if uri is None:
        from han_edge.cuda import gpu_available

        gal = Gallery.load(Path(gallery), device="cuda" if gpu_available() else "cpu")   # matched on the GPU if any
        qry = Gallery.load(query)
        if qry.dim != gal.dim:
            raise HanEdgeError(f"query file {query} holds {qry.dim}-D features and gallery {gallery} {gal.dim}-D; "
                               "embed both with the same model")
    else:
        qry = Gallery.load(query)
        gal = open_milvus_gallery(uri, qry.dim, create=False)
    entries = qry.entries()
    q_feats, q_ids, q_cams = entries.feats, entries.ids, entries.cams
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
    engine: str = typer.Option(..., "--engine", "--model", callback=model_source,
                               help=".plan/.engine, .onnx, .pt or grpc://host:8001/name (Triton)"),
    batch: str = typer.Option("1,8,32,64", callback=batch_list, help=f"comma-separated batch sizes, each 1..{MAX_BATCH}"),
    iters: int = typer.Option(20, min=1, max=100_000, help="timed iterations per batch size (after warm-up)"),
    gallery_size: int = typer.Option(10000, min=1, max=MAX_GALLERY, help="gallery entries to match against"),
    threads: int = typer.Option(0, min=0, max=MAX_THREADS, help="ONNX Runtime intra-op threads (0: default)"),
    precision: Literal["fp32", "fp16"] = typer.Option("fp32", help=".pt checkpoints: PyTorch precision (fp16 on CUDA)"),
    device: Optional[Literal["cpu", "cuda"]] = typer.Option(None, help=".pt checkpoints: PyTorch device (default: cuda if present)"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """Latency (p50/p90/p99) and images/s of pre-process, inference, matching and end to end."""
    from han_edge.bench import run_bench
    from han_edge.formats import format_of

    sizes = list(batch)   # parsed and range-checked by batch_list
    options = {}
    if precision != "fp32" or device is not None:
        if format_of(engine).name != "pytorch":
            raise HanEdgeError("--precision and --device apply to .pt checkpoints; an exported file carries its own")
        options = {"precision": precision, **({"device": device} if device else {})}
    with progress_bar() as bar:
        task = bar.add_task("bench", total=len(sizes), info=str(engine))
        result = run_bench(engine, sizes, iters, gallery_size, threads=threads, progress=lambda: bar.advance(task),
                           **options)
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
    variant: Literal["small", "medium", "large", "all"] = typer.Option("all", help="small, medium, large or all"),
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
    model: List[Path] = typer.Option(..., "--model", "--engine", exists=True, dir_okay=False, help="model files (.onnx/.plan/.pt), repeatable"),
    batch: int = typer.Option(32, min=1, max=MAX_BATCH),
    iters: int = typer.Option(10, min=1, max=100_000),
    eval_json: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="an `han-edge eval --json` result to show rank-1 from"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """Cost-effectiveness: MACs and params next to measured ms/image and images/s (and rank-1)."""
    from han_edge.profile import cost_table

    rows = cost_table(model, batch, iters, read_eval_json(eval_json) if eval_json else None)
    write_json(as_json, rows)
    table = Table(title=f"cost-effectiveness at batch {batch}")
    for col in ("model", "variant", "precision", "backend", "MACs", "params", "ms/img", "img/s", "rank-1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], r["variant"], r["precision"], r["backend"], f"{r['macs']:.2e}",
                      f"{r['params'] / 1e6:.2f}M", f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.1f}",
                      "-" if r["rank1"] is None else f"{100 * r['rank1']:.1f}")
    console.print(table)


def read_eval_json(path: Path) -> dict:
    """An `han-edge eval --json` report, or one sentence saying why it is not one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HanEdgeError(f"--eval-json {path} is not a JSON report: {str(err).splitlines()[0][:120]}") from None
    rank1 = data.get("rank1") if isinstance(data, dict) else None
    if isinstance(rank1, bool) or not isinstance(rank1, (int, float)) or not 0 <= rank1 <= 1:
        raise HanEdgeError(f"--eval-json {path} is not an `han-edge eval --json` report (no rank1 between 0 and 1)")
    return data
