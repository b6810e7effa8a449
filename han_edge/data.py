"""Re-id datasets: parsers for the standard folder layouts and a synthetic Market-1501-layout set."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from han_edge.errors import HanEdgeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
Item = tuple[str, int, int]  # (path, pid, camid)


@dataclass
class ReidData:
    """Train / query / gallery lists of (path, pid, camid); train pids relabelled to 0..n-1."""

    name: str
    train: list[Item]
    query: list[Item]
    gallery: list[Item]
    num_train_pids: int = field(init=False)

    def __post_init__(self):
        self.num_train_pids = len({pid for _, pid, _ in self.train})
        limit = np.iinfo(np.int64)
        for split in ("train", "query", "gallery"):
            if not getattr(self, split):
                raise HanEdgeError(f"{self.name}: the {split} split is empty")
            for path, pid, cam in getattr(self, split):
                if not (limit.min <= pid <= limit.max and limit.min <= cam <= limit.max):
                    raise HanEdgeError(f"{self.name}: the identity ({pid}) or camera number of {path} is "
                                       "beyond the 64-bit range")


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise HanEdgeError(f"{what}: folder {path} not found")
    return path


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def relabel(items: list[Item]) -> list[Item]:
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], cam) for path, pid, cam in items]


# -- Market-1501 and DukeMTMC-reID: <pid>_c<cam>..., pid -1 junk (dropped), 0 distractor -------
_ASCII_INT = re.compile(r"-?[0-9]{1,18}")
_PID_CAM = re.compile(r"^(-?\d+)_c(\d+)", re.ASCII)   # Market names; not other scripts' digits


def _parse_pid_cam_folder(folder: Path, dataset: str, keep_distractors: bool) -> list[Item]:
    files = _images(_require_dir(folder, dataset))
    if not files:
        raise HanEdgeError(f"{dataset}: no images in {folder}")
    items = []
    for path in files:
        match = _PID_CAM.match(path.name)
        if not match:
            raise HanEdgeError(f"{dataset}: cannot parse pid/camera from file name {path.name} in {folder} "
                               "(expected e.g. 0002_c1s1_000451_03.jpg)")
        pid, cam = int(match.group(1)), int(match.group(2)) - 1
        if pid == -1 or (pid == 0 and not keep_distractors):
            continue
        items.append((str(path), pid, cam))
    return items


def load_market_layout(root: str | Path, name: str = "market1501") -> ReidData:
    """Market-1501 / DukeMTMC-reID: bounding_box_train/, query/, bounding_box_test/."""
    root = _require_dir(Path(root), name)
    train = _parse_pid_cam_folder(root / "bounding_box_train", name, keep_distractors=False)
    return ReidData(name, relabel(train), *load_market_test(root, name))


def load_market_test(root: str | Path, name: str) -> tuple[list[Item], list[Item]]:
    """(query, gallery) of a Market-layout folder: query/ and bounding_box_test/ (a test-only set needs no train/)."""
    root = _require_dir(Path(root), name)
    return (_parse_pid_cam_folder(root / "query", name, keep_distractors=False),
            _parse_pid_cam_folder(root / "bounding_box_test", name, keep_distractors=True))


def load_msmt17(root: str | Path) -> ReidData:
    """MSMT17: train/ and test/ with list_{train,val,query,gallery}.txt of '<rel path> <pid>'."""
    root = _require_dir(Path(root), "msmt17")

    def read_list(list_name: str, folder: str) -> list[Item]:
        list_path = root / list_name
        if not list_path.is_file():
            raise HanEdgeError(f"msmt17: list file {list_path} not found")
        try:
            text = list_path.read_text(encoding="utf-8-sig")   # a BOM is not part of the first file name
        except UnicodeDecodeError as err:
            raise HanEdgeError(f"msmt17: list file {list_path} is not UTF-8 text (byte {err.start} is "
                               f"{err.object[err.start:err.start + 1]!r})") from None
        except OSError as err:
            raise HanEdgeError(f"msmt17: cannot read list file {list_path}: {err.strerror}") from None
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                rel, pid_text, cam_text = parts[0], parts[1], Path(parts[0]).name.split("_")[2]
                if not (_ASCII_INT.fullmatch(pid_text) and _ASCII_INT.fullmatch(cam_text)):   # int() reads "1_000"
                    raise ValueError
                pid, cam = int(pid_text), int(cam_text) - 1   # 0000_000_01_0303morning_0015_0.jpg
            except (IndexError, ValueError):
                raise HanEdgeError(f"msmt17: cannot parse line {n} of {list_path}: {line!r}") from None
            items.append((str(root / folder / rel), pid, cam))
        return items

    _require_dir(root / "train", "msmt17")
    _require_dir(root / "test", "msmt17")
    train = read_list("list_train.txt", "train")
    if (root / "list_val.txt").is_file():
        train += read_list("list_val.txt", "train")   # the standard protocol trains on train + val
    return ReidData("msmt17", relabel(train), read_list("list_query.txt", "test"),
                    read_list("list_gallery.txt", "test"))


_CUHK03_KEYS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")
# scipy's .mat reader is not hardened against damaged files (a changed byte can crash the process), so a
# child process reads the file and hands back plain arrays (file names as text, never pickled objects).
# It runs in an empty folder with this process's import path, so no file beside the data is imported.
_READ_MAT = """
import sys
sys.path[:] = sys.argv[4:]
import numpy as np
from scipy.io import loadmat
try:
    mat = loadmat(sys.argv[1])
    out = {k: np.asarray(mat[k]) for k in sys.argv[3].split(",") if k in mat}
    if "filelist" in out:
        out["filelist"] = np.array([f if isinstance(f, str) else str(np.ravel(f)[0]) for f in np.ravel(out["filelist"])])
    np.savez(sys.argv[2], **out)
