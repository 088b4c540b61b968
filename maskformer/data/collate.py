"""Batching samples of different sizes: normalise, then zero-pad to a common (divisible) size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SegmentationCollator"]

_BATCHED_KEYS = ("image", "image_size", "orig_size", "labels", "masks", "sem_seg", "num_skipped")


class SegmentationCollator:
    """Collate dataset samples into the batch the model and the criterion consume.

    Images are normalised as ``(x - mean) / std`` on the 0-255 RGB scale and *then* zero-padded at the
    bottom/right to the batch's largest size rounded up to ``size_divisibility`` (0: no rounding), as
    the original's ``ImageList.from_tensors``.

    Returns:
        ``{"images": float32 [B,3,Hp,Wp], "targets": [{"labels": int64 [N_i], "masks": float32 [N_i,Hp,Wp]}],
        "sem_seg": int64 [B,Hp,Wp] (ignore-padded; only if the samples have it), "image_sizes": [(h, w)],
        "orig_sizes": [(H0, W0)], "samples": [per-sample dict of the remaining keys], "num_skipped": int}``.
    """

    def __init__(self, pixel_mean: list[float], pixel_std: list[float], size_divisibility: int, ignore_label: int):
        self.pixel_mean = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
        self.pixel_std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
        self.size_divisibility = size_divisibility
        self.ignore_label = ignore_label

    def padded_size(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        h = max(s[0] for s in sizes)
        w = max(s[1] for s in sizes)
        if self.size_divisibility > 0:
            d = self.size_divisibility
            h, w = math.ceil(h / d) * d, math.ceil(w / d) * d
        return h, w

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        shapes = [tuple(s["image"].shape[-2:]) for s in samples]
        hp, wp = self.padded_size(shapes)
        images = torch.zeros(len(samples), 3, hp, wp, dtype=torch.float32)
        targets = []
        for i, s in enumerate(samples):
            h, w = shapes[i]
            images[i, :, :h, :w] = (s["image"].float() - self.pixel_mean) / self.pixel_std
            masks = s["masks"].to(torch.float32)
            targets.append({"labels": s["labels"], "masks": F.pad(masks, (0, wp - w, 0, hp - h))})
        batch = {
            "images": images,
            "targets": targets,
            "image_sizes": [tuple(s["image_size"]) for s in samples],
            "orig_sizes": [tuple(s["orig_size"]) for s in samples],
            "samples": [{k: v for k, v in s.items() if k not in _BATCHED_KEYS} for s in samples],
            "num_skipped": sum(int(s.get("num_skipped", 0)) for s in samples),
        }
        if all("sem_seg" in s for s in samples):
            sem = torch.full((len(samples), hp, wp), self.ignore_label, dtype=torch.int64)
            for i, s in enumerate(samples):
                h, w = s["sem_seg"].shape[-2:]
                sem[i, :h, :w] = s["sem_seg"]
            batch["sem_seg"] = sem
        return batch
