"""One-off conversions of raw dataset downloads into the layouts the readers expect.

The command-line wrappers live in ``tools/datasets/prepare_*.py``. Every function is idempotent: an
output file that already exists is left alone (``overwrite=True`` rewrites it), and each returns the
list of files it wrote so the scripts can print what they did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from maskformer.data.io import DatasetError, id2rgb, read_image, read_json, read_label, read_panoptic
from maskformer.data.metadata import load_packaged_metadata

__all__ = [
    "prepare_ade20k_sem_seg",
    "prepare_ade20k_full",
    "prepare_coco_stuff_10k",
    "prepare_coco_panoptic_semseg",
    "prepare_ade20k_panoptic",
    "prepare_cityscapes_train_ids",
    "prepare_cityscapes",
    "summarize",
    "run_cli",
]


def _each(items: Iterable, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(list(items), desc=desc, unit="file")


def _write(path: Path, overwrite: bool, save: Callable[[Path], None], written: list[Path]) -> None:
    if path.exists() and not overwrite:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    save(tmp)
    tmp.replace(path)  # a crash never leaves a half-written file that a rerun would skip
    written.append(path)


def prepare_ade20k_sem_seg(root: str | Path, *, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """ADEChallengeData2016 ``annotations/`` (0 = other, 1..150) -> ``annotations_detectron2/`` (0..149, 255 ignore)."""
    root = Path(root)
    written: list[Path] = []
    for split in ("training", "validation"):
        src_dir = root / "annotations" / split
        if not src_dir.is_dir():
            raise DatasetError(src_dir, "directory not found (unzip ADEChallengeData2016.zip here)")
        for src in _each(sorted(src_dir.glob("*.png")), progress, split):
            out = root / "annotations_detectron2" / split / src.name
            if out.exists() and not overwrite:
                continue
            shifted = ((read_label(src) - 1) % 256).astype(np.uint8)  # 0 (other) -> 255
            _write(out, True, lambda p, a=shifted: Image.fromarray(a).save(p, format="PNG"), written)
    return written


def _ade_full_class_map() -> dict[int, int]:
    meta = load_packaged_metadata("ade20k_full_847.json", name="ade20k_full_sem_seg", evaluator="sem_seg")
    return {d: i for i, d in enumerate(meta.dataset_ids)}


def prepare_ade20k_full(root: str | Path, *, max_short_side: int = 512, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """ADE20K_2021_17_01 ``images/ADE/**/ADE_{train,val}_*.jpg`` + ``*_seg.png`` -> ``images_detectron2/`` JPEGs and
    ``annotations_detectron2/`` uint16 TIFF train ids (65535 ignore), short side <= 512 as the original."""
    root = Path(root)
    id_map = _ade_full_class_map()
    lut = np.full(max(id_map) + 1, 65535, dtype=np.uint16)
    for ade_id, train_id in id_map.items():
        lut[ade_id] = train_id
    images = sorted(p for p in (root / "images").rglob("ADE_*.jpg")) if (root / "images").is_dir() else []
    if not images:
        raise DatasetError(root / "images", "no ADE_*.jpg images found (unzip ADE20K_2021_17_01.zip here)")
    written: list[Path] = []
    for img_path in _each(images, progress, "ade20k-full"):
        split = "validation" if img_path.name.split("_")[1] == "val" else "training"
        out_img = root / "images_detectron2" / split / img_path.name
        out_lab = root / "annotations_detectron2" / split / (img_path.stem + ".tif")
        if out_img.exists() and out_lab.exists() and not overwrite:
            continue
        seg = np.asarray(Image.open(img_path.with_name(img_path.stem + "_seg.png")).convert("RGB")).astype(np.int64)
        ade_ids = (seg[..., 0] // 10) * 256 + seg[..., 1]  # the ADE20K full-index class encoding
        label = np.where(ade_ids < len(lut), lut[np.clip(ade_ids, 0, len(lut) - 1)], 65535).astype(np.uint16)
        image = Image.fromarray(read_image(img_path))
        lab_img = Image.fromarray(label)
        w, h = image.size
        if min(h, w) > max_short_side:
            scale = max_short_side / min(h, w)
            size = (max_short_side, round(h * scale)) if w <= h else (round(w * scale), max_short_side)
            image = image.resize(size, Image.BILINEAR)
            lab_img = lab_img.resize(size, Image.NEAREST)
        _write(out_img, True, lambda p, im=image: im.save(p, format="JPEG", quality=95), written)
        _write(out_lab, True, lambda p, im=lab_img: im.save(p, format="TIFF"), written)
    return written


def _load_mat_labels(path: Path) -> np.ndarray:
    """``S`` from a COCO-Stuff-10K ``.mat`` file: MATLAB v5 via scipy, v7.3 (HDF5) via h5py if installed."""
    try:
        from scipy.io import loadmat

        return np.asarray(loadmat(str(path))["S"])
    except NotImplementedError:  # v7.3 files are HDF5
        try:
            import h5py
        except ImportError:
            raise DatasetError(path, "MATLAB v7.3 file: `pip install h5py` to read it") from None
        with h5py.File(path, "r") as f:
            return np.asarray(f["S"]).T  # HDF5 stores MATLAB arrays column-major
    except (KeyError, ValueError, OSError) as err:
        raise DatasetError(path, f"cannot read label matrix 'S': {err}") from None


def prepare_coco_stuff_10k(root: str | Path, *, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """``coco_stuff_10k/{imageLists,images,annotations}`` (v1.0, .mat) -> ``images_detectron2/{train,test}`` and
    ``annotations_detectron2/{train,test}`` PNGs with ``S - 2`` (1 = unlabeled becomes 255), as the original."""
    root = Path(root)
    written: list[Path] = []
    for split in ("train", "test"):
        list_file = root / "imageLists" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetError(list_file, "image list not found (unzip cocostuff-10k-v1.0.zip here)")
        names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
        for name in _each(names, progress, split):
            src_img = root / "images" / f"{name}.jpg"
            out_img = root / "images_detectron2" / split / f"{name}.jpg"
            out_lab = root / "annotations_detectron2" / split / f"{name}.png"
            if out_img.exists() and out_lab.exists() and not overwrite:
                continue
            if not src_img.is_file():
                raise DatasetError(src_img, "image listed in imageLists not found")
            labels = ((_load_mat_labels(root / "annotations" / f"{name}.mat").astype(np.int64) - 2) % 256).astype(np.uint8)
            h, w = read_image(src_img).shape[:2]
            if labels.shape != (h, w):
                raise DatasetError(root / "annotations" / f"{name}.mat", f"labels are {labels.shape} but the image is {(h, w)}")
            _write(out_img, True, lambda p, s=src_img: p.write_bytes(s.read_bytes()), written)
            _write(out_lab, True, lambda p, a=labels: Image.fromarray(a).save(p, format="PNG"), written)
    return written


def prepare_coco_panoptic_semseg(root: str | Path, *, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """COCO panoptic -> ``panoptic_semseg_{train,val}2017/*.png``: contiguous class ids 0..132 (crowd included,
    as the semantic ground truth of Mask2Former's preparation), 255 void."""
    root = Path(root)
    meta = load_packaged_metadata("coco_panoptic_133.json", name="coco_panoptic", evaluator="panoptic")
    to_contiguous = {d: i for i, d in enumerate(meta.dataset_ids)}
    written: list[Path] = []
    for split in ("train", "val"):
        json_file = root / "annotations" / f"panoptic_{split}2017.json"
        if not json_file.is_file():
            continue
        for ann in _each(read_json(json_file)["annotations"], progress, split):
            out = root / f"panoptic_semseg_{split}2017" / ann["file_name"]
            if out.exists() and not overwrite:
                continue
            pan = read_panoptic(root / f"panoptic_{split}2017" / ann["file_name"])
            sem = np.full(pan.shape, 255, dtype=np.uint8)
            for seg in ann["segments_info"]:
                sem[pan == seg["id"]] = to_contiguous[seg["category_id"]]
            _write(out, True, lambda p, a=sem: Image.fromarray(a).save(p, format="PNG"), written)
    if not written and not any((root / "annotations" / f"panoptic_{s}2017.json").is_file() for s in ("train", "val")):
        raise DatasetError(root / "annotations", "no panoptic_{train,val}2017.json found")
    return written


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def prepare_ade20k_panoptic(root: str | Path, catid_mapping: str | Path, *, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """ADE20K panoptic from ``annotations/`` (stuff) + ``annotations_instance/`` (things: R = instance class + 1,
    G = instance id) -> ``ade20k_panoptic_{train,val}.json`` + ``ade20k_panoptic_{train,val}/*.png``.

    ``catid_mapping`` is the challenge's ``ade20k_instance_catid_mapping.txt`` (header line, then
    ``instance_id semantic_id name``, both 1-based). Category id = 0-based class index, as the original.
    """
    root = Path(root)
    meta = load_packaged_metadata("ade20k_150.json", name="ade20k_panoptic", evaluator="sem_seg+panoptic")
    lines = Path(catid_mapping).read_text().splitlines()[1:]
    instance_to_class = {int(a) - 1: int(b) - 1 for a, b, *_ in (line.split() for line in lines if line.strip())}
    categories = [
        {"id": i, "name": n, "isthing": int(t), "color": list(c)}
        for i, (n, t, c) in enumerate(zip(meta.class_names, meta.is_thing, meta.colors))
    ]
    written: list[Path] = []
    for split, sub in (("train", "training"), ("val", "validation")):
        out_json = root / f"ade20k_panoptic_{split}.json"
        if out_json.exists() and not overwrite:
            continue
        images, annotations = [], []
        for img_path in _each(sorted((root / "images" / sub).glob("*.jpg")), progress, split):
            stem = img_path.stem
            sem = read_label(root / "annotations" / sub / f"{stem}.png") - 1  # -1 = unlabeled
            inst = np.asarray(Image.open(root / "annotations_instance" / sub / f"{stem}.png").convert("RGB")).astype(np.int64)
            pan = np.zeros(sem.shape, dtype=np.int64)
            segments = []
            # Stuff first, then things on top (the two annotations overlap a little).
            for cls in np.unique(sem):
                if cls < 0 or meta.is_thing[cls]:
                    continue
                mask = sem == cls
                segments.append({"id": len(segments) + 1, "category_id": int(cls), "iscrowd": 0, "area": int(mask.sum()), "bbox": _bbox(mask)})
                pan[mask] = segments[-1]["id"]
            for inst_id in np.unique(inst[..., 1]):
                if inst_id == 0:
                    continue
                mask = inst[..., 1] == inst_id
                inst_cls = np.unique(inst[..., 0][mask] - 1)
                if len(inst_cls) != 1 or int(inst_cls[0]) not in instance_to_class:
                    raise DatasetError(root / "annotations_instance" / sub / f"{stem}.png", f"instance {inst_id} has classes {inst_cls.tolist()}")
                segments.append(
                    {"id": len(segments) + 1, "category_id": instance_to_class[int(inst_cls[0])], "iscrowd": 0, "area": int(mask.sum()), "bbox": _bbox(mask)}
                )
                pan[mask] = segments[-1]["id"]
            for s in segments:  # recompute areas after things covered stuff
                s["area"] = int((pan == s["id"]).sum())
            segments = [s for s in segments if s["area"] > 0]
            _write(root / f"ade20k_panoptic_{split}" / f"{stem}.png", overwrite, lambda p, a=id2rgb(pan): Image.fromarray(a).save(p, format="PNG"), written)
            images.append({"id": stem, "file_name": img_path.name, "height": int(pan.shape[0]), "width": int(pan.shape[1])})
            annotations.append({"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments})
        data = {"images": images, "annotations": annotations, "categories": categories}
        _write(out_json, True, lambda p, d=data: p.write_text(json.dumps(d)), written)
    return written


def prepare_cityscapes_train_ids(root: str | Path, *, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """``gtFine/*/*/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 classes, 255 ignore), the same
    mapping as cityscapesscripts' ``createTrainIdLabelImgs``."""
    root = Path(root)
    meta = load_packaged_metadata("cityscapes_19.json", name="cityscapes_sem_seg", evaluator="sem_seg")
    lut = np.full(256, 255, dtype=np.uint8)
    for train_id, label_id in enumerate(meta.dataset_ids):
        lut[label_id] = train_id
    sources = sorted((root / "gtFine").rglob("*_gtFine_labelIds.png")) if (root / "gtFine").is_dir() else []
    if not sources:
        raise DatasetError(root / "gtFine", "no *_gtFine_labelIds.png found (unzip gtFine_trainvaltest.zip here)")
    written: list[Path] = []
    for src in _each(sources, progress, "cityscapes"):
        out = src.with_name(src.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))
        if out.exists() and not overwrite:
            continue
        train_ids = lut[np.clip(read_label(src), 0, 255)]
        _write(out, True, lambda p, a=train_ids: Image.fromarray(a).save(p, format="PNG"), written)
    return written


