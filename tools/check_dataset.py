#!/usr/bin/env python3
"""Scan a dataset the way training would read it and report what is in it and what is wrong.

    python tools/check_dataset.py CONFIG [--split train|test] [section.key=value ...]

Reads every sample of ``data.train`` (or ``data.test``) with the same readers and checks as the
loaders (files exist and decode, image/label sizes match, label values in [0, K) or ignore, panoptic
JSON and PNG agree), then prints per-class pixel and image counts, the image size range and every
bad sample. Exits 1 if any sample is bad or the model's num_classes disagrees with the dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import ConfigError, load_config  # noqa: E402
from maskformer.data.catalog import load_metadata, load_records  # noqa: E402
from maskformer.data.dataset import read_sample  # noqa: E402
from maskformer.data.io import DatasetError  # noqa: E402


def scan(records: list[dict], metadata, progress: bool = True) -> dict:
    """Read every record; return counts and the list of (file, problem) for bad ones."""
    k = metadata.num_classes
    pixels = np.zeros(k, dtype=np.int64)
    images = np.zeros(k, dtype=np.int64)
    segments = np.zeros(k, dtype=np.int64)
    ignored = 0
    sizes: list[tuple[int, int]] = []
    bad: list[tuple[str, str]] = []
    for record in tqdm(records, desc="checking", unit="img", disable=not progress):
        try:
            data = read_sample(record, metadata)
        except DatasetError as err:
            bad.append((err.path or record.get("file_name", "?"), err.problem))
            continue
        sem = data["sem_seg"]
        sizes.append(sem.shape)
        valid = sem != metadata.ignore_label
        counts = np.bincount(sem[valid].ravel(), minlength=k)[:k]
        pixels += counts
        images += counts > 0
        ignored += int((~valid).sum())
        for s in data.get("segments_info", []):
            segments[s["category_id"]] += 1
    return {"pixels": pixels, "images": images, "segments": segments, "ignored": ignored, "sizes": sizes, "bad": bad}


def report(result: dict, metadata, has_segments: bool) -> list[str]:
    lines = []
    total = int(result["pixels"].sum()) + result["ignored"]
    header = f"{'id':>4}  {'class':<32} {'pixels %':>9} {'images':>7}" + (f" {'segments':>9}" if has_segments else "")
    lines.append(header)
    for i, name in enumerate(metadata.class_names):
        share = 100.0 * result["pixels"][i] / max(total, 1)
        row = f"{i:>4}  {name[:32]:<32} {share:>9.3f} {int(result['images'][i]):>7}"
        if has_segments:
            row += f" {int(result['segments'][i]):>9}"
        lines.append(row)
    lines.append(f"ignore ({metadata.ignore_label}): {100.0 * result['ignored'] / max(total, 1):.3f} % of pixels")
    if result["sizes"]:
        hs = [s[0] for s in result["sizes"]]
        ws = [s[1] for s in result["sizes"]]
        lines.append(f"image size (HxW): min {min(hs)}x{min(ws)}, max {max(hs)}x{max(ws)}")
    absent = [metadata.class_names[i] for i in range(metadata.num_classes) if result["images"][i] == 0]
    if absent:
        lines.append(f"classes never seen ({len(absent)}): {', '.join(absent[:20])}{' ...' if len(absent) > 20 else ''}")
    seen = np.nonzero(result["images"])[0]
    if len(seen) == 1 and seen[0] == 0 and result["ignored"] > 0:
        lines.append(
            "hint: only class 0 and the ignore label occur; a binary mask saved as 0/255 needs 255 mapped to "
            "class 1 (255 is the ignore label by default)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="check data.train or data.test")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        ds = cfg.data.train if args.split == "train" else cfg.data.test
        metadata = load_metadata(ds.name, ds.root, ds.split, ds.options)
        records = load_records(ds.name, ds.root, ds.split, ds.options)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"dataset {ds.name!r} split {ds.split!r}: {len(records)} samples, {metadata.num_classes} classes")
    result = scan(records, metadata, progress=not args.no_progress)
    has_segments = any("pan_seg_file_name" in r for r in records[:1])
    print("\n".join(report(result, metadata, has_segments)))
    failed = False
    if cfg.model.num_classes != metadata.num_classes:
        print(f"error: model.num_classes is {cfg.model.num_classes} but the dataset has {metadata.num_classes} classes")
        failed = True
    if result["bad"]:
        print(f"{len(result['bad'])} bad sample(s):")
        for path, problem in result["bad"]:
            print(f"  {path}: {problem}")
        failed = True
    else:
        print("no bad samples")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
