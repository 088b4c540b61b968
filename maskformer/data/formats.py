"""Record builders for the on-disk dataset formats, and the panoptic annotation reader.

A builder takes ``(root, split, **options)`` and returns a list of *records* (plain dicts, as in
detectron2):

- semantic: ``{"file_name", "sem_seg_file_name", "image_id"}`` plus ``"reduce_zero_label": True``
  when the label files are 1-based with 0 = unlabeled (raw ADE20K, some folder datasets);
- panoptic: ``{"file_name", "pan_seg_file_name", "segments_info", "image_id"}`` (optional
  ``"sem_seg_file_name"``); ``segments_info`` entries are ``{"id", "category_id" (contiguous),
  "iscrowd", "isthing"}``. Cityscapes panoptic read straight from ``*_instanceIds.png`` has
  ``"pan_seg_format": "cityscapes_instance_ids"`` and ``segments_info: None``: the segments are
  derived from the PNG when the sample is read (:func:`load_panoptic`).

Builders check what they list (directories, JSON) and fail with a :class:`DatasetError` naming the
path and the preparation step; per-file problems surface when a sample is first read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from maskformer.data.io import DatasetError, read_json, read_panoptic
from maskformer.data.metadata import DatasetMetadata

__all__ = [
    "IMAGE_EXTENSIONS",
    "load_sem_seg_pairs",
    "load_coco_panoptic_json",
    "load_panoptic",
    "ade20k_semantic",
    "ade20k_full",
    "ade20k_panoptic",
    "coco_panoptic",
    "coco_stuff_10k",
    "cityscapes_semantic",
    "cityscapes_panoptic",
    "mapillary_vistas",
    "folder_records",
    "folder_metadata",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DOCS = "see docs/datasets.md"


def _need_dir(path: str | Path, hint: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(path, f"directory not found ({hint}; {DOCS})")
    return path


def _split_dir(split: str, names: dict[str, str], dataset: str) -> str:
    if split not in names:
        raise DatasetError(None, f"dataset {dataset!r} has no split {split!r}; choose from {sorted(names)}")
    return names[split]


def load_sem_seg_pairs(
    image_dir: str | Path,
    label_dir: str | Path,
    *,
    image_exts: tuple[str, ...] = (".jpg",),
    image_suffix: str = "",
    label_suffix: str = ".png",
    recursive: bool = False,
    hint: str = "",
) -> list[dict]:
    """Pair every image in ``image_dir`` with ``label_dir/<same relative path minus image_suffix><label_suffix>``.

    ``image_suffix`` is the part of the image name that the label name replaces (Cityscapes:
    ``_leftImg8bit.png`` -> ``_gtFine_labelTrainIds.png``); by default the extension.
    """
    image_dir = _need_dir(image_dir, hint or "image folder")
    label_dir = _need_dir(label_dir, hint or "label folder")
    pattern = "**/*" if recursive else "*"
    images = sorted(p for p in image_dir.glob(pattern) if p.is_file() and p.suffix.lower() in image_exts)
    if image_suffix:
        images = [p for p in images if p.name.endswith(image_suffix)]
    if not images:
        raise DatasetError(image_dir, f"no images ({'/'.join(image_exts)}{', *' + image_suffix if image_suffix else ''}) found ({DOCS})")
    records = []
    for img in images:
        rel = img.relative_to(image_dir)
        stem = rel.name[: -len(image_suffix)] if image_suffix else rel.stem
        records.append(
            {
                "file_name": str(img),
                "sem_seg_file_name": str(label_dir / rel.parent / (stem + label_suffix)),
                "image_id": stem,
            }
        )
    return records


def load_coco_panoptic_json(
    json_file: str | Path,
    image_dir: str | Path,
    pan_dir: str | Path,
    metadata: DatasetMetadata,
    *,
    image_ext: str = ".jpg",
    sem_seg_dir: str | Path | None = None,
    category_ids_are_contiguous: bool = False,
) -> list[dict]:
    """Records of a COCO-format panoptic annotation (``{"images", "annotations", "categories"}``).

    Category ids are mapped to contiguous ids through ``metadata.dataset_ids`` (or taken as they are
    with ``category_ids_are_contiguous``). Image files come from the JSON's ``images[].file_name``
    when present, else ``<annotation stem><image_ext>``.
    """
    data = read_json(json_file)
    if not isinstance(data, dict) or "annotations" not in data:
        raise DatasetError(json_file, "not a COCO panoptic JSON (no 'annotations' list)")
    to_contiguous = (
        {i: i for i in range(metadata.num_classes)}
        if category_ids_are_contiguous
        else {d: i for i, d in enumerate(metadata.dataset_ids)}
    )
    image_files = {img["id"]: img["file_name"] for img in data.get("images", []) if "file_name" in img}
    records = []
    for ann in data["annotations"]:
        try:
            image_id, pan_name, segs = ann["image_id"], ann["file_name"], ann["segments_info"]
        except KeyError as err:
            raise DatasetError(json_file, f"annotation {ann.get('image_id', '?')!r} lacks key {err}") from None
        segments = []
        for seg in segs:
            cat = seg.get("category_id")
            if cat not in to_contiguous:
                raise DatasetError(
                    json_file,
                    f"image {image_id!r}: segment {seg.get('id')} has category_id {cat!r}, which is not one of the "
                    f"dataset's {metadata.num_classes} categories",
                )
            contiguous = to_contiguous[cat]
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": contiguous,
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "isthing": metadata.is_thing[contiguous],
                    "area": int(seg.get("area", 0)),
                }
            )
        stem = os.path.splitext(pan_name)[0]
        record = {
            "file_name": str(Path(image_dir) / image_files.get(image_id, stem + image_ext)),
            "pan_seg_file_name": str(Path(pan_dir) / pan_name),
            "segments_info": segments,
            "image_id": image_id,
        }
        if sem_seg_dir is not None:
            record["sem_seg_file_name"] = str(Path(sem_seg_dir) / (stem + ".png"))
        records.append(record)
    if not records:
        raise DatasetError(json_file, "the panoptic JSON lists no annotations")
    return records


def load_panoptic(record: dict, metadata: DatasetMetadata) -> tuple[np.ndarray, list[dict]]:
    """Read a record's panoptic PNG: (segment ids int64 ``[H,W]``, segments_info).

    Checks that every listed segment appears in the PNG and that every non-zero id in the PNG is listed.
    """
    path = record["pan_seg_file_name"]
    pan = read_panoptic(path)
    if record.get("pan_seg_format") == "cityscapes_instance_ids":
        return _cityscapes_instance_ids_to_panoptic(pan, metadata)
    segments = record["segments_info"]
    present = set(np.unique(pan).tolist())
    listed = {s["id"] for s in segments}
    missing = sorted(listed - present)
    if missing:
        raise DatasetError(path, f"segments {missing[:10]} listed in the JSON are absent from the PNG")
    unlisted = sorted(present - listed - {0})
    if unlisted:
        raise DatasetError(path, f"the PNG holds segment ids {unlisted[:10]} that the JSON does not list")
    return pan, segments


def _cityscapes_instance_ids_to_panoptic(ids: np.ndarray, metadata: DatasetMetadata) -> tuple[np.ndarray, list[dict]]:
    # gtFine *_instanceIds.png: value = labelId for stuff and for crowd groups of things,
    # labelId * 1000 + k for thing instances. Label ids outside the 19 train classes become void.
    label_to_train = {d: i for i, d in enumerate(metadata.dataset_ids)}
    pan = np.zeros_like(ids)
    segments = []
    for value in np.unique(ids).tolist():
        label_id = value // 1000 if value >= 1000 else value
        if label_id not in label_to_train:
            continue
        train_id = label_to_train[label_id]
        is_thing = metadata.is_thing[train_id]
        pan[ids == value] = value
        segments.append(
            {"id": int(value), "category_id": train_id, "iscrowd": int(is_thing and value < 1000), "isthing": is_thing}
        )
    return pan, segments


# ------------------------------------------------------------------------------------------------
# Builtin datasets
# ------------------------------------------------------------------------------------------------

_ADE_SPLITS = {"train": "training", "val": "validation"}


def ade20k_semantic(root: str, split: str) -> list[dict]:
    """ADEChallengeData2016: ``annotations_detectron2/`` (prepared, 0-based, 255 ignore) if present,
    else the raw 1-based ``annotations/`` read with label 0 -> ignore and k -> k-1."""
    sub = _split_dir(split, _ADE_SPLITS, "ade20k_sem_seg")
    prepared = Path(root) / "annotations_detectron2" / sub
    if prepared.is_dir():
        return load_sem_seg_pairs(Path(root) / "images" / sub, prepared, hint="ADEChallengeData2016")
    records = load_sem_seg_pairs(Path(root) / "images" / sub, Path(root) / "annotations" / sub, hint="ADEChallengeData2016")
    for r in records:
        r["reduce_zero_label"] = True
    return records


def ade20k_full(root: str, split: str) -> list[dict]:
    """ADE20K_2021_17_01 after ``tools/datasets/prepare_ade20k_full.py``: uint16 TIFF train ids, 65535 ignore."""
    sub = _split_dir(split, _ADE_SPLITS, "ade20k_full_sem_seg")
    return load_sem_seg_pairs(
        Path(root) / "images_detectron2" / sub,
        Path(root) / "annotations_detectron2" / sub,
        label_suffix=".tif",
        hint="run tools/datasets/prepare_ade20k_full.py first",
    )


def ade20k_panoptic(root: str, split: str, metadata: DatasetMetadata) -> list[dict]:
    """ADE20K panoptic after ``tools/datasets/prepare_ade20k_panoptic.py`` (COCO format, category id = class index)."""
    sub = _split_dir(split, _ADE_SPLITS, "ade20k_panoptic")
    root = Path(root)
    json_file = root / f"ade20k_panoptic_{split}.json"
    if not json_file.is_file():
        raise DatasetError(json_file, f"not found: run tools/datasets/prepare_ade20k_panoptic.py ({DOCS})")
    sem_dir = root / "annotations_detectron2" / sub
    return load_coco_panoptic_json(
        json_file,
        _need_dir(root / "images" / sub, "ADEChallengeData2016 images"),
        _need_dir(root / f"ade20k_panoptic_{split}", "run tools/datasets/prepare_ade20k_panoptic.py"),
        metadata,
        sem_seg_dir=sem_dir if sem_dir.is_dir() else None,
    )


def coco_panoptic(root: str, split: str, metadata: DatasetMetadata) -> list[dict]:
    """COCO panoptic 2017: ``annotations/panoptic_{split}2017.json`` + ``panoptic_{split}2017/*.png``."""
    _split_dir(split, {"train": "train", "val": "val"}, "coco_panoptic")
    root = Path(root)
    sem_dir = root / f"panoptic_semseg_{split}2017"
    return load_coco_panoptic_json(
        root / "annotations" / f"panoptic_{split}2017.json",
        _need_dir(root / f"{split}2017", "COCO images"),
        _need_dir(root / f"panoptic_{split}2017", "unzip panoptic_annotations_trainval2017 (the PNG zip inside too)"),
        metadata,
        sem_seg_dir=sem_dir if sem_dir.is_dir() else None,
    )


def coco_stuff_10k(root: str, split: str) -> list[dict]:
    """COCO-Stuff-10K v1.0 after ``tools/datasets/prepare_coco_stuff_10k.py`` (splits train/test; val = test)."""
    sub = _split_dir(split, {"train": "train", "test": "test", "val": "test"}, "coco_stuff_10k_sem_seg")
    return load_sem_seg_pairs(
        Path(root) / "images_detectron2" / sub,
        Path(root) / "annotations_detectron2" / sub,
        hint="run tools/datasets/prepare_coco_stuff_10k.py first",
    )


def cityscapes_semantic(root: str, split: str) -> list[dict]:
    """Cityscapes fine: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelTrainIds.png``."""
    _split_dir(split, {"train": "train", "val": "val", "test": "test"}, "cityscapes_sem_seg")
    return load_sem_seg_pairs(
        Path(root) / "leftImg8bit" / split,
        Path(root) / "gtFine" / split,
        image_exts=(".png",),
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
        recursive=True,
        hint="labelTrainIds come from tools/datasets/prepare_cityscapes.py",
    )


def cityscapes_panoptic(root: str, split: str, metadata: DatasetMetadata) -> list[dict]:
    """Cityscapes panoptic: cityscapesscripts' ``gtFine/cityscapes_panoptic_{split}.json`` if present,
    else straight from ``gtFine/{split}/{city}/*_gtFine_instanceIds.png``."""
    _split_dir(split, {"train": "train", "val": "val"}, "cityscapes_panoptic")
    root = Path(root)
    json_file = root / "gtFine" / f"cityscapes_panoptic_{split}.json"
    if json_file.is_file():
        records = load_coco_panoptic_json(
            json_file, root / "leftImg8bit" / split, root / "gtFine" / f"cityscapes_panoptic_{split}", metadata
        )
        for r in records:  # the JSON's image ids are "<city>_<seq>_<frame>"; images live in per-city folders
            city = str(r["image_id"]).split("_")[0]
            r["file_name"] = str(root / "leftImg8bit" / split / city / f"{r['image_id']}_leftImg8bit.png")
        return records
    records = load_sem_seg_pairs(
        root / "leftImg8bit" / split,
        root / "gtFine" / split,
        image_exts=(".png",),
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_instanceIds.png",
        recursive=True,
        hint="Cityscapes gtFine",
    )
    return [
        {
            "file_name": r["file_name"],
            "pan_seg_file_name": r["sem_seg_file_name"],
            "pan_seg_format": "cityscapes_instance_ids",
            "segments_info": None,
            "image_id": r["image_id"],
        }
        for r in records
    ]


def mapillary_vistas(root: str, split: str) -> list[dict]:
    """Mapillary Vistas v1.2: ``{training,validation}/{images/*.jpg, labels/*.png}`` (labels as released)."""
    sub = _split_dir(split, _ADE_SPLITS, "mapillary_vistas_sem_seg")
    return load_sem_seg_pairs(Path(root) / sub / "images", Path(root) / sub / "labels", hint="Mapillary Vistas v1.2")


# ------------------------------------------------------------------------------------------------
# Folder dataset (user data)
# ------------------------------------------------------------------------------------------------


def _folder_panoptic_json(root: Path, split: str, panoptic_dir: str) -> Path:
    return root / panoptic_dir / f"{split}.json"


def folder_metadata(
    root: str | None,
    split: str,
    *,
    classes: list[str] | None = None,
    things: list[str] | None = None,
    ignore_label: int = 255,
    reduce_zero_label: bool = False,
    image_dir: str = "images",
    mask_dir: str = "masks",
    panoptic_dir: str = "panoptic",
    name: str = "folder",
) -> DatasetMetadata:
    """Classes from ``options.classes``, else ``ROOT/classes.txt`` (one per line), else the panoptic JSON's categories."""
    if root is None:
        raise DatasetError(None, f"dataset {name!r} needs a root: set data.train.root / data.test.root ({DOCS})")
    root_path = Path(root)
    pan_json = _folder_panoptic_json(root_path, split, panoptic_dir)
    categories = read_json(pan_json).get("categories") if pan_json.is_file() else None
    if classes is None:
        classes_file = root_path / "classes.txt"
        if classes_file.is_file():
            classes = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif categories:
            classes = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
        else:
            raise DatasetError(classes_file, f"no class list: write one class name per line, or set options.classes ({DOCS})")
    is_thing = [False] * len(classes)
    if things is not None:
        unknown = [t for t in things if t not in classes]
        if unknown:
            raise DatasetError(None, f"dataset {name!r}: options.things {unknown} are not in the class list {classes}")
        is_thing = [c in things for c in classes]
    elif categories:
        flags = {int(c["id"]): bool(c.get("isthing", 0)) for c in categories}
        is_thing = [flags.get(i, False) for i in range(len(classes))]
    evaluator = "sem_seg+panoptic" if pan_json.is_file() else "sem_seg"
    return DatasetMetadata(name=name, class_names=list(classes), is_thing=is_thing, ignore_label=ignore_label, evaluator=evaluator)


def folder_records(
    root: str | None,
    split: str,
    *,
    classes: list[str] | None = None,
    things: list[str] | None = None,
    ignore_label: int = 255,
    reduce_zero_label: bool = False,
    image_dir: str = "images",
    mask_dir: str = "masks",
    panoptic_dir: str = "panoptic",
    name: str = "folder",
) -> list[dict]:
    """``ROOT/images/<split>/*.{jpg,jpeg,png}`` + ``ROOT/masks/<split>/<stem>.png`` (class ids); optionally
    ``ROOT/panoptic/<split>.json`` + ``ROOT/panoptic/<split>/<stem>.png`` (COCO panoptic format whose
    ``category_id`` is the 0-based class index)."""
    metadata = folder_metadata(
        root, split, classes=classes, things=things, ignore_label=ignore_label, panoptic_dir=panoptic_dir, name=name
    )
    root_path = Path(root)
    pan_json = _folder_panoptic_json(root_path, split, panoptic_dir)
    masks = root_path / mask_dir / split
    if pan_json.is_file():
        records = load_coco_panoptic_json(
            pan_json,
            _need_dir(root_path / image_dir / split, "folder dataset images"),
            _need_dir(root_path / panoptic_dir / split, "folder dataset panoptic PNGs"),
            metadata,
            image_ext=".png",
            sem_seg_dir=masks if masks.is_dir() else None,
            category_ids_are_contiguous=True,
        )
        for r in records:  # images may be .jpg/.jpeg/.png: find the one that exists
            if not os.path.exists(r["file_name"]):
                stem = os.path.splitext(r["file_name"])[0]
                for ext in IMAGE_EXTENSIONS:
                    if os.path.exists(stem + ext):
                        r["file_name"] = stem + ext
                        break
    else:
        records = load_sem_seg_pairs(root_path / image_dir / split, masks, image_exts=IMAGE_EXTENSIONS, hint="folder dataset")
    if reduce_zero_label:
        for r in records:
            r["reduce_zero_label"] = True
    return records
