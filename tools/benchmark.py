#!/usr/bin/env python
"""Speed and memory of this MaskFormer against the Hugging Face port, same configuration, one run.

    python tools/benchmark.py                                   # R50, 512x512, 150 classes, CPU, 2 threads
    python tools/benchmark.py --backbone swin-t --variants fp32,fp32-cl,bf16-cl --repeats 3
    python tools/benchmark.py --variants fp32,fp32-p12544 --tasks train   # point-sampled losses
    python tools/benchmark.py --no-hf --device cuda             # this project only, on a GPU
    python tools/benchmark.py --device cuda --gpu-suite         # the GPU figures of the README (< 5 min)
    python tools/benchmark.py --agreement CONFIG --weights CKPT  # fp32 vs bf16-cl predictions on a test set

For each side (the Hugging Face ``MaskFormerForInstanceSegmentation`` when ``transformers`` is
installed, then each of this project's ``--variants``) and each task it measures, in a fresh
subprocess so that peak RSS (``ru_maxrss``) belongs to that measurement alone:

* ``infer``: eval mode, no_grad, one [1,3,H,W] image: median of ``--runs`` (5) after ``--warmup`` (2);
  plus parameters and FLOPs of that forward (fvcore convention: 1 multiply-add = 1 FLOP).
* ``train``: train mode, a batch of ``--batch`` (2) random images with ``--num-masks`` (8) random
  non-overlapping target masks each; zero_grad + forward + Hungarian matching + the set loss with
  the auxiliary layers + backward + AdamW(lr 1e-4, wd 1e-4): median of ``--train-runs`` (3) after
  ``--warmup`` (2), and the matcher's share of the step. The Hugging Face side runs with its
  auxiliary loss on (``use_auxiliary_loss=True``, ``output_hidden_states=True``; without the latter
  4.57 raises a TypeError) unless ``--no-aux``; it then supervises 7 outputs (the decoder input
  too) where the original and this project supervise 6.

Both sides use random weights, the same seed, images, targets, classes, queries and threads; the
Hugging Face Swin gets ``drop_path_rate=0`` like ours. Differences that stay: HF's ResNet trains
its BatchNorms, ours are frozen (the original's FrozenBN); HF has no attention dropout.

A variant is ``PRECISION[-cl][-pN][-gc][-blas][-nchw]``: ``fp32`` or ``bf16`` (autocast), ``-cl`` channels_last,
``-pN`` point-sampled mask losses on N points (Mask2Former's, ``loss.num_points=N``; train only),
``-gc`` backbone gradient checkpointing (``model.backbone.grad_checkpointing``; train only), ``-blas``
fp32 linear layers on PyTorch's default BLAS path instead of oneDNN (``model.cpu_linear: blas``),
``-nchw`` CPU inputs kept contiguous (``model.cpu_channels_last: false``; ``-cl`` converts the weights too).
``--linear-kernels`` instead times single linear layers of the benchmarked models both ways.
The Hugging Face side always runs fp32, contiguous: the ratios compare against that baseline.

Noise: the sides alternate (the order flips every repeat) and each measurement records the load
average, its own CPU utilisation and how many cores other processes used meanwhile
(``others``, from /proc/stat), and the process CPU time of every run (``cpu_times``; the
summary's ``*_cpu_s``). ``--wait-idle S`` waits up to S seconds before each measurement for other
processes to use less than ``--idle-below`` cores, and a measurement during which they used more
than ``--noisy-above`` cores is taken again (``--retries``, default 2; the least disturbed attempt
counts). Figures are medians over all runs of all repeats; trust them when ``others`` is close to
0 (with 2 threads on 2 busy cores, OpenMP threads wait for each other at every parallel region).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

from analyze_model import count_flops  # noqa: E402

from maskformer.config import config_from_dict  # noqa: E402
from maskformer.engine.evaluate import autocast_context  # noqa: E402
from maskformer.engine.memory import keep_freed_memory  # noqa: E402
from maskformer.models.build import build_criterion, build_maskformer  # noqa: E402

# Our timm/Swin name and the Hugging Face backbone configuration of each supported backbone.
BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "r50": ("resnet50", {"type": "resnet", "depths": [3, 4, 6, 3]}),
    "r101": ("resnet101", {"type": "resnet", "depths": [3, 4, 23, 3]}),
    "swin-t": ("swin_tiny_patch4_window7_224",
               {"type": "swin", "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]}),
    "swin-s": ("swin_small_patch4_window7_224",
               {"type": "swin", "embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]}),
}


# ------------------------------------------------------------------------------------------------
# Models and inputs
# ------------------------------------------------------------------------------------------------

def paper_config(backbone: str, num_classes: int = 150, num_queries: int = 100, extra: list[str] | None = None):
    """The ADE20K model of the paper with a random-weight backbone (``backbone``: a timm/Swin name)."""
    return config_from_dict({}, [f"model.backbone.name={backbone}", "model.backbone.pretrained=false",
                                 f"model.num_classes={num_classes}", f"model.num_queries={num_queries}",
                                 *(extra or [])])


def hf_model(backbone: str, num_classes: int = 150, num_queries: int = 100, aux: bool = True):
    """Hugging Face ``MaskFormerForInstanceSegmentation`` with random weights (``backbone``: a key of BACKBONES)."""
    from transformers import DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, SwinConfig

    spec = dict(BACKBONES[backbone][1])
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if spec.pop("type") == "resnet":
        backbone_config = ResNetConfig(out_features=stages, **spec)
    else:
        backbone_config = SwinConfig(window_size=7, drop_path_rate=0.0, out_features=stages, **spec)
    # The number of queries lives in the decoder's config (MaskFormerConfig ignores a num_queries argument).
    config = MaskFormerConfig(backbone_config=backbone_config, decoder_config=DetrConfig(num_queries=num_queries),
                              num_labels=num_classes, use_auxiliary_loss=aux, output_hidden_states=aux)
    return MaskFormerForInstanceSegmentation(config)


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


def parse_variant(name: str) -> dict[str, Any]:
    """``PRECISION[-cl][-pN][-gc][-blas][-nchw]`` -> {"amp", "channels_last", "num_points",
    "grad_checkpointing", "cpu_linear", "cpu_channels_last"}, e.g. ``bf16-cl``, ``fp32-p12544-gc``, ``fp32-nchw``."""
    parts = name.split("-")
    if parts[0] not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"variant {name!r}: must start with fp32, bf16 or fp16")
    out = {"amp": "off" if parts[0] == "fp32" else parts[0], "channels_last": False, "num_points": 0,
           "grad_checkpointing": False, "cpu_linear": "onednn", "cpu_channels_last": True}
    for part in parts[1:]:
        if part == "cl":
            out["channels_last"] = True
        elif part == "gc":
            out["grad_checkpointing"] = True
        elif part == "blas":
            out["cpu_linear"] = "blas"
        elif part == "nchw":
            out["cpu_channels_last"] = False
        elif part.startswith("p") and part[1:].isdigit():
            out["num_points"] = int(part[1:])
        else:
            raise ValueError(f"variant {name!r}: unknown part {part!r} (expected 'cl', 'pN', 'gc', 'blas' or 'nchw')")
    return out


# ------------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, warmup: int, runs: int, device: torch.device) -> float:
    return statistics.median(_times(fn, warmup, runs, device))


def _times(fn, warmup: int, runs: int, device: torch.device, cpu_times: list | None = None) -> list[float]:
    """Wall seconds of ``runs`` calls after ``warmup``; appends each call's process CPU seconds to ``cpu_times``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c)
    return times


