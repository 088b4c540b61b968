"""``shapes``: a small synthetic panoptic dataset that needs no download (the demo's and the tests' default).

Each image shows 1-3 *stuff* regions, told apart by texture and a per-class range of tints, under
2-5 overlapping *thing* instances, told apart by shape only (their colours are random):

- stuff: ``sky`` (smooth brightness gradient, blue-cyan), ``grass`` (fine vertical streaks,
  yellow-green), ``floor`` (checker tiles, red-brown), each with random hue/saturation/value within its range;
- things: ``circle``, ``square``, ``triangle``, ``cross`` with random size (18-40 % of the image side),
  rotation and colour; every instance keeps at least 75 % of its area visible and at least
  ~1 % of the image (12x12 px at 128x128).

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``. A split is
written once as a :mod:`folder <maskformer.data.formats>` dataset with panoptic annotations (JPEG
images, class-id PNGs, COCO panoptic JSON + RGB id PNGs) into
``$MASKFORMER_CACHE`` (default ``~/.cache/maskformer``) ``/shapes-<hash of the options>``; the folder
is built under a temporary name and renamed into place, so concurrent processes never see a partial one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from maskformer.data.io import id2rgb
from maskformer.data.metadata import DatasetMetadata

__all__ = ["SHAPES_CLASSES", "SHAPES_THINGS", "shapes_metadata", "shapes_records", "generate_shapes_image", "shapes_root"]

SHAPES_CLASSES = ["sky", "grass", "floor", "circle", "square", "triangle", "cross"]
SHAPES_THINGS = [False, False, False, True, True, True, True]
SHAPES_COLORS = [(70, 130, 180), (107, 142, 35), (152, 120, 90), (220, 20, 60), (255, 160, 0), (0, 170, 160), (150, 60, 220)]
_NUM_STUFF = 3
_VERSION = 3
_DEFAULT_NUM_IMAGES = {"train": 2000}
_DEFAULT_NUM_IMAGES_OTHER = 200


_THING_SHAPES = tuple(SHAPES_CLASSES[_NUM_STUFF:])


def _class_table(things: tuple[str, ...]) -> tuple[list[str], list[bool], list[tuple[int, int, int]]]:
    """Names, thing flags and colours of the classes when only ``things`` are drawn (in that order)."""
    unknown = [t for t in things if t not in _THING_SHAPES]
    if unknown or not things or len(set(things)) != len(things):
        raise ValueError(f"shapes: things must be distinct names among {list(_THING_SHAPES)}, got {list(things)}")
    keep = list(range(_NUM_STUFF)) + [SHAPES_CLASSES.index(t) for t in things]
    return [SHAPES_CLASSES[i] for i in keep], [SHAPES_THINGS[i] for i in keep], [SHAPES_COLORS[i] for i in keep]


def shapes_metadata(root: str | None = None, split: str = "train", *, things=_THING_SHAPES, **options) -> DatasetMetadata:
    names, is_thing, colors = _class_table(tuple(things))
    return DatasetMetadata(
        name="shapes",
        class_names=names,
        colors=colors,
        is_thing=is_thing,
        ignore_label=255,
        evaluator="sem_seg+panoptic",
    )


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _random_color(rng: np.random.Generator, sat=(0.25, 0.95), val=(0.35, 0.95)) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


# Each stuff class has its own range of hues (as real sky, grass and floors do) on top of its
# texture; things take any colour, so only their shape tells them apart.
_STUFF_HUES = {0: (0.50, 0.68), 1: (0.17, 0.42), 2: (0.97, 1.12)}


def _stuff_color(cls: int, rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(*_STUFF_HUES[cls]) % 1.0, rng.uniform(0.3, 0.9), rng.uniform(0.4, 0.95))


def _stuff_layout(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Class map of 1-3 stuff classes as the argmax of smooth random fields (large blobby regions)."""
    k = int(rng.integers(1, _NUM_STUFF + 1))
    classes = rng.permutation(_NUM_STUFF)[:k]
    if k == 1:
        return np.full((size, size), classes[0], dtype=np.int64)
    for _ in range(20):
        fields = []
        for _c in range(k):
            f = rng.normal(0, 0.3) * np.ones_like(xx)
            for _j in range(2):
                fx, fy = rng.uniform(-1.2, 1.2, size=2)
                f = f + rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
            fields.append(f)
        arg = np.argmax(np.stack(fields), axis=0)
        fractions = np.bincount(arg.ravel(), minlength=k) / arg.size
        if fractions.min() >= 0.12:
            break
    return classes[arg]


