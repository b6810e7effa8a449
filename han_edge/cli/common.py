"""What every command module shares: the Typer apps, the console, progress bars, report writing, option checks.

Bad input never ends in a traceback: ``HanEdgeGroup`` (the app's command class) turns ``HanEdgeError``
into one red sentence on stderr and exit 2 (``MissingDependencyError``: exit 3), and so do a
``MemoryError`` and an ``OSError`` from deep inside a library (a full disk, a file that vanished).
Option values are checked by Typer/Click before the command body runs (ranges, choices and the
callbacks below): a usage error, exit 2, before any work starts.

Policies for options: output files may name a folder that does not exist yet (it is created, like
``mkdir -p``); a directory, a read-only folder or file, or a parent that is a file is refused before any
work. Batch sizes are 1..``MAX_BATCH`` (bounded memory: about 0.25 MB of network input and activations per
image on CPU), learning rates finite and > 0.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperCommand, TyperGroup

from han_edge.errors import HanEdgeError, MissingDependencyError
from han_edge.validate import MAX_BATCH

MAX_GALLERY = 10_000_000     # entries of a synthetic bench gallery (10M x 1024 float32 = 41 GB)


def one_line(message: str) -> str:
    """A message as one line, with any advice to load untrusted data unsafely dropped (see ``validate.reason``)."""
    from han_edge.validate import _UNSAFE_ADVICE, reason

    message = " ".join(str(message).split())
    return reason(message, 400) if _UNSAFE_ADVICE.search(message) else message


def fail(message: str, code: int = 2, label: str = "error") -> None:
    """Print ``label: message`` in red on stderr, never wrapped, and exit with ``code``."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]{label}:[/] {escape(one_line(message))}", highlight=False)
    raise typer.Exit(code)


def _os_error(err: OSError) -> str:
    from han_edge.paths import os_reason

    where = f" {err.filename}" if err.filename else ""
    return f"cannot use{where}: {os_reason(err)}"


