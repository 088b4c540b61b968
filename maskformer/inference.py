"""Post-processing: turning (class, mask) pairs into semantic, panoptic and instance results.

Pure tensor functions, separate from the model (they need dataset metadata, the model must not).
``semantic_inference`` and ``panoptic_inference`` are the original MaskFormer's algorithms;
``instance_inference`` is Mask2Former's top-k scoring (the original has no instance output).
``postprocess`` applies the original's resizing rules to a batch of raw model outputs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

__all__ = [
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "resize_to_original",
    "postprocess",
]


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores from mask classification.

    Args:
        mask_cls: [Q, K+1] class logits (last = no object).
        mask_pred: [Q, H, W] mask logits.
    Returns:
        [K, H, W] scores: sum over queries of p(class) * sigmoid(mask). The no-object probability is
        dropped without renormalising, as the original does; ``argmax(0)`` gives the label map.
    """
    probs = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", probs, mask_pred.float().sigmoid())


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    is_thing: Sequence[bool],
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.0,
) -> tuple[torch.Tensor, list[dict]]:
    """The original MaskFormer panoptic merge.

    Queries whose best class is a real class with probability > ``object_mask_threshold`` compete
    for pixels by ``score * sigmoid(mask)``. A query keeps its pixels only if it wins some and they
    are at least ``overlap_threshold`` of its own mask (``sigmoid >= 0.5``); queries of the same
    stuff class merge into one segment.

    Args:
        mask_cls: [Q, K+1] class logits.
        mask_pred: [Q, H, W] mask logits.
        is_thing: K flags, True for thing classes.
    Returns:
        (panoptic_seg int32 [H, W] with segment ids from 1 (0 = void),
         segments_info [{"id", "category_id", "isthing", "score"}]) -- category ids are contiguous.
    """
    num_classes = mask_cls.shape[-1] - 1
    if len(is_thing) != num_classes:
        raise ValueError(f"is_thing has {len(is_thing)} entries but the model predicts {num_classes} classes")
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    height, width = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=mask_pred.device)
    if not bool(keep.any()):
        return panoptic_seg, []
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = mask_pred[keep].float().sigmoid()
    owner = (cur_scores[:, None, None] * cur_masks).argmax(0)  # [H, W] index into the kept queries

    n = cur_classes.shape[0]
    won_area = torch.bincount(owner.flatten(), minlength=n).tolist()
    own_area = (cur_masks >= 0.5).flatten(1).sum(1).tolist()
    classes = cur_classes.tolist()
    score_list = cur_scores.tolist()

    # Decide segment ids per query on scalars, then paint all pixels with one lookup.
    query_to_segment = [0] * n
    segments_info: list[dict] = []
    stuff_segment: dict[int, int] = {}
    for k in range(n):
        if won_area[k] == 0 or own_area[k] == 0 or won_area[k] / own_area[k] < overlap_threshold:
            continue
        cls = classes[k]
        thing = bool(is_thing[cls])
        if not thing and cls in stuff_segment:
            query_to_segment[k] = stuff_segment[cls]
            continue
        segment_id = len(segments_info) + 1
        if not thing:
            stuff_segment[cls] = segment_id
        query_to_segment[k] = segment_id
        segments_info.append({"id": segment_id, "category_id": cls, "isthing": thing, "score": score_list[k]})
    lut = torch.tensor(query_to_segment, dtype=torch.int32, device=mask_pred.device)
    panoptic_seg = lut[owner]
    return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    *,
    top_k: int = 100,
    thing_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Mask2Former's instance scoring: top-k (query, class) pairs, rescored by mask confidence.

    Args:
        mask_cls: [Q, K+1] class logits.
        mask_pred: [Q, H, W] mask logits.
        top_k: number of (query, class) pairs kept (``test.detections_per_image``).
        thing_ids: if given (panoptic datasets), only these classes are kept.
    Returns:
        {"masks": bool [N, H, W], "scores": [N], "labels": int64 [N]}, N <= top_k, highest score first.
        The score is p(class) times the mean sigmoid inside the binary mask.
    """
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls.float(), dim=-1)[:, :-1]  # [Q, K]
    if thing_ids is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
        allowed[list(thing_ids)] = True
        scores = scores.masked_fill(~allowed, -1.0)
    k = min(top_k, num_queries * num_classes)
    flat_scores, flat_idx = scores.flatten().topk(k)
    valid = flat_scores >= 0
    flat_scores, flat_idx = flat_scores[valid], flat_idx[valid]
    labels = flat_idx % num_classes
    queries = torch.div(flat_idx, num_classes, rounding_mode="floor")
    logits = mask_pred[queries].float()
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    final = flat_scores * mask_score
    order = final.argsort(descending=True)
    return {"masks": masks[order], "scores": final[order], "labels": labels[order]}


def resize_to_original(x: torch.Tensor, image_size: tuple[int, int], orig_size: tuple[int, int]) -> torch.Tensor:
    """Crop the padding off ``x`` [C, Hp, Wp] and resize it bilinearly to ``orig_size`` (detectron2's
    ``sem_seg_postprocess``)."""
    h, w = image_size
    x = x[:, :h, :w]
    if (h, w) == tuple(orig_size):
        return x
    return F.interpolate(x[None], size=tuple(orig_size), mode="bilinear", align_corners=False)[0]


def postprocess(
    outputs: dict,
    image_sizes: Sequence[tuple[int, int]],
    orig_sizes: Sequence[tuple[int, int]],
    *,
    semantic: bool = True,
    panoptic: bool = False,
    instance: bool = False,
    is_thing: Sequence[bool] | None = None,
    object_mask_threshold: float = 0.0,
    overlap_threshold: float = 0.0,
    top_k: int = 100,
    padded_size: tuple[int, int] | None = None,
) -> list[dict]:
    """Raw model outputs of a padded batch -> per-image results at each image's original size.

    The mask logits are upsampled to the padded input size (4x). Semantic scores are computed
    there and then cropped and resized (the original's default order); panoptic and instance
    results are computed on logits cropped and resized first (as the original forces for panoptic).

    Args:
        outputs: the model's {"pred_logits": [B,Q,K+1], "pred_masks": [B,Q,h,w]}, or a per-pixel
            baseline's {"pred_sem_seg": [B,K,h,w]} (semantic only: its "sem_seg" are the class
            logits upsampled, cropped and resized, not probabilities, as the original returns them).
        image_sizes: per image, (h, w) before padding (at network resolution).
        orig_sizes: per image, the (H0, W0) to return results at.
        padded_size: (Hp, Wp) of the input batch; default 4x the mask size.
    Returns:
        per image: {"sem_seg": [K,H0,W0] scores} and/or {"panoptic_seg": (int32 [H0,W0], segments_info)}
        and/or {"instances": {"masks", "scores", "labels"}}.
    """
    if "pred_sem_seg" in outputs:  # per-pixel baselines (maskformer/models/per_pixel.py)
        if panoptic or instance:
            raise ValueError("per-pixel baseline models (model.architecture per_pixel_baseline / "
                             "per_pixel_baseline_plus) do semantic segmentation only: set test.panoptic_on and "
                             "test.instance_on to false (and do not ask predict for panoptic/instance results)")
        scores = outputs["pred_sem_seg"]
        # Exactly 4x, then crop (the original's scale_factor=4); the padded size when it is a multiple of 4.
        size = (scores.shape[-2] * 4, scores.shape[-1] * 4)
        results = []
        for i in range(scores.shape[0]):
            logits = F.interpolate(scores[i : i + 1].float(), size=size, mode="bilinear", align_corners=False)[0]
            results.append({"sem_seg": resize_to_original(logits, image_sizes[i], orig_sizes[i])} if semantic else {})
        return results
    if (panoptic or instance) and is_thing is None:
        raise ValueError("panoptic and instance post-processing need is_thing (the dataset's thing flags)")
    pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    if padded_size is None:
        padded_size = (pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4)
    results = []
    for i in range(pred_masks.shape[0]):
        # Upsample one image at a time: the whole batch at full resolution can be large.
        masks = F.interpolate(pred_masks[i : i + 1].float(), size=padded_size, mode="bilinear",
                              align_corners=False)[0]
        result: dict = {}
        if semantic:
            result["sem_seg"] = resize_to_original(semantic_inference(pred_logits[i], masks), image_sizes[i],
                                                   orig_sizes[i])
        if panoptic or instance:
            masks_orig = resize_to_original(masks, image_sizes[i], orig_sizes[i])
            if panoptic:
                result["panoptic_seg"] = panoptic_inference(
                    pred_logits[i], masks_orig, is_thing=is_thing,
                    object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold)
            if instance:
                thing_ids = [c for c, t in enumerate(is_thing) if t]
                result["instances"] = instance_inference(
                    pred_logits[i], masks_orig, top_k=top_k,
                    thing_ids=thing_ids if 0 < len(thing_ids) < len(is_thing) else None)
        results.append(result)
    return results
