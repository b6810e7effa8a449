"""Jobs: what the CLI runs end to end, built from the stages below (the only module that knows them all).

``export_all`` (`han-edge export`), ``evaluate_model`` (`han-edge eval`), ``compare_retrieval`` and
``run_demo`` (`han-edge demo`). Stages never import this module, so the import graph has one
direction: jobs -> {job_data, train, exporter, quantize, engine, runtime, gallery, evaluate} -> {config,
paths, fileio, onnx_io, preprocess}.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError
from han_edge.evaluate import (
    centred_cosine,
    cosine_rows,
    evaluate_features,
    evaluate_rank,
    multi_query_features,
    sign_test,
)
from han_edge.exporter import (
    export_fp16,
    export_fp32,
    load_batch,
    parity,
    torch_features,
)
from han_edge.fileio import write_json
from han_edge.formats import artefact_path, model_digest
from han_edge.int8_layers import check_exclusions
from han_edge.job_data import calibration_paths, heldout_paths, load_torch_model
from han_edge.onnx_io import load_onnx, ort_session, run_ort
from han_edge.ort_quantize import CALIBRATION_METHODS, calibration_cache_paths
from han_edge.paths import check_destination, ensure_folder, folder_lock, not_the_input
from han_edge.qdq_finetune import check_steps
from han_edge.quantize import INT8_FLAVOURS, export_int8
from han_edge.validate import whole_number


# -- `han-edge export` ----------------------------------------------------------------------------------------
@dataclass
class ExportOptions:
    variant: str = "small"
    checkpoint: str | None = None
    fp16: bool = False
    int8: bool = False
    int8_target: str = "tensorrt"
    int8_exclude: list[str] | None = None
    calibration: str = "percentile"
    int8_min_agreement: float = 0.95   # nearest-neighbour agreement the sensitivity analysis must reach
    int8_finetune: int = 200           # steps of Q/DQ fine-tuning against FP32 (qdq_finetune); 0: calibration only
    calib_dir: str | None = None
    calib_size: int = 256
    heldout_size: int = 512   # crops for the INT8 analysis, and as many others for its report
    out_dir: str = "export"
    seed: int = 0

    def check(self) -> "ExportOptions":
        """Self, or one sentence naming the first option of the wrong kind or out of range (before any work)."""
        def kind(names, types, text, ok=lambda v: True):
            types = types if isinstance(types, tuple) else (types,)
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or not ok(value):
                    raise HanEdgeError(f"export option {name} must be {text}; got {value!r:.60}")
        kind(("variant",), str, "a string")
        kind(("int8_target",), str, f"one of {', '.join(INT8_FLAVOURS)}", lambda v: v in INT8_FLAVOURS)
        kind(("calibration",), str, f"one of {', '.join(CALIBRATION_METHODS)}", lambda v: v in CALIBRATION_METHODS)
        kind(("checkpoint", "calib_dir"), (str, os.PathLike, type(None)), "a path or None", lambda v: v is None or str(v))
        kind(("out_dir",), (str, os.PathLike), "a path", lambda v: bool(str(v)))
        kind(("fp16", "int8"), bool, "True or False")
        kind(("int8_exclude",), (list, tuple, type(None)), "a list of layer-group names or None",
             lambda v: v is None or all(isinstance(g, str) for g in v))
        kind(("int8_min_agreement",), (int, float), "a number from 0 to 1", lambda v: 0 <= v <= 1)
        for name, low in (("seed", 0), ("calib_size", 1), ("heldout_size", 2)):
            whole_number(getattr(self, name), f"export option {name}", low)
        check_steps(self.int8_finetune)
        return self


def export_all(options: ExportOptions, log=print, progress=None) -> dict:
    """Write the FP32 ONNX (+ FP16, + INT8) and report parity and accuracy figures."""
    options.check()
    report_paths = heldout_paths(options.heldout_size)
    analysis_paths = heldout_paths(options.heldout_size, offset=1) if options.int8 else []   # checked before work
    model, config, source = load_torch_model(options.variant, options.checkpoint)
    log(f"HAN({config.variant}) from {source}")
    held = load_batch(report_paths, config)
    torch_features(model, held[:32], source)   # weights that overflow are refused before any file is written
    calib = (load_batch(calibration_paths(options.calib_dir, options.calib_size, options.seed), config)
             if options.int8 else None)   # a bad --calib folder is refused before any file is replaced
    out = ensure_folder(options.out_dir, "export folder")
    with folder_lock(out, "export folder"):   # two exports into one folder would mix their files
        fp32_path = artefact_path(out, config.variant, "fp32")
        planned = [fp32_path] + [artefact_path(out, config.variant, p) for p, wanted in (
            ("fp16", options.fp16), ("int8" if options.int8_target == "tensorrt" else "int8-cpu", options.int8)) if wanted]
        if options.int8:
            planned += calibration_cache_paths(planned[-1])
        for path in planned:   # a folder, FIFO or read-only file there: refused before any work, named as the user gave it
            check_destination(path, "export file")
            if options.checkpoint:   # a link in the folder to the checkpoint: the write would go through it
                not_the_input(path, Path(options.checkpoint), "export file")
        with tempfile.TemporaryDirectory(dir=out, prefix=".han-edge-export-") as staging:
            staged = export_fp32(model, config, Path(staging) / fp32_path.name)   # the old file stays until all checks pass
            result = {"source": source, "fp32": str(fp32_path), "parity": parity(model, staged, held[:32])}
            if options.int8 and options.int8_exclude:
                check_exclusions(load_onnx(staged), options.int8_exclude)
            os.replace(staged, fp32_path)
        log(f"wrote {fp32_path}: parity vs PyTorch cosine_min={result['parity']['cosine_min']:.7f} "
            f"max_abs_diff={result['parity']['max_abs_diff']:.2e}")
        if options.fp16:
            reference = run_ort(ort_session(fp32_path), held)
            fp16_path = export_fp16(fp32_path, artefact_path(out, config.variant, "fp16"))
            got = run_ort(ort_session(fp16_path), held)
            result["fp16"] = {"path": str(fp16_path), "cosine_min": float(cosine_rows(reference, got).min()),
                              "centred_cosine": centred_cosine(reference, got)}
            log(f"wrote {fp16_path}: cosine vs FP32 min={result['fp16']['cosine_min']:.5f} "
                f"centred={result['fp16']['centred_cosine']:.5f}")
        if options.int8:
            fmt = "int8" if options.int8_target == "tensorrt" else "int8-cpu"
            int8_path = artefact_path(out, config.variant, fmt)
            log(f"calibrating INT8 ({options.int8_target} flavour, {options.calibration}) on {len(calib)} images")
            analysis = load_batch(analysis_paths, config)
            report = export_int8(fp32_path, int8_path, calib, analysis, flavour=options.int8_target,
                                 method=options.calibration, exclude=options.int8_exclude,
                                 min_agreement=options.int8_min_agreement, report_batch=held,
                                 finetune_steps=options.int8_finetune, progress=progress)
            result["int8"] = {"path": str(int8_path), **report.__dict__,
                              "retrieval": compare_retrieval(fp32_path, int8_path)}
            kept = ", ".join(report.excluded_groups) or "none"
            log(f"wrote {int8_path}: centred cosine vs FP32 {report.centred_cosine:.4f}, nearest-neighbour agreement "
                f"{report.neighbour_agreement:.3f}{_clear_note(report)}, not INT8: {kept}"
                f"{' (calibration cache reused)' if report.cache_reused else ''}")
            if report.finetune:
                f = report.finetune
                log(f"fine-tuned {f['steps']} steps on the calibration images: squared feature distance to FP32 on "
                    f"held-out crops {f['loss_before']:.4f} -> {f['loss_after']:.4f}"
                    + ("" if f["kept"] else "; no better, so the calibrated model stands"))
            if report.ort_ops:
                log("ONNX Runtime CPU executes " + ", ".join(f"{v} {k}" for k, v in report.ort_ops.items() if v))
            if options.int8_target == "tensorrt":
                log(f"float part FP16 (opset 19); kept FP32: {', '.join(report.fp32_nodes) or 'none'}; centred cosine "
                    f"{report.centred_cosine_ort_default:.4f} with ONNX Runtime's default FP16 bias rewrite, which "
                    "han-edge's runtime turns off and TensorRT does not do")
            r = result["int8"]["retrieval"]
            log(f"synthetic test set: FP32 rank-1 {100 * r['fp32']['rank1']:.1f} mAP {100 * r['fp32']['mAP']:.1f} | "
                f"INT8 rank-1 {100 * r['int8']['rank1']:.1f} mAP {100 * r['int8']['mAP']:.1f} | rank-1 hits gained "
                f"{r['rank1_changed']['gained']}, lost {r['rank1_changed']['lost']} of {r['rank1_changed']['queries']} queries "
                f"(sign test p = {r['rank1_changed']['p_value']:.2f})")
        return result


def _clear_note(report) -> str:
    if not report.clear_neighbour_share:   # an untrained model: no crop has a clear neighbour
        return " (no crop has a neighbour leading by > 1%)"
    return (f" ({report.clear_neighbour_agreement:.3f} on the {100 * report.clear_neighbour_share:.0f}% of crops "
            "whose neighbour leads by > 1%)")


# -- `han-edge eval` and retrieval comparisons ----------------------------------------------------------------
def evaluate_model(model_path, data, rerank: bool = False, multi_query: bool = False, progress=None) -> dict:
    """Embed a dataset's query and gallery with any runtime backend and score it (Market-1501 protocol)."""
    from han_edge.runtime import Embedder

    embedder = Embedder(model_path)
    q_paths, q_pids, q_cams = zip(*data.query)
    g_paths, g_pids, g_cams = zip(*data.gallery)
    q_feats = embedder.embed_files(list(q_paths), progress=progress)
    g_feats = embedder.embed_files(list(g_paths), progress=progress)
    q_pids, q_cams, g_pids, g_cams = map(np.asarray, (q_pids, q_cams, g_pids, g_cams))
    if multi_query:
        q_feats = multi_query_features(q_feats, q_pids, q_cams)
    result = evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, rerank=rerank)
    result.update({"backend": embedder.name, "precision": embedder.precision, "variant": embedder.config.variant,
                   "rerank": rerank, "multi_query": multi_query, "dataset": data.name, "model": str(model_path),
                   "model_digest": model_digest(model_path)})
    return result