def _busy_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    """Wall time, own CPU time and other processes' CPU use over a block of code."""

    def __enter__(self):
        self.wall, self.cpu, self.busy = time.perf_counter(), time.process_time(), _busy_seconds()
        self.loadavg_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        busy = _busy_seconds()
        threads = torch.get_num_threads()
        self.result = {"loadavg_before": round(self.loadavg_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
                       "cpu_util": round(cpu / (wall * threads), 3),
                       "others_cores": None if busy is None or self.busy is None
                       else round(max(0.0, (busy - self.busy - cpu) / wall), 2)}
        return False


def other_cores_busy(seconds: float = 1.0) -> float | None:
    """Cores used by other processes over the next ``seconds`` (this process sleeps)."""
    before = _busy_seconds()
    time.sleep(seconds)
    after = _busy_seconds()
    return None if before is None or after is None else (after - before) / seconds


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# Measurements (in-process; the CLI runs each in its own subprocess)
# ------------------------------------------------------------------------------------------------

def measure_inference(model, size, batch, device, amp="off", warmup=2, runs=5, channels_last=False) -> float:
    """Median seconds of one eval-mode forward pass of this project's model on a random [batch,3,H,W] input."""
    model.eval()
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        with autocast_context(device, amp):
            model(x)

    return _median_time(run, warmup, runs, device)


class MatcherTimer:
    """Wraps a matcher method and sums the seconds spent in it (synchronising on GPUs)."""

    def __init__(self, owner, method: str, device: torch.device):
        self.owner, self.method, self.device = owner, method, device
        self.seconds = 0.0
        self.original = getattr(owner, method)

        def timed(*args, **kwargs):
            _sync(device)
            t = time.perf_counter()
            out = self.original(*args, **kwargs)
            _sync(device)
            self.seconds += time.perf_counter() - t
            return out

        setattr(owner, method, timed)

    def restore(self) -> None:
        setattr(self.owner, self.method, self.original)


def measure_train_step(model, criterion, size, batch, num_masks, device, amp="off", warmup=2, runs=3,
                       channels_last=False) -> dict[str, Any]:
    """Training step of this project's model: median seconds of the step and of the matching inside it."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(batch, 3, *size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = random_targets(batch, num_masks, criterion.num_classes, size, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            outputs = model(x)
        losses = criterion(outputs, targets)
        criterion.total_loss(losses).backward()
        optimizer.step()

    return _timed_steps(step, MatcherTimer(criterion.matcher, "match_layers", device), warmup, runs, device)


def measure_hf_train_step(model, size, batch, num_masks, device, warmup=2, runs=3) -> dict[str, Any]:
    """The same for the Hugging Face model (its own matcher and loss)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(batch, 3, *size, device=device)
    targets = random_targets(batch, num_masks, model.config.num_labels, size, device)
    masks, labels = [t["masks"] for t in targets], [t["labels"] for t in targets]

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=x, mask_labels=masks, class_labels=labels).loss.backward()
        optimizer.step()

    return _timed_steps(step, MatcherTimer(model.criterion.matcher, "forward", device), warmup, runs, device)


