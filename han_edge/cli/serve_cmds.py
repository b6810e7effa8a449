"""`han-edge fold | deepstream | triton`: a model's way into DeepStream and Triton Inference Server."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

import typer

from han_edge.cli.common import MAX_BATCH, app, console, output_file, output_folder, write_json
from han_edge.errors import HanEdgeError
from han_edge.validate import INT32_MAX, INT64_MAX


def _sizes(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    from han_edge.cli.common import batch_list

    return tuple(batch_list(text))


@app.command("fold")
def fold_command(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="an .onnx written by `han-edge export`"),
    out: Optional[Path] = typer.Option(None, callback=output_file("folded ONNX"),
                                       help="output .onnx (default: <name>.folded.onnx beside the model)"),
):
    """Fold mean/std into the ONNX: the folded model takes RGB pixels 0..255 as float (scale 1, offset 0)."""
    from han_edge.fold import fold_file

    path = fold_file(model, out)
    console.print(f"wrote {path}: input RGB 0..255 float, normalisation inside the graph "
                  "(metadata han_edge.normalization=folded)")


@app.command("deepstream")
def deepstream_command(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help=".onnx (folded or not) or .plan/.engine"),
    out: Path = typer.Option(..., callback=output_folder("DeepStream config folder"), help="folder for the configs and the model"),
    batch_size: Optional[int] = typer.Option(None, min=1, max=MAX_BATCH, help="default: the engine's max batch, else 16"),
    no_fold: bool = typer.Option(False, "--no-fold", help="keep an unfolded ONNX as is (single-scale approximation of std)"),
    gie_id: int = typer.Option(2, min=1, max=INT32_MAX, help="gie-unique-id of this secondary GIE"),
    operate_on_gie_id: int = typer.Option(1, min=1, max=INT32_MAX, help="gie-unique-id of the primary detector"),
    person_class: str = typer.Option("0", help="detector class id(s) of persons, comma-separated"),
    reid_type: int = typer.Option(2, min=1, max=3, help="tracker reidType: 1 NvDeepSORT, 2 re-association, 3 both"),
    history: int = typer.Option(100, min=1, max=100_000, help="tracker reidHistorySize (features kept per target)"),
    workspace: int = typer.Option(1024, min=1, max=1 << 20, help="TensorRT workspace in MiB"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """nvinfer secondary-GIE config + NvDCF tracker ReID section (DeepStream 9.2), all values from the model."""
    from han_edge.deepstream import DeepStreamOptions, write_configs

    parts = [c.strip() for c in person_class.split(",") if c.strip()]
    if not all(re.fullmatch(r"[0-9]{1,10}", c) for c in parts):   # int() also takes "1_0" and non-ASCII digits
        raise HanEdgeError(f"--person-class {person_class!r} must be whole numbers separated by commas")
    classes = tuple(int(c) for c in parts)
    if not classes or min(classes) < 0:
        raise HanEdgeError(f"--person-class {person_class!r} must list class ids >= 0")
    result = write_configs(model, out, DeepStreamOptions(
        batch_size=batch_size, fold=not no_fold, gie_unique_id=gie_id, operate_on_gie_id=operate_on_gie_id,
        operate_on_class_ids=classes, reid_type=reid_type, reid_history_size=history, workspace_mib=workspace))
    console.print(f"wrote {result['nvinfer']}\nwrote {result['tracker']}\nmodel {result['model']}")
    if not result["exact"]:
        console.print(f"[yellow]warning:[/] nvinfer has one scale factor for all channels; the model's per-channel "
                      f"std is approximated (up to {100 * result['max_rel_error']:.2f}% off). Drop --no-fold (or "
                      "build the engine from `han-edge fold` output) for exact pre-processing.")
    write_json(as_json, result, written=(result["nvinfer"], result["tracker"], result["model"]))


@app.command("triton")
def triton_command(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help=".onnx or .plan/.engine written by han-edge"),
    repo: Path = typer.Option(..., callback=output_folder("Triton model repository"), help="model repository folder"),
    name: Optional[str] = typer.Option(None, help="model name in the repository (default: file stem, '.' -> '_')"),
    version: int = typer.Option(1, min=1, max=INT64_MAX, help="model version folder"),
    max_batch: Optional[int] = typer.Option(None, min=1, max=MAX_BATCH,
                                            help="max_batch_size for an ONNX (default 64); an engine's comes from its profile"),
    preferred: Optional[str] = typer.Option(None, help="dynamic batching preferred sizes, e.g. 16,32 (default: opt/half and max)"),
    queue_delay_us: int = typer.Option(100, min=0, max=10_000_000, help="dynamic batching max queue delay (microseconds)"),
    instance_kind: Literal["gpu", "cpu", "auto"] = typer.Option("gpu", help="instance_group kind"),
    instances: int = typer.Option(1, min=1, max=64, help="instances per device"),
    as_json: Optional[Path] = typer.Option(None, "--json", callback=output_file("JSON report")),
):
    """Triton model repository entry: config.pbtxt (+ han-edge metadata as parameters) and the model file."""
    from han_edge.triton import RepoOptions, write_repository

    result = write_repository(model, repo, RepoOptions(
        name=name, version=version, max_batch=max_batch, preferred=_sizes(preferred), queue_delay_us=queue_delay_us,
        instance_kind=instance_kind, instances=instances))
    console.print(f"wrote {result['config']}\nwrote {result['model']}\n{result['platform']}, max_batch_size "
                  f"{result['max_batch_size']}, preferred {result['preferred_batch_size']}, input "
                  f"{result['normalization']}; clients: Embedder(\"grpc://HOST:8001/{result['name']}\")")
    write_json(as_json, result, written=(result["config"], result["model"]))


# -- Milvus galleries for embed / match ----------------------------------------------------------------------
MILVUS_PREFIX = "milvus:"


def milvus_uri(spec: Optional[str]) -> Optional[str]:
    """``milvus:gallery.db`` / ``milvus:http://host:19530`` -> the URI; anything else -> None."""
    if spec is None or not str(spec).startswith(MILVUS_PREFIX):
        return None
    uri = str(spec)[len(MILVUS_PREFIX):]
    if not uri:
        raise HanEdgeError("--gallery milvus: needs a location: milvus:PATH.db (Milvus Lite) or milvus:http://host:19530")
    return uri


def open_milvus_gallery(uri: str, dim: int, metric: Optional[str] = None, index_type: Optional[str] = None,
                        create: bool = True):
    """A ``Gallery`` on a Milvus collection (created if new: l2, flat; ``metric``/``index_type`` None: what it has).

    The CLI has no metric option: a collection is matched with the metric it was created with, as an .npz
    gallery is, whatever the query file's. ``create=False`` (a command that only reads): a Milvus Lite
    store that does not exist, or a folder Milvus Lite did not make, is refused instead of created.
    """
    from han_edge.gallery import Gallery
    from han_edge.milvus_client import is_remote

    if not create and not is_remote(uri):
        store = Path(uri)
        if not store.exists():
            raise HanEdgeError(f"Milvus Lite gallery {uri} does not exist; fill one first (han-edge embed "
                               f"--gallery milvus:{uri})")
        if store.is_dir() and not (store / "collections").is_dir():   # Milvus Lite 3 keeps LOCK, collections/
            raise HanEdgeError(f"{uri} is a folder Milvus Lite did not make; give the .db of a gallery")

    return Gallery(dim=dim, metric=metric, index="milvus", uri=uri, index_type=index_type)