def summarize(written: list[Path]) -> list[str]:
    """``wrote N files in DIR`` lines, one per output folder (what the scripts print)."""
    if not written:
        return ["nothing to do: every output already exists (use --overwrite to rewrite)"]
    counts: dict[Path, int] = {}
    for path in written:
        counts[path.parent] = counts.get(path.parent, 0) + 1
    return [f"wrote {n} file{'s' * (n != 1)} in {folder}" for folder, n in sorted(counts.items())]


def run_cli(argv, *, description: str, default_dir: str, fn: Callable[..., list[Path]], extra_args=()) -> int:
    """The shared command line of ``tools/datasets/prepare_*.py``: ``--root``, ``--overwrite``, ``--no-progress``."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(description=description)
    default_root = os.path.join(os.environ.get("MASKFORMER_DATASETS", "datasets"), default_dir)
    parser.add_argument("--root", default=default_root, help=f"dataset folder (default: {default_root})")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for flags, kwargs in extra_args:
        parser.add_argument(*flags, **kwargs)
    args = vars(parser.parse_args(argv))
    root = args.pop("root")
    progress = not args.pop("no_progress")
    try:
        written = fn(root, progress=progress, **args)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n".join(summarize(written)))
    return 0


def prepare_cityscapes(root: str | Path, *, panoptic: bool = False, overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Train-id labels (:func:`prepare_cityscapes_train_ids`); with ``panoptic`` also cityscapesscripts'
    ``createPanopticImgs`` (labelId category ids) into ``gtFine/cityscapes_panoptic_{split}{.json,/}``. The
    panoptic reader does not need it: without the JSON it reads ``*_gtFine_instanceIds.png`` directly."""
    written = prepare_cityscapes_train_ids(root, overwrite=overwrite, progress=progress)
    if panoptic:
        try:
            from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic
        except ImportError:
            raise DatasetError(None, "--panoptic needs cityscapesscripts: pip install cityscapesscripts") from None
        gt = Path(root) / "gtFine"
        splits = [s for s in ("train", "val") if overwrite or not (gt / f"cityscapes_panoptic_{s}.json").exists()]
        if splits:
            convert2panoptic(cityscapesPath=str(gt), outputFolder=str(gt), useTrainId=False, setNames=splits)
            written += [gt / f"cityscapes_panoptic_{s}.json" for s in splits]
    return written