def _timed_steps(step, timer: MatcherTimer, warmup: int, runs: int, device: torch.device) -> dict[str, Any]:
    try:
        step_times, match_times, cpu_times = [], [], []
        for i in range(warmup + runs):
            timer.seconds = 0.0
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            if i >= warmup:
                step_times.append(time.perf_counter() - t)
                cpu_times.append(time.process_time() - c)
                match_times.append(timer.seconds)
    finally:
        timer.restore()
    return {"train_step_s": statistics.median(step_times), "matcher_s": statistics.median(match_times),
            "times": step_times, "matcher_times": match_times, "cpu_times": cpu_times}


@dataclasses.dataclass
class Job:
    """One measurement: which side, which task, on which configuration."""

    side: str  # "hf" or a variant name of this project (``fp32``, ``bf16-cl``, ...)
    task: str  # "infer" or "train"
    backbone: str = "r50"
    size: tuple[int, int] = (512, 512)
    num_classes: int = 150
    num_queries: int = 100
    batch: int = 2
    num_masks: int = 8
    threads: int = 2
    device: str = "cpu"
    aux: bool = True
    warmup: int = 2
    runs: int = 5
    flops: bool = True
    tune_malloc: bool = False


def run_job(job: Job) -> dict[str, Any]:
    """Build the side's model and measure the task in this process. Returns a JSON-able dict."""
    torch.set_num_threads(job.threads)
    if job.tune_malloc:  # the trainer's setting (train.keep_freed_memory), for either side
        keep_freed_memory()
    device = torch.device(job.device)
    size = tuple(job.size)
    torch.manual_seed(0)
    if job.side == "hf":
        model, criterion = hf_model(job.backbone, job.num_classes, job.num_queries,
                                    aux=job.aux and job.task == "train").to(device), None
        variant = parse_variant("fp32")
    else:
        variant = parse_variant(job.side)
        extra = [f"loss.num_points={variant['num_points']}", f"model.deep_supervision={str(job.aux).lower()}",
                 f"model.backbone.grad_checkpointing={str(variant['grad_checkpointing']).lower()}",
                 f"model.cpu_linear={variant['cpu_linear']}",
                 f"model.cpu_channels_last={str(variant['cpu_channels_last']).lower()}"]
        cfg = paper_config(BACKBONES[job.backbone][0] if job.backbone in BACKBONES else job.backbone,
                           job.num_classes, job.num_queries, extra)
        model = build_maskformer(cfg).to(device)
        criterion = build_criterion(cfg).to(device)
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    result: dict[str, Any] = {"side": job.side, "task": job.task,
                              "params": sum(p.numel() for p in model.parameters()),
                              "rss_built_mib": round(_peak_memory_mib(torch.device("cpu")), 1)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(1, 3, *size, device=device)
    if variant["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)

    with LoadMonitor() as monitor:
        if job.task == "infer":
            model.eval()

            @torch.no_grad()
            def forward():
                with autocast_context(device, variant["amp"]):
                    return model(pixel_values=x) if job.side == "hf" else model(x)

            cpu_times: list[float] = []
            times = _times(forward, job.warmup, job.runs, device, cpu_times)
            result.update({"seconds": statistics.median(times), "times": times, "cpu_times": cpu_times})
        elif job.side == "hf":
            step = measure_hf_train_step(model, size, job.batch, job.num_masks, device, job.warmup, job.runs)
            result.update({"seconds": step["train_step_s"], **step})
        else:
            step = measure_train_step(model, criterion, size, job.batch, job.num_masks, device, variant["amp"],
                                      job.warmup, job.runs, variant["channels_last"])
            result.update({"seconds": step["train_step_s"], **step})
    result.update(monitor.result)
    result["peak_mem_mib"] = round(_peak_memory_mib(device), 1)
    if job.task == "infer" and job.flops:
        model.eval().requires_grad_(False)
        call = (lambda: model(pixel_values=x)) if job.side == "hf" else (lambda: model(x))
        result["gflops"] = round(count_flops(call)[0] / 1e9, 3)
    return result


# ------------------------------------------------------------------------------------------------
# The comparison (parent process)
# ------------------------------------------------------------------------------------------------

def _spawn(job: Job, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(job.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(dataclasses.asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {job.side}/{job.task} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _wait_idle(max_seconds: float, below: float) -> float | None:
    """Wait (up to ``max_seconds``) until other processes use fewer than ``below`` cores; returns the last reading."""
    deadline = time.monotonic() + max_seconds
    busy = other_cores_busy(1.0)
    while busy is not None and busy >= below and time.monotonic() < deadline:
        busy = other_cores_busy(2.0)
    return busy


def compare(jobs: list[Job], repeats: int = 1, wait_idle: float = 0.0, idle_below: float = 0.3,
            retries: int = 0, noisy_above: float = 0.25, timeout: float = 1800.0, log=print) -> list[dict[str, Any]]:
    """Run every job ``repeats`` times in subprocesses, alternating the order; returns the worker results.

    A measurement during which other processes used more than ``noisy_above`` cores is repeated
    up to ``retries`` times; the least disturbed attempt is kept (its ``attempts`` field says how many).
    """
    results = []
    for r in range(repeats):
        order = jobs if r % 2 == 0 else _alternate(jobs)
        for job in order:
            attempts = []
            for _ in range(retries + 1):
                busy_before = _wait_idle(wait_idle, idle_below) if wait_idle > 0 else None
                res = _spawn(job, timeout)
                res.update({"repeat": r, "others_before": None if busy_before is None else round(busy_before, 2)})
                attempts.append(res)
                extra = f"  matcher {res['matcher_s']:.3f}s" if "matcher_s" in res else ""
                log(f"[{r + 1}/{repeats}] {job.side:>12} {job.task:<5} median {res['seconds']:.3f}s "
                    f"(runs {' '.join(f'{t:.3f}' for t in res['times'])}; cpu "
                    f"{statistics.median(res['cpu_times']):.3f}s){extra}  peak {res['peak_mem_mib']:.0f} MiB  "
                    f"load {res['loadavg_before']:.2f}  cpu_util {res['cpu_util']:.2f}  others {res['others_cores']}")
                if (res["others_cores"] or 0.0) <= noisy_above:
                    break
                if len(attempts) <= retries:
                    log(f"    other processes used {res['others_cores']} cores: measuring again")
            best = min(attempts, key=lambda a: a["others_cores"] or 0.0)
            best["attempts"] = len(attempts)
            results.append(best)
    return results


def _alternate(jobs: list[Job]) -> list[Job]:
    """Same tasks, sides in reverse order within each task (so neither side always runs first)."""
    tasks = list(dict.fromkeys(j.task for j in jobs))
    return [j for task in tasks for j in reversed([j for j in jobs if j.task == task])]


def summarize(results: list[dict[str, Any]], sides: list[str]) -> dict[str, dict[str, Any]]:
    """Per side: medians over all runs of all repeats, peak memory (median over repeats), params, GFLOPs."""
    summary: dict[str, dict[str, Any]] = {}
    for side in sides:
        row: dict[str, Any] = {}
        for task in ("infer", "train"):
            rs = [r for r in results if r["side"] == side and r["task"] == task]
            if not rs:
                continue
            row[f"{task}_s"] = statistics.median(t for r in rs for t in r["times"])
            row[f"{task}_cpu_s"] = statistics.median(t for r in rs for t in r.get("cpu_times", r["times"]))
            row[f"{task}_peak_mib"] = statistics.median(r["peak_mem_mib"] for r in rs)
            row[f"{task}_others_max"] = max((r["others_cores"] or 0.0) for r in rs)
            row[f"{task}_loadavg"] = statistics.median(r["loadavg_before"] for r in rs)
            if task == "train":
                row["matcher_s"] = statistics.median(t for r in rs for t in r["matcher_times"])
                row["matcher_share"] = row["matcher_s"] / row["train_s"]
            row["params"] = rs[0]["params"]
            if "gflops" in rs[0]:
                row["gflops"] = rs[0]["gflops"]
        summary[side] = row
    if "hf" in summary:
        base = summary["hf"]
        for side, row in summary.items():
            if side == "hf":
                continue
            for key in ("infer_s", "train_s", "infer_cpu_s", "train_cpu_s", "infer_peak_mib", "train_peak_mib"):
                if key in row and key in base:
                    row[f"{key}_vs_hf"] = row[key] / base[key]
    return summary


def format_table(summary: dict[str, dict[str, Any]], title: str) -> str:
    """A Markdown table of the summary (ratios are this project / Hugging Face)."""
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    head = ("| side | params | GFLOPs | infer s | ×HF | train s | ×HF | matcher s (share) | peak MiB infer | "
            "peak MiB train | ×HF | load avg | others (cores) |")
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for side, r in summary.items():
        name = "Hugging Face" if side == "hf" else f"ours {side}"
        matcher = (f"{r['matcher_s']:.3f} ({100 * r['matcher_share']:.1f}%)" if "matcher_s" in r else "")
        others = max(r.get("infer_others_max", 0.0), r.get("train_others_max", 0.0))
        load = max(r.get("infer_loadavg", 0.0), r.get("train_loadavg", 0.0))
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {num(r.get('gflops'), '.1f')} | {num(r.get('infer_s'), '.3f')} | "
            f"{num(r.get('infer_s_vs_hf'), '.2f')} | {num(r.get('train_s'), '.3f')} | "
            f"{num(r.get('train_s_vs_hf'), '.2f')} | {matcher} | {num(r.get('infer_peak_mib'), '.0f')} | "
            f"{num(r.get('train_peak_mib'), '.0f')} | {num(r.get('train_peak_mib_vs_hf'), '.2f')} | {load:.2f} | "
            f"{others:.2f} |")
    return "\n".join(lines)


def environment(threads: int, device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


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


# Linear layers of Swin-T at 512x512 (batch 2: tokens per stage) and of the transformer decoder
# (100 queries x 2 images): (tokens, in, out, what).
LINEAR_SIZES = [
    (32768, 96, 288, "Swin-T stage 1 qkv"), (32768, 96, 384, "Swin-T stage 1 fc1"),
    (32768, 384, 96, "Swin-T stage 1 fc2"), (8192, 192, 576, "Swin-T stage 2 qkv"),
    (2048, 384, 1536, "Swin-T stage 3 fc1"), (2048, 1536, 384, "Swin-T stage 3 fc2"),
    (512, 768, 3072, "Swin-T stage 4 fc1"), (200, 256, 2048, "decoder FFN 1"), (200, 2048, 256, "decoder FFN 2"),
    (200, 256, 151, "class head"),
]


def linear_kernels(log=print, warmup: int = 3, runs: int = 10) -> list[dict[str, Any]]:
    """Median milliseconds of ``F.linear`` and :func:`~maskformer.models.linear.onednn_linear` (fp32, CPU),
    forward and forward + backward, for the layer sizes of :data:`LINEAR_SIZES`."""
    from maskformer.models.linear import onednn_linear

    device = torch.device("cpu")
    rows = []
    log("| layer | tokens x in -> out | forward BLAS ms | oneDNN ms | ratio | fwd+bwd BLAS ms | oneDNN ms | ratio |")
    log("|---|---|---|---|---|---|---|---|")
    for tokens, c_in, c_out, what in LINEAR_SIZES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, c_in, generator=g, requires_grad=True)
        weight = torch.randn(c_out, c_in, generator=g, requires_grad=True)
        bias = torch.randn(c_out, generator=g, requires_grad=True)
        grad = torch.randn(tokens, c_out, generator=g)
        row: dict[str, Any] = {"layer": what, "tokens": tokens, "in": c_in, "out": c_out}
        for name, fn in (("blas", F.linear), ("onednn", onednn_linear)):
            with torch.no_grad():
                row[f"{name}_forward_ms"] = 1e3 * _median_time(lambda: fn(x, weight, bias), warmup, runs, device)
            row[f"{name}_train_ms"] = 1e3 * _median_time(lambda: fn(x, weight, bias).backward(grad), warmup, runs,
                                                         device)
        rows.append(row)
        log(f"| {what} | {tokens} x {c_in} -> {c_out} | {row['blas_forward_ms']:.2f} | {row['onednn_forward_ms']:.2f} "
            f"| {row['onednn_forward_ms'] / row['blas_forward_ms']:.2f} | {row['blas_train_ms']:.2f} "
            f"| {row['onednn_train_ms']:.2f} | {row['onednn_train_ms'] / row['blas_train_ms']:.2f} |")
    return rows


@torch.no_grad()
def precision_agreement(model, loader, metadata, test, device: torch.device, variants: list[str],
                        max_images: int = 0) -> dict[str, dict[str, float]]:
    """How far reduced precision changes a model's semantic predictions, image by image.

    Runs every batch of ``loader`` in fp32 and in each of ``variants`` (``bf16``, ``bf16-cl``, ...;
    no point sampling) and compares the argmax label maps. Returns per variant
    {"pixel_agreement": fraction of pixels with the fp32 label, "pixel_agreement_gt": the same over
    pixels with a ground-truth label, "mIoU", "mIoU_fp32", "seconds_per_image", "seconds_per_image_fp32"}.
    """
    from maskformer.engine.evaluate import default_inference
    from maskformer.evaluation import SemSegEvaluator

    model.eval()
    settings = {v: parse_variant(v) for v in ["fp32", *variants]}
    models = {False: model}
    if any(v["channels_last"] for v in settings.values()):
        models[True] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    evaluators = {v: SemSegEvaluator(metadata.num_classes, metadata.ignore_label, metadata.class_names)
                  for v in settings}
    same = {v: 0 for v in variants}
    same_gt = {v: 0 for v in variants}
    seconds = {v: 0.0 for v in settings}
    pixels = pixels_gt = images = 0
    for batch in loader:
        labels = {}
        for name, v in settings.items():
            _sync(device)
            t = time.perf_counter()
            results = default_inference(models[v["channels_last"]], batch, test, metadata, device, amp=v["amp"],
                                        channels_last=v["channels_last"])
            _sync(device)
            seconds[name] += time.perf_counter() - t
            labels[name] = [r["sem_seg"].max(0).indices.cpu() for r in results]
            for sample, label in zip(batch["samples"], labels[name]):
                evaluators[name].update(label, sample["gt_sem_seg"])
        for i, sample in enumerate(batch["samples"]):
            gt = torch.as_tensor(sample["gt_sem_seg"])
            valid = gt != metadata.ignore_label
            pixels += gt.numel()
            pixels_gt += int(valid.sum())
            for name in variants:
                equal = labels[name][i] == labels["fp32"][i]
                same[name] += int(equal.sum())
                same_gt[name] += int((equal & valid).sum())
        images += len(batch["samples"])
        if 0 < max_images <= images:
            break
    miou = {name: e.compute()["mIoU"] for name, e in evaluators.items()}
    return {name: {"pixel_agreement": same[name] / max(pixels, 1),
                   "pixel_agreement_gt": same_gt[name] / max(pixels_gt, 1),
                   "mIoU": miou[name], "mIoU_fp32": miou["fp32"], "images": images,
                   "seconds_per_image": seconds[name] / max(images, 1),
                   "seconds_per_image_fp32": seconds["fp32"] / max(images, 1)} for name in variants}


def agreement_main(args) -> dict[str, Any]:
    """``--agreement CONFIG --weights CKPT``: fp32 vs reduced-precision predictions on the config's test set."""
    from maskformer.config import load_config
    from maskformer.data import build_test_loader, get_metadata
    from maskformer.models.build import build_model

    cfg = load_config(args.agreement, args.overrides)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = build_model(cfg, weights=args.weights).to(device)
    loader = build_test_loader(cfg)
    variants = [v for v in args.variants.split(",") if v and v != "fp32"]
    result = precision_agreement(model, loader, get_metadata(cfg, "test"), cfg.test, device, variants,
                                 max_images=args.max_images)
    for name, r in result.items():
        print(f"{name}: pixel agreement with fp32 {100 * r['pixel_agreement']:.3f}% "
              f"({100 * r['pixel_agreement_gt']:.3f}% of labelled pixels), mIoU {r['mIoU']:.2f} vs fp32 "
              f"{r['mIoU_fp32']:.2f}, {r['seconds_per_image']:.3f} s/image vs {r['seconds_per_image_fp32']:.3f} "
              f"over {r['images']} images")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="r50", help=f"one of {sorted(BACKBONES)} (or, with --no-hf, "
                        "any backbone name of this project)")
    parser.add_argument("--variants", default="fp32", help="this project's variants, comma-separated: "
                        "PRECISION[-cl][-pN], e.g. fp32,fp32-cl,bf16-cl,fp32-p12544")
    parser.add_argument("--tasks", default="infer,train", help="infer and/or train")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2, help="training batch (inference uses 1)")
    parser.add_argument("--num-masks", type=int, default=8, help="target masks per training image")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-hf", action="store_true", help="measure this project only")
    parser.add_argument("--no-aux", action="store_true", help="no auxiliary (deep supervision) losses on either side")
    parser.add_argument("--tune-malloc", action="store_true",
                        help="both sides: glibc keeps freed memory instead of page-faulting it in again "
                             "(maskformer.engine.memory.keep_freed_memory, what the trainer does)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed inference runs")
    parser.add_argument("--train-runs", type=int, default=3, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=1, help="repeat every measurement, alternating the order")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each measurement wait up to S seconds for the machine to be idle")
    parser.add_argument("--idle-below", type=float, default=0.3, help="'idle': other processes use fewer cores")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeat a measurement disturbed by other processes (see --noisy-above) up to this often")
    parser.add_argument("--noisy-above", type=float, default=0.25,
                        help="'disturbed': other processes used more cores than this during the measurement")
    parser.add_argument("--linear-kernels", action="store_true",
                        help="instead: time the models' linear layer sizes with F.linear (BLAS) and oneDNN")
    parser.add_argument("--gpu-suite", action="store_true", help="R50 and Swin-T GPU figures (needs --device cuda)")
    parser.add_argument("--json", default=None, help="also write everything to this file")
    parser.add_argument("--agreement", default=None, metavar="CONFIG",
                        help="instead: fp32 vs --variants (default bf16-cl) predictions of --weights on CONFIG's "
                             "test set")
    parser.add_argument("--weights", default=None, help="checkpoint for --agreement")
    parser.add_argument("--max-images", type=int, default=0, help="--agreement: stop after this many images")
    parser.add_argument("overrides", nargs="*", help="--agreement: dotted config overrides")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        job = json.loads(args.worker)
        job["size"] = tuple(job["size"])
        print(json.dumps(run_job(Job(**job))), flush=True)
        return 0

    if args.overrides and args.agreement is None:
        parser.error(f"unexpected arguments {args.overrides} (config overrides go with --agreement)")
    results: dict[str, Any] = {"environment": environment(args.threads, args.device), "arguments": vars(args)}
    if args.agreement is not None:
        if args.weights is None:
            parser.error("--agreement needs --weights")
        if args.variants == "fp32":
            args.variants = "bf16-cl"
        results["agreement"] = agreement_main(args)
    elif args.linear_kernels:
        torch.set_num_threads(args.threads)
        results["linear_kernels"] = linear_kernels(log=lambda line: print(line, flush=True))
    elif args.gpu_suite:
        if not args.device.startswith("cuda"):
            parser.error("--gpu-suite needs --device cuda")
        torch.set_num_threads(args.threads)
        gpu_suite(torch.device(args.device), results)
    else:
        variants = [v for v in args.variants.split(",") if v]
        for v in variants:
            try:
                parse_variant(v)
            except ValueError as error:
                parser.error(str(error))
        tasks = [t for t in args.tasks.split(",") if t]
        if set(tasks) - {"infer", "train"}:
            parser.error(f"--tasks: choose from infer, train; got {args.tasks!r}")
        with_hf = not args.no_hf
        if with_hf:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("transformers is not installed: measuring this project only", file=sys.stderr)
                with_hf = False
        if with_hf and args.backbone not in BACKBONES:
            parser.error(f"--backbone {args.backbone!r}: the comparison supports {sorted(BACKBONES)}")
        sides = (["hf"] if with_hf else []) + variants
        common = dict(backbone=args.backbone, size=tuple(args.size), num_classes=args.num_classes,
                      num_queries=args.num_queries, batch=args.batch, num_masks=args.num_masks,
                      threads=args.threads, device=args.device, aux=not args.no_aux, warmup=args.warmup,
                      tune_malloc=args.tune_malloc)
        jobs = []
        for task in tasks:
            for side in sides:
                # Point sampling and checkpointing change training only: inference is the plain variant's.
                if task == "infer" and side != "hf":
                    variant = parse_variant(side)
                    if variant["num_points"] > 0 or variant["grad_checkpointing"]:
                        continue
                jobs.append(Job(side=side, task=task, runs=args.runs if task == "infer" else args.train_runs,
                                **common))
        env = results["environment"]
        print(f"{env['cpu']}, {args.threads} threads, torch {env['torch']}, transformers {env['transformers']}, "
              f"{args.backbone}, {args.size[0]}x{args.size[1]}, {args.num_classes} classes, {args.num_queries} "
              f"queries, train batch {args.batch} with {args.num_masks} masks/image", flush=True)
        raw = compare(jobs, args.repeats, args.wait_idle, args.idle_below, args.retries, args.noisy_above,
                      log=lambda s: print(s, flush=True))
        summary = summarize(raw, sides)
        results.update({"runs": raw, "summary": summary})
        print()
        print(format_table(summary, f"{args.backbone}, {args.size[0]}x{args.size[1]}, {args.threads} threads, "
                                    f"{args.device} (ratios: ours / Hugging Face fp32)"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
