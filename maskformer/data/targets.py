"""Turning label maps into MaskFormer's set targets: ``labels [N]`` + binary ``masks [N,H,W]``."""

from __future__ import annotations

import torch

__all__ = ["semantic_targets", "panoptic_targets", "semantic_from_panoptic"]


def semantic_targets(sem_seg: torch.Tensor, ignore_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask per class present (ignore excluded), classes in increasing order.

    Args:
        sem_seg: int64 ``[H,W]`` class ids.
    Returns:
        labels int64 ``[N]``, masks bool ``[N,H,W]`` (``N`` may be 0).
    """
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_label]
    masks = sem_seg[None] == classes[:, None, None]
    return classes.to(torch.int64), masks


def panoptic_targets(pan_seg: torch.Tensor, segments_info: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask per non-crowd segment still visible in ``pan_seg`` (after cropping some may be gone).

    Args:
        pan_seg: int64 ``[H,W]`` segment ids (0 = void).
        segments_info: ``[{"id", "category_id" (contiguous), "iscrowd", ...}]``.
    Returns:
        labels int64 ``[N]``, masks bool ``[N,H,W]``.
    """
    h, w = pan_seg.shape[-2:]
    present = set(torch.unique(pan_seg).tolist())
    keep = [s for s in segments_info if not s.get("iscrowd", 0) and s["id"] in present]
    if not keep:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, h, w, dtype=torch.bool)
    ids = torch.tensor([s["id"] for s in keep], dtype=pan_seg.dtype)
    labels = torch.tensor([s["category_id"] for s in keep], dtype=torch.int64)
    return labels, pan_seg[None] == ids[:, None, None]


def semantic_from_panoptic(pan_seg: torch.Tensor, segments_info: list[dict], ignore_label: int) -> torch.Tensor:
    """Class-id map of a panoptic annotation: void and crowd pixels get ``ignore_label``. int64 ``[H,W]``."""
    # Segment ids can be as large as 256^3 (COCO's RGB encoding), so map through the unique ids
    # present instead of a dense lookup table.
    category = {s["id"]: s["category_id"] for s in segments_info if not s.get("iscrowd", 0)}
    uniq, inverse = torch.unique(pan_seg, return_inverse=True)
    table = torch.tensor([category.get(int(u), ignore_label) for u in uniq.tolist()], dtype=torch.int64)
    return table[inverse]
