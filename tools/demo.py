#!/usr/bin/env python
"""The demo: train MaskFormer from scratch on the synthetic "shapes" dataset, offline, on a CPU.

    python tools/demo.py                      # configs/demo/shapes_tiny.yaml -> outputs/demo
    python tools/demo.py --output-dir DIR solver.max_iter=500     # overrides as in tools/train.py

Writes into the output directory: the training run (``log.txt``, ``metrics.jsonl``,
``checkpoints/``, ``eval/``), ``learning_curve.png`` (validation mIoU and PQ against minutes of
training), ``predictions/*.png`` (panoptic and semantic overlays of validation images next to their
ground truth) and ``summary.json``; it prints where they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from maskformer.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "demo" / "shapes_tiny.yaml"


def plot_learning_curve(metrics_file: Path, out_png: Path) -> list[dict]:
    """Validation mIoU and PQ against minutes of training, from ``metrics.jsonl``; returns the points."""
    rows = [json.loads(line) for line in open(metrics_file)]
    evals = [r for r in rows if r.get("kind") == "eval"]
    points = [{"minutes": r["elapsed"] / 60, "iteration": r["iteration"], "mIoU": r.get("mIoU"), "PQ": r.get("PQ")}
              for r in evals]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no learning_curve.png (pip install matplotlib)")
        return points
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, style in (("mIoU", "o-"), ("PQ", "s-")):
        xs = [p["minutes"] for p in points if p[key] is not None]
        ys = [p[key] for p in points if p[key] is not None]
        if xs:
            ax.plot(xs, ys, style, label=key)
    ax.set_xlabel("training time (minutes, including evaluations)")
    ax.set_ylabel("validation score (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("MaskFormer on shapes (2-core CPU)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return points


def save_overlays(cfg, checkpoint: Path, out_dir: Path, count: int = 6) -> list[Path]:
    """Overlays of ``count`` validation images: input | ground truth | semantic | panoptic prediction."""
    from maskformer.data import build_dataset, get_metadata
    from maskformer.models.build import build_model
    from maskformer.predict import load_image
    from maskformer.visualize import draw_panoptic, draw_semantic, to_pil, visualize_prediction

    model = build_model(cfg, weights=checkpoint)
    dataset = build_dataset(cfg, "test")
    metadata = get_metadata(cfg, "test")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(count, len(dataset))):
        record = dataset.records[i]
        image = load_image(record["file_name"])
        sample = dataset[i]
        prediction = model.predict(image, panoptic=True)
        if "gt_pan_seg" in sample:
            truth = draw_panoptic(image, sample["gt_pan_seg"], sample["segments_info"], metadata.colors)
        else:
            truth = draw_semantic(image, sample["gt_sem_seg"], metadata.colors)
        semantic = visualize_prediction(image, prediction, task="semantic", class_names=metadata.class_names,
                                        colors=metadata.colors, legend=None)
        panoptic = visualize_prediction(image, prediction, task="panoptic", class_names=metadata.class_names,
                                        colors=metadata.colors, legend=None)
        row = torch.cat([image, truth, semantic, panoptic], dim=2)
        path = out_dir / f"val_{i:03d}.png"
        to_pil(row).resize((row.shape[2] * 2, row.shape[1] * 2), resample=0).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from maskformer.engine.trainer import train

    out = Path(args.output_dir)
    start = time.perf_counter()
    result = train(cfg, out)
    minutes = (time.perf_counter() - start) / 60
    points = plot_learning_curve(out / "metrics.jsonl", out / "learning_curve.png")
    overlays = save_overlays(cfg, out / "checkpoints" / "last.pth", out / "predictions")
    final = {k: v for k, v in points[-1].items()} if points else {}
    summary = {"minutes": minutes, "final": final, "curve": points}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"demo finished in {minutes:.1f} min: validation mIoU {final.get('mIoU', float('nan')):.1f}, "
          f"PQ {final.get('PQ', float('nan')):.1f}")
    print(f"  run, logs, checkpoints : {out.resolve()}")
    print(f"  learning curve         : {(out / 'learning_curve.png').resolve()}")
    print(f"  prediction overlays    : {(out / 'predictions').resolve()}  ({len(overlays)} images: "
          "input | ground truth | semantic | panoptic)")
    print(f"  metrics                : {(out / 'summary.json').resolve()}, {(out / 'eval').resolve()}")
    return 0 if result["iteration"] == cfg.solver.max_iter else 1


if __name__ == "__main__":
    sys.exit(main())