class HanEdgeGroup(TyperGroup):
    """The app's command group: errors meant for the user become one sentence and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MissingDependencyError as err:
            fail(str(err), 3, "missing")
        except HanEdgeError as err:
            fail(str(err), 2)
        except MemoryError:
            fail("out of memory; use a smaller --batch / --batch-size / --gallery-size, or fewer boxes per frame", 2)
        except OSError as err:
            if err.errno == errno.EPIPE:
                raise
            fail(_os_error(err), 2)


OUTPUTS = "han_edge.outputs"   # ctx.meta key: {option name: output file} recorded by ``output_file``
OUTPUT_FOLDERS = "han_edge.output_folders"   # ctx.meta key: option names recorded by ``output_folder``


class HanEdgeCommand(TyperCommand):
    """A command that refuses an output file that is one of its input files, or an existing file inside one of its
    input folders that the command may read (an image, list or split file of a data set, any file of a Milvus
    Lite store), after parsing and before any work; a report or gallery beside the images may be rewritten.

    ``embed --engine m.onnx --out m.onnx`` would otherwise replace the model with a gallery file. Allowed
    pairs (``SAME_FILE_OK``): ``train --resume ck.pt --out ck.pt`` continues a run in place (written atomically).
    """

    SAME_FILE_OK = {("out", "resume")}

    def invoke(self, ctx):
        import os

        outputs = {name: path for name, path in ctx.meta.get(OUTPUTS, {}).items() if ctx.params.get(name) is not None}
        output_folders = ctx.meta.get(OUTPUT_FOLDERS, set())
        for name, value in ctx.params.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if name in outputs or name in output_folders or not isinstance(item, (str, Path)):
                    continue
                # input folders: path options (a plain string such as --variant small is no folder), and a
                # Milvus Lite gallery, a folder of files
                store = str(item).startswith("milvus:")
                folder_input = isinstance(item, Path) or store
                item = str(item).removeprefix("milvus:")
                for out_name, out in outputs.items():
                    if not out.is_file() or (out_name, name) in self.SAME_FILE_OK:
                        continue
                    if os.path.isfile(item) and os.path.samefile(out, item):
                        raise HanEdgeError(f"{_option(self, out_name)} {out} is the {_option(self, name)} input; "
                                           "give another file name")
                    # an image, list, .mat or marker of a data set, any file of a Milvus Lite store: what it may read
                    if folder_input and os.path.isdir(item) and (store or _data_set_file(out)) \
                            and os.path.realpath(out).startswith(os.path.realpath(item) + os.sep):
                        raise HanEdgeError(f"{_option(self, out_name)} {out} is a file inside the "
                                           f"{_option(self, name)} input folder {item}; write it elsewhere")
        return super().invoke(ctx)


def _data_set_file(path: Path) -> bool:
    """A file the data-set readers and the embedder read: images, list and .mat split files, the synthetic marker."""
    from han_edge.data import IMAGE_SUFFIXES

    return path.suffix.lower() in (*IMAGE_SUFFIXES, ".txt", ".mat") or path.name == "synthetic.json"


def _option(command, name: str) -> str:
    param = next((p for p in command.params if p.name == name), None)
    return param.opts[0] if param is not None and param.opts and param.opts[0].startswith("-") else name


class HanEdgeTyper(typer.Typer):
    """``typer.Typer`` whose commands are ``HanEdgeCommand``s."""

    def command(self, *args, cls=HanEdgeCommand, **kwargs):
        return super().command(*args, cls=cls, **kwargs)


app = HanEdgeTyper(cls=HanEdgeGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="han-edge: HAN person re-id from training to TensorRT engines on Jetson and data-centre GPUs.")
profile_app = HanEdgeTyper(no_args_is_help=True, help="FLOPs/params per variant and cost-effectiveness tables.")
app.add_typer(profile_app, name="profile")
console = Console()


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def write_json(path: Optional[Path], data, written: tuple = ()) -> None:
    """An optional --json report, written atomically; never over a file the command has just ``written``."""
    if path:
        import os

        from han_edge.fileio import write_json as write

        for out in written:
            if os.path.exists(out) and os.path.exists(path) and os.path.samefile(out, path):
                raise HanEdgeError(f"--json {path} is a file this command just wrote; the report is not written "
                                   "over it (give --json another name)")
        write(path, data)
        console.print(f"wrote {path}")


# -- option checks (Typer callbacks: they run while parsing, before the command body) --------------------------
def _bad(err: HanEdgeError) -> typer.BadParameter:
    return typer.BadParameter(str(err))


def output_file(what: str):
    """Callback for an output file option: the parent is created if missing, then the destination is checked."""
    def check(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
        if value is None:
            return None
        from han_edge.paths import check_destination, ensure_folder

        try:
            path = Path(value)
            if str(value) and not str(value).endswith("/") and not path.parent.exists():
                ensure_folder(path.parent, f"folder for the {what}")
            checked = check_destination(value, what)
        except HanEdgeError as err:
            raise _bad(err) from None
        ctx.meta.setdefault(OUTPUTS, {})[param.name] = checked   # compared with the inputs (HanEdgeCommand)
        return checked
    return check


def output_folder(what: str, create: bool = True):
    """Callback for an output folder option: created if missing, refused if it is a file or read-only.

    ``create=False``: a missing folder is only checked to be creatable (its nearest existing parent a
    writable folder) and is made by the step that writes into it, so a step that does not run leaves none.
    """
    def check(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
        if value is None:
            return None
        import os

        from han_edge.paths import ensure_folder

        ctx.meta.setdefault(OUTPUT_FOLDERS, set()).add(param.name)   # not an input folder (HanEdgeCommand)

        try:
            if not create and str(value) and not Path(value).exists():
                parent = next(p for p in Path(value).absolute().parents if p.exists())
                if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                    raise HanEdgeError(f"cannot create {what} {value}: {parent} is not a writable folder")
                return Path(value)
            return ensure_folder(value, what)
        except HanEdgeError as err:
            raise _bad(err) from None
    return check


def model_source(value: Optional[str]) -> Optional[str]:
    """A model file the format table knows (checked to exist) or a ``grpc://host:port/name`` Triton URI."""
    if value is None:
        return value
    from han_edge.formats import format_of

    try:
        format_of(value)
    except HanEdgeError as err:
        raise _bad(err) from None
    return value


def finite_positive(value: float) -> float:
    """Callback: a finite number > 0 (Click's FloatRange lets NaN and inf through)."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number above 0, not {value}")
    return value


def batch_list(value: str) -> list[int]:
    """Callback: ``"1,8,32"`` -> ``[1, 8, 32]``; each a whole number from 1 to ``MAX_BATCH``, duplicates dropped."""
    parts = [p.strip() for p in str(value).split(",")]
    if not any(parts):
        raise typer.BadParameter("give at least one batch size, e.g. 1,8,32")
    sizes = []
    for part in parts:
        if not part:
            raise typer.BadParameter(f"{value!r} has an empty entry; write sizes like 1,8,32")
        if not re.fullmatch(r"[+-]?[0-9]{1,9}", part):   # int() also takes "1_0" and non-ASCII digits
            raise typer.BadParameter(f"{part!r} is not a whole number; write sizes like 1,8,32")
        size = int(part)
        if not 1 <= size <= MAX_BATCH:
            raise typer.BadParameter(f"batch size {size} is outside 1..{MAX_BATCH}")
        if size not in sizes:
            sizes.append(size)
    return sizes


def check_batches(opt_batch: Optional[int], max_batch: int) -> int:
    """The engine profile's optimum batch: default min(32, max); larger than --max-batch is refused."""
    if opt_batch is None:
        return min(32, max_batch)
    if opt_batch > max_batch:
        raise typer.BadParameter(f"--opt-batch {opt_batch} is larger than --max-batch {max_batch}",
                                 param_hint="'--opt-batch'")
    return opt_batch