except Exception as err:
    sys.exit(f"{type(err).__name__}: {err}".splitlines()[0])
"""


def _read_split_mat(mat_path: Path) -> dict[str, np.ndarray]:
    """The CUHK03 split arrays of a .mat file, or one sentence saying what is wrong with it."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "split.npz"
        done = subprocess.run([sys.executable, "-c", _READ_MAT, os.path.abspath(mat_path), str(out),
                               ",".join(_CUHK03_KEYS), *(os.path.abspath(p) for p in sys.path)],
                              cwd=tmp, capture_output=True, text=True, errors="replace")
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [""])[-1]
            if done.returncode < 0 or not why:
                code = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
                why = f"the .mat reader crashed on it ({code}); the file is damaged"
            raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: {why}")
        try:
            with np.load(out, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except ValueError as err:   # an object (cell/struct) array where numbers or names belong
            raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: {err}") from None


def _whole_numbers(mat: dict, key: str, mat_path: Path) -> np.ndarray:
    values = np.ravel(mat[key])
    if values.dtype.kind not in "iuf" or not np.all(np.isfinite(values) & (values == np.round(values))
                                                    & (np.abs(values) < 2 ** 53)):
        raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: {key} must hold whole numbers")
    return values.astype(np.int64)


def load_cuhk03(root: str | Path, labeled: bool = True) -> ReidData:
    """CUHK03 767/700 protocol: images_{labeled,detected}/ + cuhk03_new_protocol_config_*.mat.

    The split indices are MATLAB's, 1-based: 1 is the first entry of ``filelist``.
    """
    kind = "labeled" if labeled else "detected"
    root = _require_dir(Path(root), "cuhk03")
    images = _require_dir(root / f"images_{kind}", "cuhk03")
    mat_path = root / f"cuhk03_new_protocol_config_{kind}.mat"
    if not mat_path.is_file():
        raise HanEdgeError(f"cuhk03: split file {mat_path} not found (the 767/700 protocol's .mat)")
    mat = _read_split_mat(mat_path)
    missing = [k for k in _CUHK03_KEYS if k not in mat]
    if missing:
        raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: no {', '.join(missing)} variable")
    files = [str(f) for f in np.ravel(mat["filelist"])]
    outside = next((f for f in files if Path(f).is_absolute() or ".." in Path(f).parts), None)
    if outside is not None:   # the split file names images; it does not choose which files are read
        raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: filelist entry {outside!r} points outside "
                           f"{images}")
    labels, cams = _whole_numbers(mat, "labels", mat_path), _whole_numbers(mat, "camId", mat_path)
    if not len(labels) == len(cams) == len(files):
        raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: {len(files)} files but {len(labels)} labels "
                           f"and {len(cams)} camera ids")
    splits = {}
    for key in ("train", "query", "gallery"):
        index = _whole_numbers(mat, f"{key}_idx", mat_path)
        bad = index[(index < 1) | (index > len(files))]
        if bad.size:
            raise HanEdgeError(f"cuhk03: malformed split file {mat_path}: {key}_idx holds {bad[0]}, but indices "
                               f"are 1-based and filelist has {len(files)} entries (1..{len(files)})")
        splits[key] = index - 1

    def take(key: str) -> list[Item]:
        return [(str(images / files[i]), int(labels[i]), int(cams[i]) - 1) for i in splits[key]]

    return ReidData(f"cuhk03-{kind}", relabel(take("train")), take("query"), take("gallery"))