def compare_retrieval(fp32_path: Path, other_path: Path, data=None) -> dict:
    """Rank-1/mAP of two exported models on ``data`` (``.name``, ``.query``, ``.gallery``; default the synthetic
    set), the same code path as `han-edge eval`."""
    from han_edge.data import load_dataset

    data = load_dataset("synthetic", None) if data is None else data
    keys = ("rank1", "rank5", "mAP")
    out, hits = {}, {}
    for name, path in (("fp32", fp32_path), ("int8", other_path)):
        metrics = evaluate_model(path, data)
        out[name] = {k: metrics[k] for k in keys}
        hits[name] = metrics["first_rank"] == 0
    # Paired: queries whose rank-1 hit changed. A net change within about sqrt(gained + lost) queries
    # is what that many coin flips give; the exact sign test (McNemar's) says how likely that is.
    gained, lost = int((hits["int8"] & ~hits["fp32"]).sum()), int((hits["fp32"] & ~hits["int8"]).sum())
    out["rank1_changed"] = {"gained": gained, "lost": lost, "queries": int(len(hits["fp32"])),
                            "p_value": sign_test(gained, lost)}
    return out


DEMO_MARKER = ".han-edge-demo"


# -- `han-edge demo` --------------------------------------------------------------------------------------
def run_demo(epochs: int, workdir: Path, batch: int, console, progress_bar) -> list[dict]:
    """The README's main job: synthetic data -> trained HAN(Small) -> FP32/INT8 -> gallery search table."""
    from rich.table import Table

    from han_edge.cuda import gpu_available
    from han_edge.data import default_synthetic_root, load_dataset
    from han_edge.gallery import Gallery
    from han_edge.profile import measure_throughput
    from han_edge.runtime import Embedder
    from han_edge.train import TrainOptions, train

    ensure_folder(workdir, "demo folder")
    marker = Path(workdir) / DEMO_MARKER   # the demo rewrites its folder: only one it made (or an empty one)
    if not marker.exists() and any(Path(workdir).iterdir()):
        raise HanEdgeError(f"demo folder {workdir} already holds files the demo did not write; give an empty or "
                           "new --workdir (the demo replaces han_small.pt, its exports and demo.json there)")
    marker.touch()
    console.print(f"[bold]1/4[/] synthetic re-id set in {default_synthetic_root()}")
    data = load_dataset("synthetic", None)
    checkpoint = workdir / "han_small.pt"
    console.print(f"[bold]2/4[/] training HAN(Small) for {epochs} epochs on {len(data.train)} images")
    with progress_bar() as bar:
        task = bar.add_task("train", total=len(data.train) // 32 * 32 * epochs, info="")
        train(data.train, data.num_train_pids, checkpoint, "small", TrainOptions(epochs=epochs), dataset_name="synthetic",
              progress=lambda epoch, epochs, loss, rate, advance: bar.update(
                  task, advance=advance, description=f"epoch {epoch}/{epochs}", info=f"loss {loss:.3f} {rate:.0f} img/s"))
    has_gpu = gpu_available()
    target = "tensorrt" if has_gpu else "cpu"
    console.print(f"[bold]3/4[/] exporting FP32 and INT8 ({target} flavour) ONNX")
    with progress_bar() as bar:
        task = bar.add_task("INT8", total=None, info="", visible=False)
        exported = export_all(ExportOptions(checkpoint=str(checkpoint), int8=True, int8_target=target,
                                            out_dir=str(workdir)), log=console.print,
                              progress=lambda d, t, what: bar.update(task, completed=d, total=t, visible=True,
                                                                     info=what))
    models = {"PyTorch FP32": checkpoint, "ONNX FP32": Path(exported["fp32"]), f"ONNX INT8 ({target})":
              Path(exported["int8"]["path"])}
    if has_gpu:
        try:
            from han_edge.engine import BuildOptions, build_engine
            models["TensorRT INT8"] = build_engine(exported["int8"]["path"], workdir / "han_small.int8.plan",
                                                   BuildOptions(cache_dir=workdir))
        except HanEdgeError as err:
            console.print(f"TensorRT engine skipped: {err}")
    console.print("[bold]4/4[/] gallery search through the runtime, per precision")
    q_pids, q_cams = (np.array(v) for v in zip(*[(p, c) for _, p, c in data.query]))
    g_pids, g_cams = (np.array(v) for v in zip(*[(p, c) for _, p, c in data.gallery]))
    rows = []
    for label, path in models.items():
        embedder = Embedder(path)
        start = time.perf_counter()
        g_feats = embedder.embed_files([p for p, _, _ in data.gallery])
        q_feats = embedder.embed_files([p for p, _, _ in data.query])
        gallery = Gallery(embedder.config.feature_dim)
        gallery.add(g_pids, g_feats, g_cams)
        dist = gallery.distances(q_feats, g_feats)   # every gallery entry, for the protocol's ranking
        metrics = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
        speed = measure_throughput(path, batch, iters=5)
        rows.append({"model": label, "rank1": metrics["rank1"], "mAP": metrics["mAP"],
                     "images_per_s": speed["images_per_s"], "ms_per_image": speed["ms_per_image"],
                     "size_mib": Path(path).stat().st_size / 2**20,
                     "embed_s": time.perf_counter() - start})
    table = Table(title=f"HAN(Small) on the synthetic set: {len(data.query)} queries x {len(data.gallery)} gallery "
                        f"(batch {batch} throughput)")
    for col in ("model", "rank-1", "mAP", "img/s", "ms/img", "size MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{100 * r['rank1']:.1f}", f"{100 * r['mAP']:.1f}", f"{r['images_per_s']:.1f}",
                      f"{r['ms_per_image']:.2f}", f"{r['size_mib']:.2f}")
    console.print(table)
    write_json(workdir / "demo.json", rows, "demo results")
    return rows
