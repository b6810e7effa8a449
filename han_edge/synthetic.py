"""Synthetic re-id set: person-like crops in the Market-1501 layout, deterministic from a seed.

An identity is a body shape, clothing colours and pattern, hair and accessories; an image is that
identity seen by one of six cameras (colour cast, illumination, background), with pose jitter,
background clutter, partial occlusion and a misaligned detector box (shift and scale).
Colours are drawn from small palettes, so many identities share their main colours and only
patterns, accessories and proportions tell them apart: colour histograms alone do poorly.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from han_edge.errors import HanEdgeError

HEIGHT, WIDTH = 128, 64          # Market-1501's crop size
NUM_CAMERAS = 6
FORMAT_VERSION = 1
SUBFOLDERS = ("bounding_box_train", "bounding_box_test", "query")   # a folder holding only these (no marker) is an interrupted generation: regenerated
PALETTE = np.array([[30, 30, 30], [230, 230, 230], [40, 40, 170], [170, 60, 40], [40, 140, 60],
                    [40, 170, 210], [120, 120, 120], [150, 60, 140], [30, 90, 200], [100, 70, 40]],
                   dtype=np.float64)  # BGR
SKIN = np.array([[90, 120, 170], [120, 160, 210], [60, 90, 130], [140, 180, 225]], dtype=np.float64)


def make_identity(rng: np.random.Generator) -> dict:
    return {
        "shirt": int(rng.integers(len(PALETTE))), "shirt2": int(rng.integers(len(PALETTE))),
        "pattern": int(rng.integers(4)),          # 0 plain, 1 horizontal stripes, 2 vertical, 3 chest logo
        "pants": int(rng.integers(len(PALETTE))), "shoes": int(rng.integers(len(PALETTE))),
        "skin": int(rng.integers(len(SKIN))), "hair": int(rng.integers(len(PALETTE))),
        "long_hair": bool(rng.random() < 0.35), "shorts": bool(rng.random() < 0.25),
        "bag": int(rng.integers(3)),              # 0 none, 1 backpack, 2 hand bag
        "bag_colour": int(rng.integers(len(PALETTE))),
        "width": float(rng.uniform(0.8, 1.2)), "torso": float(rng.uniform(0.36, 0.46)),
    }


def make_camera(rng: np.random.Generator) -> dict:
    return {"gain": rng.uniform(0.85, 1.15, 3), "brightness": float(rng.uniform(-20, 20)),
            "background": rng.uniform(40, 200, 3), "blur": int(rng.integers(0, 2))}


def render(identity: dict, camera: dict, rng: np.random.Generator) -> np.ndarray:
    """One crop of an identity under a camera, with per-image nuisance."""
    scale = rng.uniform(0.85, 1.1)                      # detector box scale
    shift = rng.normal(0, [3.0, 4.0])                   # detector box shift (x, y)
    canvas = np.empty((HEIGHT, WIDTH, 3), np.float64)
    # Background half camera, half scene: the camera alone must not identify anybody.
    canvas[:] = 0.5 * camera["background"] + 0.5 * rng.uniform(40, 200, 3)
    for _ in range(int(rng.integers(2, 6))):            # background clutter
        x, y = rng.integers(-10, WIDTH), rng.integers(-10, HEIGHT)
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + rng.integers(5, 30)), int(y + rng.integers(5, 40))),
                      rng.uniform(0, 255, 3).tolist(), -1)
    _draw_person(canvas, identity, rng, scale, shift)
    if rng.random() < 0.3:                               # partial occlusion by a passer-by or object
        h = int(rng.integers(HEIGHT // 5, HEIGHT // 2))
        w = int(rng.integers(WIDTH // 4, WIDTH // 2))
        y = HEIGHT - h if rng.random() < 0.6 else int(rng.integers(0, HEIGHT - h))
        x = 0 if rng.random() < 0.5 else WIDTH - w
        canvas[y:y + h, x:x + w] = rng.uniform(0, 255, 3)
    canvas = canvas * camera["gain"] + camera["brightness"] + rng.normal(0, 6, canvas.shape)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    if camera["blur"]:
        image = cv2.GaussianBlur(image, (3, 3), 0.8)
    return image


def _draw_person(canvas, ident, rng, scale, shift) -> None:
    cx = WIDTH / 2 + shift[0]
    top = 6 + shift[1] + (1 - scale) * HEIGHT / 2
    body_h = (HEIGHT - 12) * scale
    half_w = 13 * ident["width"] * scale
    head_r = body_h * 0.075
    head_y = top + head_r
    torso_top = top + 2 * head_r + 1
    torso_bottom = torso_top + body_h * ident["torso"]
    feet = top + body_h
    colour = lambda key: (PALETTE[ident[key]] + rng.normal(0, 8, 3)).tolist()
    skin = (SKIN[ident["skin"]] + rng.normal(0, 5, 3)).tolist()
    pt = lambda x, y: (int(round(x)), int(round(y)))
    lean = rng.normal(0, 1.5)
    if ident["bag"] == 1:   # backpack shows at one side, behind the torso
        side = 1 if ident["bag_colour"] % 2 else -1
        cv2.rectangle(canvas, pt(cx + side * half_w * 0.6, torso_top + 2),
                      pt(cx + side * (half_w + 5 * scale), torso_top + body_h * 0.3), colour("bag_colour"), -1)
    # legs with stride jitter
    swing = rng.uniform(-0.5, 0.5) * half_w
    leg_colour = colour("pants")
    knee = torso_bottom + (feet - torso_bottom) * 0.5
    for sx, sw in ((-0.45, -swing), (0.45, swing)):
        hip = pt(cx + sx * half_w, torso_bottom)
        foot = pt(cx + sx * half_w + sw, feet)
        cv2.line(canvas, hip, foot, skin if ident["shorts"] else leg_colour, max(2, int(half_w * 0.55)), cv2.LINE_AA)
        if ident["shorts"]:
            cv2.line(canvas, hip, pt(cx + sx * half_w + sw * 0.5, knee), leg_colour, max(2, int(half_w * 0.6)), cv2.LINE_AA)
        cv2.ellipse(canvas, foot, (max(2, int(half_w * 0.35)), 2), 0, 0, 360, colour("shoes"), -1)
    # torso with pattern
    x0, x1 = int(cx - half_w + lean), int(cx + half_w + lean)
    y0, y1 = int(torso_top), int(torso_bottom)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), colour("shirt"), -1)
    second = colour("shirt2")
    if ident["pattern"] == 1:
        for y in range(y0 + 3, y1, 7):
            cv2.rectangle(canvas, (x0, y), (x1, y + 2), second, -1)
    elif ident["pattern"] == 2:
        for x in range(x0 + 3, x1, 7):
            cv2.rectangle(canvas, (x, y0), (x + 2, y1), second, -1)
    elif ident["pattern"] == 3:
        cv2.circle(canvas, pt(cx + lean, (y0 + y1) / 2 - 3), max(3, int(half_w * 0.4)), second, -1)
    # arms
    for side in (-1, 1):
        shoulder = pt(cx + side * half_w + lean, torso_top + 3)
        hand = pt(cx + side * (half_w + rng.uniform(0, 4)), torso_bottom + rng.uniform(-4, 4))
        cv2.line(canvas, shoulder, hand, colour("shirt"), max(2, int(half_w * 0.3)), cv2.LINE_AA)
        if ident["bag"] == 2 and side == 1:
            cv2.rectangle(canvas, (hand[0] - 4, hand[1]), (hand[0] + 4, hand[1] + 10), colour("bag_colour"), -1)
    # head and hair
    head = pt(cx + lean, head_y)
    cv2.circle(canvas, head, max(3, int(head_r)), skin, -1, cv2.LINE_AA)
    cv2.ellipse(canvas, head, (max(3, int(head_r)), max(2, int(head_r * 0.6))), 0, 180, 360, colour("hair"), -1)
    if ident["long_hair"]:
        cv2.rectangle(canvas, pt(cx + lean - head_r, head_y), pt(cx + lean + head_r, head_y + head_r * 2.2),
                      colour("hair"), -1)


def generate(root: str | Path, seed: int = 0, train_ids: int = 100, test_ids: int = 60,
             distractors: int = 40, first_id: int = 1, progress=None) -> Path:
    """Write a Market-1501-layout set under ``root``; returns the root.

    Identities are numbered from ``first_id``; each is drawn from (``seed``, its number), so sets
    with disjoint numbers and one seed hold different people seen by the same cameras.

    The marker ``synthetic.json`` is written last and atomically: a set without it is incomplete.
    """
    from han_edge.paths import ensure_folder

    if not 1 <= first_id <= 10_000 - train_ids - test_ids:   # checked before anything is written
        raise HanEdgeError(f"synthetic identities {first_id}..{first_id + train_ids + test_ids - 1} do not fit "
                           "the Market layout's four digits")
    root = Path(root)
    for sub in SUBFOLDERS:
        ensure_folder(root / sub, "synthetic set folder")

    def imwrite(path: Path, image: np.ndarray) -> None:
        # encoded by OpenCV, written by Python: cv2.imwrite crashes the process on a name that is not UTF-8
        ok, data = cv2.imencode(path.suffix, image)
        try:
            if not ok:
                raise OSError
            data.tofile(path)
        except OSError:
            raise HanEdgeError(f"cannot write synthetic image {path}: the disk is full or the folder is not "
                               "writable") from None
    master = np.random.default_rng(seed)
    cameras = [make_camera(master) for _ in range(NUM_CAMERAS)]
    for pid in range(first_id, first_id + train_ids + test_ids):
        rng = np.random.default_rng([seed, pid])
        identity = make_identity(rng)
        cams = rng.choice(NUM_CAMERAS, size=int(rng.integers(2, 5)), replace=False)
        is_test = pid >= first_id + train_ids
        for cam in sorted(cams):
            for k in range(int(rng.integers(2, 5))):
                image = render(identity, cameras[cam], rng)
                folder = "bounding_box_train" if not is_test else ("query" if k == 0 else "bounding_box_test")
                imwrite(root / folder / f"{pid:04d}_c{cam + 1}s1_{k:06d}_00.jpg", image)
        if progress:
            progress()
    for n in range(distractors):        # pid 0: people never queried; pid -1: junk (background only)
        rng = np.random.default_rng([seed, 100000 + n])
        cam = int(rng.integers(NUM_CAMERAS))
        image = render(make_identity(rng), cameras[cam], rng)
        imwrite(root / "bounding_box_test" / f"0000_c{cam + 1}s1_{n:06d}_00.jpg", image)
        junk = np.clip(cameras[cam]["background"] + rng.normal(0, 30, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        imwrite(root / "bounding_box_test" / f"-1_c{cam + 1}s1_{n:06d}_00.jpg", junk)
    spec = {"format": FORMAT_VERSION, "seed": seed, "train_ids": train_ids, "test_ids": test_ids,
            "distractors": distractors, "first_id": first_id}
    from han_edge.fileio import write_json

    write_json(root / "synthetic.json", spec, "synthetic set marker")
    return root


def ensure_synthetic(root: str | Path, seed: int = 0, **sizes) -> Path:
    """Generate the set unless ``root`` already holds the same one (same seed and sizes)."""
    try:
        return _ensure_synthetic(Path(root), seed, sizes)
    except OSError as err:   # a folder that cannot be entered or listed, a name too long, ...
        raise HanEdgeError(f"synthetic set folder {root} cannot be read or created: "
                           f"{err.strerror or err}") from None


def _ensure_synthetic(root: Path, seed: int, sizes: dict) -> Path:
    marker = root / "synthetic.json"
    if marker.is_file():
        try:
            spec = json.loads(marker.read_text(encoding="utf-8")) if marker.stat().st_size < 1 << 16 else None
        except (OSError, ValueError, RecursionError):   # RecursionError: nesting deeper than Python's stack
            spec = None
        if not isinstance(spec, dict):
            raise HanEdgeError(f"{marker} is damaged; delete {root} or choose another --root")
        wanted = {"seed": seed, **sizes}
        if all(spec.get(k) == v for k, v in wanted.items()) and spec.get("format") == FORMAT_VERSION:
            return root
        held = {k: spec.get(k) for k in ("format", *wanted)}
        raise HanEdgeError(f"{root} holds a different synthetic set ({str(held)[:200]}); choose another --root")
    if root.exists() and not root.is_dir():
        raise HanEdgeError(f"synthetic set folder {root} is a file; choose another --root")
    if root.exists() and any(p.name not in SUBFOLDERS for p in root.iterdir()):
        raise HanEdgeError(f"{root} is not empty and holds no synthetic set; choose another --root")
    return generate(root, seed=seed, **sizes)
