#!/usr/bin/env python
"""Evaluate a checkpoint on the configured test split.

    python tools/eval.py --config configs/ade20k-150/maskformer_R50_bs16_160k.yaml --weights model.pth
    python tools/eval.py --config CONFIG --weights outputs/run/checkpoints/last.pth --tta
    python tools/eval.py --config CONFIG --weights W --save-panoptic test.panoptic_on=true
    torchrun --nproc_per_node=8 tools/eval.py --config CONFIG --weights W   # each GPU takes a shard

Prints the overall metrics and a per-class table (IoU/Acc, PQ/SQ/RQ, AP for the tasks that are on)
and writes ``results.json`` into ``--output-dir`` (default: ``<run>/eval`` for a checkpoint inside a
training run's ``checkpoints/`` folder, else ``outputs/eval-<config stem>``). NaN (a class absent
from the ground truth and the predictions) is written as null.

``--tta`` turns on the original's multi-scale + flip test-time augmentation (``test.aug.*``),
``--sliding-window`` the sliding-window inference (``test.sliding_window.*``); both are semantic
only (see ``maskformer/engine/tta.py``). ``--save-panoptic`` also writes the panoptic predictions in
COCO format (``panoptic_predictions.json`` + PNG folder, dataset category ids) and turns
``test.panoptic_on`` on.

Exit status: 0 on success, 1 for a missing/unfitting checkpoint or dataset, 2 for a bad config or
command line. Overrides are ``section.key=value`` pairs (YAML values), as for tools/train.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth of this project, or a bare state dict)")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation (test.aug)")
    parser.add_argument("--sliding-window", action="store_true",
                        help="sliding-window semantic inference (test.sliding_window)")
    parser.add_argument("--output-dir", default=None,
                        help="where results.json goes (default: <run>/eval or outputs/eval-<config stem>)")
    parser.add_argument("--save-panoptic", action="store_true",
                        help="also write panoptic predictions in COCO format (PNGs + JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. test.ims_per_batch=4 data.num_workers=2")
    return parser.parse_args(argv)


def default_output_dir(weights: Path, config_path: str | None) -> Path:
    """``<run>/eval`` for ``<run>/checkpoints/x.pth``; otherwise ``outputs/eval-<config stem>``."""
    if weights.resolve().parent.name == "checkpoints":
        return weights.resolve().parent.parent / "eval"
    stem = Path(config_path).stem if config_path else "run"
    return Path("outputs") / f"eval-{stem}"


def checkpoint_config_hint(weights: Path, cfg) -> str:
    """Which ``model.*`` values of the config that trained ``weights`` differ from ``cfg`` (or "")."""
    from maskformer.checkpoint import load_checkpoint
    from maskformer.config import config_to_dict

    try:
        stored = load_checkpoint(weights).get("config")
    except Exception:
        return ""
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        return ""

    def flat(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "kwargs" else {f"{prefix}{k}": v})
        return out

    ours = flat(config_to_dict(cfg)["model"], "model.")
    theirs = flat(stored["model"], "model.")
    diffs = [f"{k}={theirs[k]!r} (this config: {ours[k]!r})" for k in sorted(ours)
             if k in theirs and theirs[k] != ours[k] and k != "model.backbone.pretrained"]
    if not diffs:
        return ""
    return "the checkpoint was trained with " + ", ".join(diffs)


def _finite_or_none(x: Any) -> Any:
    """JSON has no NaN: replace non-finite floats by None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _fmt(value: float | None, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{'-':>{width}s}"
    return f"{value:{width}.2f}"


def format_results(metrics: dict[str, dict[str, float]], class_names: list[str], is_thing: list[bool]) -> str:
    """Overall metrics per task, then one row per class with the per-class metrics of every task that ran."""
    from maskformer.engine.evaluate import headline

    lines = []
    overall = headline(metrics)
    groups = {"sem_seg": ("mIoU", "fwIoU", "mACC", "pACC"),
              "panoptic_seg": ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
              "instances": ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    for task, keys in groups.items():
        if task in metrics:
            shown = "  ".join(f"{k} {_fmt(overall.get(k), 0).strip()}" for k in keys if k in overall)
            lines.append(f"{task:13s} {shown}")
    columns: list[tuple[str, str, str]] = []  # (header, task, key prefix)
    if "sem_seg" in metrics:
        columns += [("IoU", "sem_seg", "IoU-"), ("Acc", "sem_seg", "ACC-")]
    if "panoptic_seg" in metrics:
        columns += [("PQ", "panoptic_seg", "PQ-"), ("SQ", "panoptic_seg", "SQ-"), ("RQ", "panoptic_seg", "RQ-")]
    if "instances" in metrics:
        columns += [("AP", "instances", "AP-")]
    if not columns:
        return "\n".join(lines)
    width = max(12, max(len(n) for n in class_names) + 2)
    header = f"{'class':{width}s} {'':5s}" + "".join(f"{h:>8s}" for h, _, _ in columns)
    lines += ["", header, "-" * len(header)]
    for name, thing in zip(class_names, is_thing):
        kind = "thing" if thing else "stuff"
        cells = "".join(f"{_fmt(metrics[task].get(prefix + name), 8)}" for _, task, prefix in columns)
        lines.append(f"{name:{width}s} {kind:5s}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.tta:
        overrides.append("test.aug.enabled=true")
    if args.sliding_window:
        overrides.append("test.sliding_window.enabled=true")
    if args.save_panoptic:
        overrides.append("test.panoptic_on=true")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    weights = Path(args.weights)
    if not weights.is_file():
        print(f"error: checkpoint not found: {weights}", file=sys.stderr)
        return 1

    import torch

    from maskformer.checkpoint import CheckpointError, load_model_weights
    from maskformer.data import DatasetError, build_test_loader, get_metadata
    from maskformer.distributed import all_gather_objects, get_rank, get_world_size, is_main_process
    from maskformer.engine.evaluate import evaluate, headline
    from maskformer.engine.trainer import setup_distributed
    from maskformer.engine.tta import build_inference
    from maskformer.models.build import build_maskformer

    try:
        inference = build_inference(cfg.test)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        device = setup_distributed(cfg.train.device)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    rank, world_size = get_rank(), get_world_size()

    cfg.model.backbone.pretrained = False  # every weight comes from the checkpoint: no download
    model = build_maskformer(cfg)
    try:
        load_model_weights(model, weights)
    except CheckpointError as err:
        hint = checkpoint_config_hint(weights, cfg)
        print(f"error: {err}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
    model.to(device).eval()

    try:
        metadata = get_metadata(cfg, "test")
        loader = build_test_loader(cfg, rank, world_size)
    except DatasetError as err:
        print(f"error: test dataset {cfg.data.test.name!r} (split {cfg.data.test.split!r}): {err}", file=sys.stderr)
        return 1

    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(weights, cfg.source)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    on_result = None
    if args.save_panoptic:
        from maskformer.evaluation import PanopticPredictionWriter

        writer = PanopticPredictionWriter(out_dir, "panoptic_predictions",
                                          category_map=dict(enumerate(metadata.dataset_ids)))

        def on_result(sample: dict, result: dict) -> None:
            seg, segments = result["panoptic_seg"]
            stem = Path(str(sample.get("file_name", sample.get("image_id")))).stem
            writer.add(sample.get("image_id", stem), seg.cpu(), segments, file_name=f"{stem}.png")

    mode = "tta" if cfg.test.aug.enabled else "sliding_window" if cfg.test.sliding_window.enabled else "default"
    if is_main_process():
        total = len(loader.dataset) if cfg.test.max_images <= 0 else min(len(loader.dataset), cfg.test.max_images)
        print(f"evaluating {weights} on {metadata.name} ({cfg.data.test.split}, {total} images, "
              f"inference: {mode}, {world_size} process(es), device {device})", flush=True)
    start = time.perf_counter()
    try:
        metrics = evaluate(model, loader, metadata, cfg.test, device, amp=cfg.train.amp,
                           channels_last=cfg.train.channels_last, progress=not args.no_progress,
                           inference=inference, on_result=on_result)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    images = sum(all_gather_objects(metrics.pop("time")["images"]))
    predictions_json = writer.write_json() if writer is not None else None

    if is_main_process():
        print(f"\n{images} images in {seconds:.1f}s ({images / max(seconds, 1e-9):.1f} images/s)\n")
        print(format_results(metrics, metadata.class_names, metadata.is_thing))
        results = {
            "config": cfg.source, "weights": str(weights), "dataset": metadata.name, "split": cfg.data.test.split,
            "inference": mode, "images": images, "seconds": seconds, "world_size": world_size,
            "headline": headline(metrics), **metrics,
        }
        if predictions_json is not None:
            results["panoptic_predictions"] = str(predictions_json)
        path = out_dir / "results.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_finite_or_none(results), f, indent=1)
        print(f"\nwrote {path}" + (f" and {predictions_json}" if predictions_json else ""))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