def load_image_folder(root: str | Path) -> ReidData:
    """Generic layout: {train,query,gallery}/<pid>/<name containing c<cam>>.<ext>."""
    root = _require_dir(Path(root), "imagefolder")
    cam_re = re.compile(r"c(\d+)", re.ASCII)

    def split(name: str) -> list[Item]:
        folder = _require_dir(root / name, "imagefolder")
        items = []
        for pid_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if not re.fullmatch(r"-?[0-9]+", pid_dir.name):   # int() refuses '²', which str.isdigit() accepts
                raise HanEdgeError(f"imagefolder: identity folder {pid_dir} is not a number")
            for path in _images(pid_dir):
                match = cam_re.search(path.stem)
                if not match:
                    raise HanEdgeError(f"imagefolder: no camera (c<N>) in file name {path.name}")
                items.append((str(path), int(pid_dir.name), int(match.group(1)) - 1))
        if not items:
            raise HanEdgeError(f"imagefolder: no images in {folder}")
        return items

    return ReidData("imagefolder", relabel(split("train")), split("query"), split("gallery"))


DATASETS = {
    "market1501": lambda root: load_market_layout(root, "market1501"),
    "dukemtmc": lambda root: load_market_layout(root, "dukemtmc"),
    "msmt17": load_msmt17,
    "cuhk03": lambda root: load_cuhk03(root, labeled=True),
    "cuhk03-detected": lambda root: load_cuhk03(root, labeled=False),
    "imagefolder": load_image_folder,
}

def default_synthetic_root() -> Path:
    """Where the synthetic set lives unless --root says otherwise ($HAN_EDGE_SYNTHETIC or data/synthetic)."""
    import os

    value = os.environ.get("HAN_EDGE_SYNTHETIC", "data/synthetic")
    if not value.strip():   # an empty value would mean the current folder (and a held-out set beside it)
        raise HanEdgeError("HAN_EDGE_SYNTHETIC is set but empty; unset it or give the synthetic set's folder")
    return Path(value)


# People neither trained nor tested on in the synthetic set (identities 1001-1120, the same six cameras):
# ~1,080 labelled crops on which the INT8 export chooses what stays float and reports its accuracy.
HELDOUT_SET = {"seed": 0, "train_ids": 0, "test_ids": 120, "distractors": 0, "first_id": 1001}


def heldout_crops(root: str | Path | None = None) -> list[str]:
    """Paths of the held-out crops, generated once in ``<synthetic root>-heldout`` (or ``root``).

    Beside the synthetic set, not in it: ``$HAN_EDGE_SYNTHETIC=/data/syn`` puts them in ``/data/syn-heldout``
    (``.`` for the current folder: next to it, ``../<its name>-heldout``).
    """
    from han_edge.synthetic import ensure_synthetic

    if root is None:
        base = default_synthetic_root().resolve()
        root = base.parent / f"{base.name or 'synthetic'}-heldout"
    try:
        root = ensure_synthetic(root, **HELDOUT_SET)
    except HanEdgeError as err:
        if "--root" not in str(err):   # cannot write, cannot read: the message says what is wrong
            raise
        # a damaged, different or blocked set: ensure_synthetic's advice names --root, which does not choose this folder
        raise HanEdgeError(f"the held-out crops' folder {root} cannot be used ({str(err).split(';')[0]}); "
                           "delete or move it and han-edge generates it again") from None
    return [path for folder in ("query", "bounding_box_test")
            for path, _, _ in _parse_pid_cam_folder(root / folder, "synthetic held-out set", keep_distractors=False)]


def load_dataset(name: str, root: str | Path | None) -> ReidData:
    """Parse a dataset by name; ``synthetic`` generates (once) and reads a Market-layout set."""
    if name == "synthetic":
        from han_edge.synthetic import ensure_synthetic

        return load_market_layout(ensure_synthetic(root or default_synthetic_root()), "synthetic")
    if name not in DATASETS:
        raise HanEdgeError(f"unknown dataset {name!r}; choose one of synthetic, {', '.join(DATASETS)}")
    if root is None:
        raise HanEdgeError(f"dataset {name} needs --root DIR (the extracted dataset folder)")
    return DATASETS[name](root)
