#!/usr/bin/env python
"""Speed and memory of MaskFormer: inference and a full training step, at a given size and backbone.

    python tools/benchmark.py                                  # R50, 512x512, 150 classes, CPU, 2 threads
    python tools/benchmark.py --backbone swin_tiny_patch4_window7_224 --json out.json
    python tools/benchmark.py --device cuda --gpu-suite        # the GPU figures of the README (< 5 min)

A training step is forward + Hungarian matching + the set loss with the auxiliary layers + backward +
AdamW, on random images with ``--num-masks`` random non-overlapping target masks per image. Figures
are medians over ``--runs`` after ``--warmup`` runs. Weights are random (no download).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import config_from_dict  # noqa: E402
from maskformer.engine.evaluate import autocast_context  # noqa: E402
from maskformer.models.build import build_criterion, build_maskformer  # noqa: E402


def paper_config(backbone: str, num_classes: int = 150, num_queries: int = 100, extra: list[str] | None = None):
    """The ADE20K model of the paper with a random-weight backbone."""
    return config_from_dict({}, [f"model.backbone.name={backbone}", "model.backbone.pretrained=false",
                                 f"model.num_classes={num_classes}", f"model.num_queries={num_queries}",
                                 *(extra or [])])


def random_targets(batch: int, num_masks: int, num_classes: int, size: tuple[int, int], device, seed: int = 0):
    """Per image ``num_masks`` non-overlapping masks: a random partition of the image into vertical strips."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    targets = []
    for _ in range(batch):
        cuts = torch.sort(torch.randperm(w - 1, generator=g)[: num_masks - 1] + 1).values.tolist()
        edges = [0, *cuts, w]
        masks = torch.zeros(num_masks, h, w)
        for i in range(num_masks):
            masks[i, :, edges[i]:edges[i + 1]] = 1
        labels = torch.randint(0, num_classes, (num_masks,), generator=g)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, warmup: int, runs: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_inference(model, size, batch, device, amp="off", warmup=2, runs=5, channels_last=False) -> float:
    """Median seconds of one eval-mode forward pass on a random [batch,3,H,W] input."""
    model.eval()
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        with autocast_context(device, amp):
            model(x)

    return _median_time(run, warmup, runs, device)


def measure_train_step(model, criterion, size, batch, num_masks, device, amp="off", warmup=2, runs=3,
                       channels_last=False) -> dict[str, float]:
    """Median seconds of a training step and of the matching inside it (all decoder layers)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = random_targets(batch, num_masks, criterion.num_classes, size, device)
    matcher_time = []
    real_match = criterion.matcher.match

    def timed_match(*args, **kwargs):
        _sync(device)
        t = time.perf_counter()
        out = real_match(*args, **kwargs)
        _sync(device)
        matcher_time.append(time.perf_counter() - t)
        return out

    criterion.matcher.match = timed_match

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            outputs = model(x)
        losses = criterion(outputs, targets)
        criterion.total_loss(losses).backward()
        optimizer.step()

    try:
        step_times, match_times = [], []
        for i in range(warmup + runs):
            matcher_time.clear()
            _sync(device)
            t = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                step_times.append(time.perf_counter() - t)
                match_times.append(sum(matcher_time))
    finally:
        criterion.matcher.match = real_match
    return {"train_step_s": statistics.median(step_times), "matcher_s": statistics.median(match_times)}


def gpu_suite(device: torch.device, out: dict) -> None:
    """Inference fps at batch 1 (fp32 and bf16) and training iterations/s (AMP bf16, batch 8) at 512x512."""
    for backbone in ("resnet50", "swin_tiny_patch4_window7_224"):
        torch.manual_seed(0)
        cfg = paper_config(backbone)
        model = build_maskformer(cfg).to(device)
        criterion = build_criterion(cfg).to(device)
        row = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        for amp in ("off", "bf16"):
            t = measure_inference(model, (512, 512), 1, device, amp=amp, warmup=10, runs=50)
            row[f"fps_bs1_{amp}"] = 1.0 / t
        torch.cuda.reset_peak_memory_stats(device)
        step = measure_train_step(model, criterion, (512, 512), 8, 8, device, amp="bf16", warmup=3, runs=10)
        row["train_it_per_s_bs8_bf16"] = 1.0 / step["train_step_s"]
        row["matcher_share"] = step["matcher_s"] / step["train_step_s"]
        row["train_peak_mem_GB"] = torch.cuda.max_memory_allocated(device) / 2**30
        out[backbone] = row
        print(backbone, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        del model, criterion
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2, help="training batch (inference uses 1)")
    parser.add_argument("--num-masks", type=int, default=8, help="target masks per training image")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gpu-suite", action="store_true", help="R50 and Swin-T GPU figures (needs --device cuda)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "threads": args.threads, "torch": torch.__version__}
    if args.gpu_suite:
        if device.type != "cuda":
            parser.error("--gpu-suite needs --device cuda")
        gpu_suite(device, results)
    else:
        cfg = paper_config(args.backbone, args.num_classes, args.num_queries)
        model = build_maskformer(cfg).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        criterion = build_criterion(cfg).to(device)
        size = tuple(args.size)
        row = {"params": sum(p.numel() for p in model.parameters()),
               "inference_s": measure_inference(model, size, 1, device, args.amp, args.warmup, args.runs,
                                                args.channels_last)}
        row.update(measure_train_step(model, criterion, size, args.batch, args.num_masks, device, args.amp,
                                      args.warmup, max(3, args.runs // 2), args.channels_last))
        results["maskformer"] = row
        for key, value in row.items():
            print(f"{key:>14}: {value:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