def _stuff_texture(cls: int, rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    color = _stuff_color(cls, rng)
    if cls == 0:  # sky: smooth gradient along a random direction
        theta = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(theta) * xx + np.sin(theta) * yy
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        shade = 0.7 + 0.6 * ramp
        return color[None, None] * shade[..., None]
    if cls == 1:  # grass: thin streaks, random brightness per column, slightly wavy
        columns = rng.uniform(0.55, 1.45, size=size + 8)
        offset = (3 * np.sin(2 * np.pi * yy * rng.uniform(1, 3) + rng.uniform(0, 6))).astype(np.int64)
        idx = np.clip((xx * (size - 1)).astype(np.int64) + offset + 4, 0, size + 7)
        return color[None, None] * columns[idx][..., None]
    # floor: checker tiles, the second shade darker and slightly hue-shifted
    tile = int(rng.integers(max(size // 16, 4), max(size // 8, 6) + 1))
    py, px = rng.integers(0, tile, size=2)
    iy = ((yy * (size - 1)).astype(np.int64) + py) // tile
    ix = ((xx * (size - 1)).astype(np.int64) + px) // tile
    other = 0.6 * color + 0.15 * _random_color(rng)
    return np.where(((iy + ix) % 2 == 0)[..., None], color[None, None], other[None, None])


def _thing_mask(shape: str, cy: float, cx: float, r: float, theta: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":  # half side 0.8 r: area close to the circle's
        a = 0.8 * r
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if shape == "triangle":  # equilateral, inscribed in radius 1.15 r
        rr = 1.15 * r
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            ang = 2 * np.pi * k / 3
            nx, ny = np.cos(ang), np.sin(ang)  # outward normal of edge k, at distance rr/2
            inside &= (u * nx + v * ny) <= rr / 2
        return inside
    # cross: two bars of width 0.6 r
    w = 0.3 * r
    return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))


def generate_shapes_image(
    seed: int, split: str, index: int, image_size: int = 128, num_things: tuple[int, int] = (2, 5),
    thing_shapes: tuple[str, ...] = _THING_SHAPES,
    max_rotation: float = 180.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One deterministic sample; thing classes drawn from ``thing_shapes`` (contiguous ids after the stuff),
    each turned by a random angle within +-``max_rotation`` degrees (180: any orientation).

    Returns:
        image uint8 ``[S,S,3]``, semantic class ids uint8 ``[S,S]``, panoptic segment ids int64 ``[S,S]``
        (0 unused: every pixel belongs to a segment) and segments_info ``[{"id","category_id","iscrowd","isthing","area","bbox"}]``.
    """
    s = image_size
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    grid = ((np.arange(s) + 0.5) / s).astype(np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    pix_y, pix_x = yy * s, xx * s

    stuff = _stuff_layout(rng, s, yy, xx)
    image = np.zeros((s, s, 3), dtype=np.float32)
    for cls in np.unique(stuff):
        region = stuff == cls
        image[region] = _stuff_texture(int(cls), rng, s, yy, xx)[region]

    # Things, painted one after another; a placement is rejected if it hides too much of an earlier one.
    owner = np.full((s, s), -1, dtype=np.int64)  # index into `things`
    things: list[tuple[int, int]] = []  # (class, full area)
    min_area = max(int(0.009 * s * s), 9)
    target = int(rng.integers(num_things[0], num_things[1] + 1))
    for _ in range(target):
        for _try in range(20):
            cls = int(rng.integers(_NUM_STUFF, _NUM_STUFF + len(thing_shapes)))
            r = rng.uniform(0.09, 0.2) * s
            cy, cx = rng.uniform(r * 0.8, s - r * 0.8, size=2)
            if max_rotation >= 180:
                theta = rng.uniform(0, 2 * np.pi)
            else:
                theta = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
            mask = _thing_mask(thing_shapes[cls - _NUM_STUFF], cy, cx, r, theta, pix_y, pix_x)
            area = int(mask.sum())
            if area < min_area:
                continue
            new_owner = np.where(mask, len(things), owner)
            visible = np.bincount(new_owner[new_owner >= 0], minlength=len(things) + 1)
            # Mostly visible: a square hidden by half can look like a triangle, and a label no
            # model could get right teaches nothing.
            if all(visible[i] >= max(0.75 * a, min_area) for i, (_, a) in enumerate(things)):
                break
        else:
            continue
        # Random colour, re-drawn while it is too close to the background under the shape.
        background = image[mask].mean(0)
        for _c in range(8):
            color = _random_color(rng, sat=(0.2, 1.0), val=(0.2, 1.0))
            if np.abs(color - background).sum() > 90:
                break
        shade = 0.85 + 0.3 * rng.random() * (pix_y - cy) / (2 * r) + 0.15
        image[mask] = (color[None] * shade[mask][:, None]).clip(0, 255)
        owner = new_owner
        things.append((cls, area))

    image = image + 5.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    image = image.clip(0, 255).astype(np.uint8)

    semantic = stuff.copy()
    pan = np.zeros((s, s), dtype=np.int64)
    segments = []

    def add_segment(region: np.ndarray, cls: int) -> None:
        seg_id = len(segments) + 1
        pan[region] = seg_id
        ys, xs = np.nonzero(region)
        segments.append(
            {
                "id": seg_id,
                "category_id": cls,
                "iscrowd": 0,
                "isthing": int(cls >= _NUM_STUFF),
                "area": int(region.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            }
        )

    for cls in np.unique(stuff):
        region = (stuff == cls) & (owner < 0)
        if region.any():
            add_segment(region, int(cls))
    for i, (cls, _) in enumerate(things):
        region = owner == i
        semantic[region] = cls
        add_segment(region, cls)
    return image, semantic.astype(np.uint8), pan, segments


# ------------------------------------------------------------------------------------------------
# Cache on disk, as a folder dataset
# ------------------------------------------------------------------------------------------------


def shapes_root(parent: str | os.PathLike | None, split: str, image_size: int, num_images: int, seed: int, num_things,
                things: tuple[str, ...] = _THING_SHAPES, max_rotation: float = 180.0) -> Path:
    """The cache folder of one split for these options."""
    key = json.dumps(
        {"v": _VERSION, "split": split, "size": image_size, "n": num_images, "seed": seed, "things": list(num_things),
         **({} if tuple(things) == _THING_SHAPES else {"shapes": list(things)}),
         **({} if max_rotation >= 180 else {"rotation": float(max_rotation)})},
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    if parent is None:
        parent = os.environ.get("MASKFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maskformer")
    return Path(parent) / f"shapes-{digest}"


def _write_images(out: Path, split: str, image_size: int, seed: int, num_things, things, max_rotation,
                  indices: range) -> tuple[list, list]:
    images, annotations = [], []
    for i in indices:
        image, semantic, pan, segments = generate_shapes_image(seed, split, i, image_size, tuple(num_things), things,
                                                               max_rotation)
        stem = f"{split}_{i:06d}"
        Image.fromarray(image).save(out / "images" / split / f"{stem}.jpg", quality=95)
        Image.fromarray(semantic).save(out / "masks" / split / f"{stem}.png")
        Image.fromarray(id2rgb(pan)).save(out / "panoptic" / split / f"{stem}.png")
        images.append({"id": stem, "file_name": f"{stem}.jpg", "height": image_size, "width": image_size})
        annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
    return images, annotations


def _write_split(out: Path, split: str, image_size: int, num_images: int, seed: int, num_things, things,
                 max_rotation) -> None:
    names, is_thing, _ = _class_table(things)
    for sub in ("images", "masks", "panoptic"):
        (out / sub / split).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    # Images are independent, so large splits are drawn in parallel (not from daemonic processes such
    # as DataLoader workers, which may not start children). The result is identical either way.
    workers = min(os.cpu_count() or 1, 8, num_images // 250)
    chunks = [range(k * num_images // max(workers, 1), (k + 1) * num_images // max(workers, 1)) for k in range(max(workers, 1))]
    if workers > 1 and not multiprocessing.current_process().daemon:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_write_images, *zip(*[(out, split, image_size, seed, num_things, things, max_rotation, c)
                                                          for c in chunks])))
    else:
        parts = [_write_images(out, split, image_size, seed, num_things, things, max_rotation, range(num_images))]
    images = [x for part in parts for x in part[0]]
    annotations = [x for part in parts for x in part[1]]
    categories = [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(names, is_thing))]
    with open(out / "panoptic" / f"{split}.json", "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def ensure_shapes(parent, split: str, image_size: int, num_images: int, seed: int, num_things,
                  things: tuple[str, ...] = _THING_SHAPES, max_rotation: float = 180.0) -> Path:
    """Generate the split into the cache unless it is already there; returns the dataset root."""
    final = shapes_root(parent, split, image_size, num_images, seed, num_things, things, max_rotation)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        _write_split(tmp, split, image_size, num_images, seed, num_things, things, max_rotation)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def shapes_records(
    root: str | None,
    split: str,
    *,
    image_size: int = 128,
    num_images: int | None = None,
    seed: int = 0,
    num_things: list[int] | tuple[int, int] = (2, 5),
    things: list[str] | tuple[str, ...] = _THING_SHAPES,
    max_rotation: float = 180.0,
) -> list[dict]:
    """Records of the shapes split (generated on first use). ``root`` (optional) is the cache parent folder.

    Options: ``image_size`` (square side), ``num_images`` (default 2000 for train, 200 otherwise),
    ``seed``, ``num_things`` ([min, max] instances per image), ``things`` (which shapes to draw, a
    subset of circle/square/triangle/cross; the classes are the 3 stuff classes then these, in order),
    ``max_rotation`` (degrees; things are turned by up to this much, 180 = any orientation).
    """
    from maskformer.data.formats import folder_records

    if image_size < 32:
        raise ValueError(f"shapes: image_size must be >= 32, got {image_size}")
    if len(num_things) != 2 or not 0 <= num_things[0] <= num_things[1]:
        raise ValueError(f"shapes: num_things must be [min, max] with 0 <= min <= max, got {num_things}")
    n = num_images if num_images is not None else _DEFAULT_NUM_IMAGES.get(split, _DEFAULT_NUM_IMAGES_OTHER)
    if n < 1:
        raise ValueError(f"shapes: num_images must be >= 1, got {n}")
    things = tuple(things)
    _class_table(things)  # validates
    if not 0 <= max_rotation <= 180:
        raise ValueError(f"shapes: max_rotation must be in [0, 180] degrees, got {max_rotation}")
    dataset_root = ensure_shapes(root, split, image_size, n, seed, tuple(int(v) for v in num_things), things,
                                 float(max_rotation))
    return folder_records(str(dataset_root), split, name="shapes")
