"""Evaluation over a test loader: inference, post-processing, and the metric accumulators.

Used by periodic evaluation during training and by ``tools/eval.py``; works under torchrun
(each rank evaluates its shard, the evaluators sum their statistics across ranks).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from maskformer.config import TestConfig
from maskformer.data.metadata import DatasetMetadata
from maskformer.distributed import is_main_process
from maskformer.evaluation import InstanceEvaluator, PanopticEvaluator, SemSegEvaluator
from maskformer.inference import postprocess


def autocast_context(device: torch.device, amp: str):
    """Autocast for inference/training in the configured precision ("off", "bf16", "fp16")."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _instance_ground_truth(sample: dict, metadata: DatasetMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thing segments of a panoptic ground truth as (masks [M,H,W], labels [M], iscrowd [M])."""
    pan = np.asarray(sample["gt_pan_seg"])
    segments = [s for s in sample["segments_info"] if metadata.is_thing[s["category_id"]]]
    if not segments:
        return np.zeros((0, *pan.shape), dtype=bool), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids = np.array([s["id"] for s in segments])
    masks = pan[None] == ids[:, None, None]
    labels = np.array([s["category_id"] for s in segments], dtype=np.int64)
    crowd = np.array([int(s.get("iscrowd", 0)) for s in segments], dtype=np.int64)
    return masks, labels, crowd


def default_inference(model: torch.nn.Module, batch: dict, test: TestConfig, metadata: DatasetMetadata,
                      device: torch.device, amp: str = "off", channels_last: bool = False) -> list[dict]:
    """One forward pass on the padded batch, then the original's post-processing per image."""
    images = batch["images"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, amp):
        outputs = model(images)
    return postprocess(outputs, batch["image_sizes"], batch["orig_sizes"], semantic=test.semantic_on,
                       panoptic=test.panoptic_on, instance=test.instance_on, is_thing=metadata.is_thing,
                       object_mask_threshold=test.object_mask_threshold, overlap_threshold=test.overlap_threshold,
                       top_k=test.detections_per_image, padded_size=tuple(images.shape[-2:]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, metadata: DatasetMetadata, test: TestConfig, device: torch.device,
             *, amp: str = "off", channels_last: bool = False, progress: bool = True,
             inference: Callable[..., list[dict]] | None = None,
             on_result: Callable[[dict, dict], None] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on every batch of ``loader``.

    Args:
        inference: replaces :func:`default_inference` (test-time augmentation, sliding windows).
        on_result: called with (sample, result) for every image, e.g. to write predictions.
    Returns:
        {"sem_seg": {"mIoU", ...}, "panoptic_seg": {"PQ", ...}, "instances": {"AP", ...}} for the
        tasks that are on (PQ and AP only on panoptic datasets); plus "time": {"seconds", "images"}
        (this rank's share).
    """
    inference = inference or default_inference
    was_training = model.training
    model.eval()
    has_panoptic_gt = "panoptic" in metadata.evaluator
    if (test.panoptic_on or test.instance_on) and not has_panoptic_gt:
        warnings.warn(f"dataset {metadata.name!r} has no panoptic ground truth: PQ and mask AP are skipped")
    sem = pan = inst = None
    if test.semantic_on:
        sem = SemSegEvaluator(metadata.num_classes, metadata.ignore_label, metadata.class_names, device=device)
    categories = [{"id": i, "isthing": t, "name": n} for i, (n, t) in enumerate(zip(metadata.class_names,
                                                                                    metadata.is_thing))]
    if test.panoptic_on and has_panoptic_gt:
        pan = PanopticEvaluator(categories)
    if test.instance_on and has_panoptic_gt:
        inst = InstanceEvaluator(thing_class_ids=metadata.thing_ids, class_names=dict(enumerate(metadata.class_names)))
    start, count = time.perf_counter(), 0
    bar = tqdm(loader, desc="eval", disable=not (progress and is_main_process()), dynamic_ncols=True, leave=False)
    try:
        for batch in bar:
            results = inference(model, batch, test, metadata, device, amp=amp, channels_last=channels_last)
            for sample, result in zip(batch["samples"], results):
                count += 1
                if sem is not None:
                    sem.update(result["sem_seg"].max(0).indices, sample["gt_sem_seg"])  # max() is faster than argmax on CPU
                if "gt_pan_seg" in sample:
                    if pan is not None:
                        seg, info = result["panoptic_seg"]
                        pan.update(seg.cpu(), info, sample["gt_pan_seg"], sample["segments_info"],
                                   image_id=sample.get("image_id"))
                    if inst is not None:
                        masks, labels, crowd = _instance_ground_truth(sample, metadata)
                        r = result["instances"]
                        inst.update(sample.get("image_id", count), r["masks"].cpu(), r["scores"].cpu(),
                                    r["labels"].cpu(), masks, labels, crowd)
                if on_result is not None:
                    on_result(sample, result)
    finally:
        model.train(was_training)
    metrics: dict[str, dict[str, Any]] = {}
    # compute() sums across ranks: every rank must call it, whether or not it saw ground truth.
    if sem is not None:
        metrics["sem_seg"] = sem.compute()
    if pan is not None:
        metrics["panoptic_seg"] = pan.compute()
    if inst is not None:
        metrics["instances"] = inst.compute()
    metrics["time"] = {"seconds": time.perf_counter() - start, "images": count}
    return metrics


def headline(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The summary numbers of an evaluation (no per-class entries), flattened."""
    keys = ("mIoU", "fwIoU", "mACC", "pACC", "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st",
            "RQ_st", "AP", "AP50", "AP75", "APs", "APm", "APl")
    out = {}
    for task in ("sem_seg", "panoptic_seg", "instances"):
        for key in keys:
            if key in metrics.get(task, {}):
                out[key] = metrics[task][key]
    return out
