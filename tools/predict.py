#!/usr/bin/env python
"""Segment images with a trained model and write overlays and raw label maps.

    python tools/predict.py --config CONFIG --weights model.pth --input photo.jpg --output out/
    python tools/predict.py --config CONFIG --weights W --input images/ --output out/ --task panoptic
    python tools/predict.py --config CONFIG --weights W --input "data/**/*.png" a.jpg --output out/ --alpha 0.5

``--input`` takes files, folders (their image files, not recursive) and glob patterns (quote them;
``**`` recurses). Per image ``<stem>`` it writes into ``--output``:

- ``<stem>_overlay.png``: the coloured result with a legend of the classes shown;
- ``<stem>_sem.png``: class ids (contiguous, 0..K-1), uint8 (uint16 when K > 255);
- ``--task panoptic``: ``<stem>_pan.png`` (COCO panoptic encoding, id = R + 256 G + 256^2 B, 0 = void)
  and ``<stem>_pan.json`` (COCO-style ``segments_info`` with the dataset's category ids, plus the
  contiguous id, name, score, area and bbox);
- ``--task instance``: ``<stem>_inst.png`` (uint16, 0 = background, i = instance i; overlaps go to the
  higher score) and ``<stem>_inst.json`` (id, category ids, name, score, area, bbox and the full,
  overlapping mask as COCO RLE) for the instances with score >= ``--score-threshold`` that are visible.

Config overrides (``section.key=value``, e.g. ``data.min_size_test=640``) go right after the script
name or after the last option, never straight after ``--input`` (which takes several values).
Inputs that cannot be read are reported (file and reason) and skipped. Exit status: 0 if at least
one image was processed, 1 if none was or no input matched (or the checkpoint does not fit), 2 for
a bad config or command line.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import ConfigError, load_config  # noqa: E402

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth)")
    parser.add_argument("--input", required=True, nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--task", choices=("semantic", "panoptic", "instance"), default="semantic")
    parser.add_argument("--alpha", type=float, default=0.6, help="overlay opacity in [0, 1]")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="instances: minimum score to keep")
    parser.add_argument("--legend", choices=("bottom", "right", "none"), default="bottom")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: train.device of the config)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. data.min_size_test=640 test.object_mask_threshold=0.8")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    return args


def collect_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """(files, problems): files from paths, folders and globs in order, without duplicates."""
    files: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{pattern}: folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.is_file():
            found = [path]
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{pattern}: no file matches")
        else:
            found = []
            problems.append(f"{pattern}: no such file or folder")
        files.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, problems


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def _bbox(mask) -> list[int]:
    """COCO [x, y, w, h] of a bool numpy mask ([0, 0, 0, 0] when empty)."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def write_prediction(pred, rgb, out_dir: Path, stem: str, *, task: str, class_names: list[str], colors,
                     dataset_ids: list[int], alpha: float, score_threshold: float, legend: str | None,
                     source: str) -> None:
    """Write the overlay and the raw files of one image (see the module docstring)."""
    import numpy as np
    from PIL import Image

    from maskformer.data.io import id2rgb
    from maskformer.visualize import paint_instances, to_pil, visualize_prediction

    overlay = visualize_prediction(rgb, pred, task=task, class_names=class_names, colors=colors, alpha=alpha,
                                   score_threshold=score_threshold, legend=legend)
    to_pil(overlay).save(out_dir / f"{stem}_overlay.png")
    sem = pred.sem_seg.cpu().numpy()
    dtype = np.uint8 if len(class_names) <= 255 else np.uint16
    Image.fromarray(sem.astype(dtype)).save(out_dir / f"{stem}_sem.png")
    height, width = sem.shape

    if task == "panoptic":
        pan = pred.panoptic_seg.cpu().numpy().astype(np.int64)
        segments = []
        for s in pred.segments_info:
            mask = pan == int(s["id"])
            c = int(s["category_id"])
            segments.append({"id": int(s["id"]), "category_id": int(dataset_ids[c]), "contiguous_id": c,
                             "name": class_names[c], "isthing": bool(s["isthing"]), "iscrowd": 0,
                             "score": float(s.get("score", 1.0)), "area": int(mask.sum()), "bbox": _bbox(mask)})
        Image.fromarray(id2rgb(pan)).save(out_dir / f"{stem}_pan.png")
        info = {"image": source, "file_name": f"{stem}_pan.png", "height": height, "width": width,
                "segments_info": segments}
        (out_dir / f"{stem}_pan.json").write_text(json.dumps(info, indent=1), encoding="utf-8")

    elif task == "instance":
        from pycocotools import mask as mask_utils

        inst = pred.instances
        keep = (inst["scores"] >= score_threshold).cpu()
        masks = inst["masks"].cpu()[keep].numpy()
        scores = inst["scores"].cpu()[keep].tolist()
        labels = inst["labels"].cpu()[keep].tolist()
        ids = paint_instances(masks, scores).numpy() if len(masks) else np.zeros((height, width), np.int64)
        visible = np.bincount(ids.ravel(), minlength=len(masks) + 1)
        instances = []
        for i in range(len(masks)):
            if visible[i + 1] == 0:  # hidden under higher-scoring instances (or empty)
                continue
            c = int(labels[i])
            rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            instances.append({"id": i + 1, "category_id": int(dataset_ids[c]), "contiguous_id": c,
                              "name": class_names[c], "score": float(scores[i]), "area": int(visible[i + 1]),
                              "bbox": _bbox(masks[i]),
                              "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}})
        kept = {d["id"] for d in instances}
        ids[~np.isin(ids, list(kept))] = 0
        Image.fromarray(ids.astype(np.uint16)).save(out_dir / f"{stem}_inst.png")
        info = {"image": source, "file_name": f"{stem}_inst.png", "height": height, "width": width,
                "instances": instances}
        (out_dir / f"{stem}_inst.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files, problems = collect_inputs(args.input)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not files:
        print(f"error: no input image matched {' '.join(args.input)}", file=sys.stderr)
        return 1
    weights = Path(args.weights)
    if not weights.is_file():
        print(f"error: checkpoint not found: {weights}", file=sys.stderr)
        return 1

    import torch
    from tqdm import tqdm

    from maskformer.checkpoint import CheckpointError
    from maskformer.data.metadata import default_colors
    from maskformer.models.build import build_model
    from maskformer.predict import load_image

    try:
        device = _resolve_device(args.device or cfg.train.device)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    cfg.model.backbone.pretrained = False  # every weight comes from the checkpoint: no download
    try:
        model = build_model(cfg, weights).to(device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    k = model.num_classes
    class_names, colors, dataset_ids = list(model.inference.class_names), default_colors(k), list(range(k))
    try:
        from maskformer.data import get_metadata

        meta = get_metadata(cfg, "test")
        if meta.num_classes == k:
            class_names, colors, dataset_ids = meta.class_names, meta.colors, meta.dataset_ids
    except Exception:  # names/colours are cosmetic: a model predicts without its dataset's metadata
        pass

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    skipped: list[tuple[Path, str]] = []
    done = 0
    legend = None if args.legend == "none" else args.legend
    bar = tqdm(files, desc="predict", unit="img", dynamic_ncols=True)
    for path in bar:
        try:
            rgb = load_image(path)
        except Exception as err:  # unreadable file: report and go on with the others
            reason = f"{type(err).__name__}: {err}"
            skipped.append((path, reason))
            tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
            continue
        with torch.no_grad():
            pred = model.predict(rgb, panoptic=args.task == "panoptic", instance=args.task == "instance")
        write_prediction(pred, rgb, out_dir, _unique_stem(path, used), task=args.task, class_names=class_names,
                         colors=colors, dataset_ids=dataset_ids, alpha=args.alpha,
                         score_threshold=args.score_threshold, legend=legend, source=str(path))
        done += 1
    bar.close()
    print(f"wrote {done} of {len(files)} image(s) to {out_dir}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable input(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0 if done > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
