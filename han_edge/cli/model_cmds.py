"""`han-edge export | build | inspect`: model files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.table import Table

from han_edge.cli.common import (MAX_BATCH, app, check_batches, console, output_file, output_folder, progress_bar,
                                 write_json)
from han_edge.errors import HanEdgeError, MissingDependencyError


# -- export / inspect ----------------------------------------------------------------------------------------
@app.command()
def export(
    ctx: typer.Context,
    variant: Literal["small", "medium", "large"] = typer.Option("small"),
    checkpoint: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="trained checkpoint (default: fresh weights)"),
    fp16: bool = typer.Option(False, help="also write the FP16 model"),
    int8: bool = typer.Option(False, help="also write the calibrated INT8 Q/DQ model"),
    target: Literal["tensorrt", "cpu"] = typer.Option("tensorrt", help="INT8 flavour: tensorrt (symmetric S8) or cpu (U8 activations, ORT)"),
    int8_exclude: Optional[str] = typer.Option(None, help="comma-separated layer groups kept in float (skips the sensitivity analysis)"),
    calibration: Literal["percentile", "entropy", "minmax"] = typer.Option("percentile", help="calibration method (percentile: 99.999th, the closest to FP32 on our measurements)"),
    calib: Optional[Path] = typer.Option(None, exists=True, file_okay=False, help="folder of calibration crops (default: synthetic training images)"),
    calib_size: int = typer.Option(256, min=1, max=100_000, help="number of calibration images"),
    int8_finetune: int = typer.Option(200, min=0, max=100_000, help="steps fine-tuning the INT8 file's weights, biases and scales against FP32 on the calibration images (0: calibration only)"),
    max_batch: int = typer.Option(64, min=1, max=MAX_BATCH, help="engine profile maximum batch"),
    opt_batch: Optional[int] = typer.Option(None, min=1, max=MAX_BATCH, help="engine profile optimum batch (default: min(32, --max-batch))"),
    workspace: int = typer.Option(1024, min=1, max=1 << 20, help="TensorRT workspace limit in MiB"),
    no_engine: bool = typer.Option(False, "--no-engine", help="write the ONNX files only"),
    fold_normalization: bool = typer.Option(False, "--fold-normalization",
                                            help="ONNX files take RGB 0..255 and normalise inside (han-edge fold); engines are built from them"),
    out: Path = typer.Option(Path("export"), callback=output_folder("export --out folder")),
    engines: Path = typer.Option(Path("engines"), callback=output_folder("--engines folder", create=False)),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """Export ONNX (FP32, FP16, INT8), then build the TensorRT engine when TensorRT and a GPU are present."""
    opt_batch = check_batches(opt_batch, max_batch)   # before the export, not after it
    given = [f"--{name.replace('_', '-')}" for name in ("target", "int8_exclude", "calibration", "calib", "calib_size",
                                                         "int8_finetune")
             if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
    if given and not int8:   # silently writing FP32 only would look like an INT8 export that did nothing
        raise HanEdgeError(f"{', '.join(given)} only apply with --int8")
    from han_edge.jobs import ExportOptions, export_all

    options = ExportOptions(variant=variant, checkpoint=str(checkpoint) if checkpoint else None, fp16=fp16,
                            int8=int8, int8_target=target,
                            int8_exclude=group_list(int8_exclude),
                            calibration=calibration, calib_dir=str(calib) if calib else None, calib_size=calib_size,
                            int8_finetune=int8_finetune, out_dir=str(out))
    with progress_bar() as bar:
        task = bar.add_task("INT8", total=None, info="", visible=False)

        def progress(done, total, what):
            bar.update(task, completed=done, total=total, visible=True, info=what)
        result = export_all(options, log=console.print, progress=progress)
    if fold_normalization:
        from han_edge.fold import fold_export

        result["folded"] = fold_export(result, log=console.print)
    write_json(as_json, result)
    if no_engine:
        return
    if int8 and target == "cpu":
        console.print("the CPU-flavour INT8 model is for ONNX Runtime; no TensorRT engine is built from it")
        return
    from han_edge.formats import engine_name

    precision = "int8" if int8 else ("fp16" if fp16 else "fp32")
    source = Path(result[precision]["path"]) if precision != "fp32" else Path(result["fp32"])
    compile_engine(source, engines / engine_name(variant, precision), opt_batch, max_batch, workspace, engines)


def group_list(text: Optional[str]) -> Optional[list[str]]:
    """``--int8-exclude``: '' keeps every group in INT8; 'a, b' -> ['a', 'b']; an empty entry or a repeat is refused."""
    if text is None or not text.strip():
        return None if text is None else []
    groups = [g.strip() for g in text.split(",")]
    if not all(groups):
        raise HanEdgeError(f"--int8-exclude {text!r} has an empty entry; write groups like stem,blocks.0:dw "
                           "(or '' to quantise every group)")
    if len(set(groups)) != len(groups):
        raise HanEdgeError(f"--int8-exclude {text!r} names a group twice")
    return groups


@app.command("build")
def build_command(
    onnx_path: Path = typer.Argument(..., exists=True, dir_okay=False, help="an ONNX file written by `han-edge export`"),
    engine: Optional[Path] = typer.Option(None, callback=output_file("engine"), help="output .plan (default: engines/<onnx name>.plan)"),
    max_batch: int = typer.Option(64, min=1, max=MAX_BATCH),
    opt_batch: Optional[int] = typer.Option(None, min=1, max=MAX_BATCH, help="default: min(32, --max-batch)"),
    workspace: int = typer.Option(1024, min=1, max=1 << 20, help="TensorRT workspace limit in MiB"),
):
    """Compile an exported ONNX into a TensorRT engine on this machine (e.g. on the Jetson: no PyTorch needed)."""
    opt_batch = check_batches(opt_batch, max_batch)
    from han_edge.formats import engine_name_for

    engine = engine or Path("engines") / engine_name_for(onnx_path)
    compile_engine(onnx_path, engine, opt_batch, max_batch, workspace, engine.parent)


def compile_engine(onnx_path: Path, engine_path: Path, opt_batch: int, max_batch: int, workspace: int,
                   cache_dir: Path) -> None:
    from han_edge.engine import BuildOptions, build_engine

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    options = BuildOptions(opt_batch=min(opt_batch, max_batch), max_batch=max_batch, workspace_mib=workspace,
                           cache_dir=cache_dir)   # one timing cache per TensorRT version + GPU there
    try:
        with progress_bar() as bar:
            tasks = {}

            def report(phase, step, steps):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase[:40], total=steps, info="")
                bar.update(tasks[phase], completed=step, total=steps)
            build_engine(onnx_path, engine_path, options, report)
    except MissingDependencyError as err:
        from han_edge.cli.common import fail

        fail(f"{err} (the ONNX files are complete; `export --no-engine` skips this step)", 3, "engine not built")
    console.print(f"wrote {engine_path} (+ {engine_path.name}.json)")


@app.command("inspect")
def inspect_file(path: Path = typer.Argument(..., help=".onnx or .plan/.engine")):
    """What a model file is: variant, precision, input size, batch range, op counts, size on disk."""
    from han_edge.config import config_from_metadata

    from han_edge.formats import format_of

    fmt = format_of(path)          # "is a directory", "not found", unknown suffix: one sentence each
    if fmt.name not in ("onnx", "tensorrt"):
        raise HanEdgeError(f"inspect reads .onnx and .plan/.engine files; {path.name} is a {fmt.name} file")
    table = Table(title=str(path), show_header=False)
    if fmt.name == "tensorrt":
        from han_edge.engine import read_engine_metadata

        side = _not_han(path, read_engine_metadata, path)
        config, _ = config_from_metadata(side["metadata"], str(path))
        rows = {"precision": side["precision"], "batch (min/opt/max)": "/".join(str(v) for v in side["batch"].values()),
                "built with": f"TensorRT {side['tensorrt']} on {side['gpu']} (sm {side['compute_capability']})"}
    else:
        from han_edge.exporter import op_counts
        from han_edge.onnx_io import load_onnx, onnx_metadata, validate_han_model

        model = _not_han(path, load_onnx, path)
        meta = onnx_metadata(model)
        config, precision = _not_han(path, validate_han_model, model, meta, str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        counts = op_counts(model)
        rows = {"precision": precision,
                "batch": f"dynamic (axis '{dims[0].dim_param}')" if dims[0].dim_param else str(dims[0].dim_value),
                "ops": ", ".join(f"{op} {counts.get(op, 0)}" for op in
                                 ("Conv", "Gemm", "GridSample", "QuantizeLinear", "DequantizeLinear", "Cast")),
                "opset": str(max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))),
                "han-edge": meta.get("han_edge.version", "?")}
        if "han_edge.int8_excluded" in meta:
            try:
                groups = ", ".join(map(str, json.loads(meta["han_edge.int8_excluded"]))) or "no layer group"
                rows["kept in float"] = f"{groups} (and always the hard attention's sampling grid)"
            except (ValueError, TypeError):
                rows["kept in float"] = "unreadable"
        if meta.get("han_edge.float_precision") == "fp16":
            try:
                rows["float part"] = f"FP16, FP32 nodes: {len(json.loads(meta.get('han_edge.fp32_nodes', '[]')))}"
            except (ValueError, TypeError):
                rows["float part"] = "FP16, FP32 nodes unreadable"
        if precision == "int8-cpu":
            from han_edge.exporter import ort_optimized_op_counts
            fused = ort_optimized_op_counts(path)
            rows["ORT CPU kernels"] = (f"QLinearConv {fused.get('QLinearConv', 0)} of {counts.get('Conv', 0)} Conv, "
                                       f"QGemm {fused.get('QGemm', 0)}, QLinearAdd {fused.get('QLinearAdd', 0)}")
    rows = {"variant": config.variant, "input": f"3x{config.input_size[0]}x{config.input_size[1]}",
            "feature": f"{config.feature_dim}-D", "mean/std": f"{config.mean} / {config.std}", **rows,
            "size": f"{path.stat().st_size / 2**20:.2f} MiB"}
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def _not_han(path: Path, check, *args):
    """``check(*args)``; its error becomes "<path> is not a han-edge model: <why>" (one sentence)."""
    from han_edge.errors import MissingDependencyError

    try:
        return check(*args)
    except MissingDependencyError:
        raise
    except HanEdgeError as err:
        why = str(err)
        for prefix in (f"engine metadata {path}.json", f"engine {path}", str(path)):
            if why.startswith(prefix):
                why = why[len(prefix):].lstrip(" :").removeprefix("is ")
                break
        raise HanEdgeError(f"{path} is not a han-edge model: {why}") from None
