"""COCO mask AP through pycocotools, with ground truth and predictions kept in memory.

Masks are RLE-encoded as soon as they arrive (small to keep and to gather across ranks); :meth:`compute`
builds a ground-truth and a detection ``COCO`` object directly from those records and runs
``COCOeval(iouType="segm")``, so no JSON file is written and images without ground truth or without
predictions need no special casing.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskformer.distributed import all_gather_objects

logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _numpy(x: ArrayLike | None) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _encode(masks: np.ndarray) -> list[dict]:
    """``[N, H, W]`` bool -> N COCO RLEs."""
    if len(masks) == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _annotations(masks: np.ndarray, labels: np.ndarray, **columns: np.ndarray) -> list[dict[str, Any]]:
    rles = _encode(masks)
    areas = mask_utils.area(rles) if rles else []
    boxes = mask_utils.toBbox(rles) if rles else []
    annotations = []
    for i, rle in enumerate(rles):
        annotation = {"segmentation": rle, "category_id": int(labels[i]), "area": float(areas[i]),
                      "bbox": [float(v) for v in boxes[i]]}
        annotation.update({name: values[i].item() for name, values in columns.items()})
        annotations.append(annotation)
    return annotations


class InstanceEvaluator:
    """COCO mask AP (``AP, AP50, AP75, APs, APm, APl`` and ``AP-<name>`` per class, in percent).

    Args:
        thing_class_ids: the label ids evaluated (COCOeval's ``catIds``); masks with other labels, e.g. stuff
            classes of a panoptic model, are ignored on both sides. None: every label seen in the ground truth
            or the predictions.
        class_names: label id -> name for the per-class keys; default ``str(label)``.
    """

    def __init__(
        self,
        thing_class_ids: Sequence[int] | None = None,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        self.thing_class_ids = None if thing_class_ids is None else sorted({int(c) for c in thing_class_ids})
        self.class_names = dict(class_names or {})
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self._seen: set = set()

    def update(
        self,
        image_id: Any,
        pred_masks: ArrayLike,
        pred_scores: ArrayLike,
        pred_labels: ArrayLike,
        gt_masks: ArrayLike,
        gt_labels: ArrayLike,
        gt_iscrowd: ArrayLike | None = None,
    ) -> None:
        """Add one image.

        Args:
            image_id: any hashable id, unique over the evaluation (and over ranks).
            pred_masks: ``[N, H, W]`` bool; pred_scores: ``[N]``; pred_labels: ``[N]`` integer labels.
            gt_masks: ``[M, H, W]`` bool; gt_labels: ``[M]``; gt_iscrowd: ``[M]`` (default all 0).
        """
        if image_id in self._seen:
            raise ValueError(f"InstanceEvaluator: image_id {image_id!r} was already added")
        pred_masks, gt_masks = _numpy(pred_masks), _numpy(gt_masks)
        pred_scores, pred_labels, gt_labels = _numpy(pred_scores), _numpy(pred_labels), _numpy(gt_labels)
        gt_iscrowd = np.zeros(len(gt_labels), dtype=np.int64) if gt_iscrowd is None else _numpy(gt_iscrowd)
        where = f"InstanceEvaluator image {image_id!r}"
        if pred_masks.ndim != 3 or gt_masks.ndim != 3:
            raise ValueError(
                f"{where}: masks must be [N, H, W], got pred {pred_masks.shape} and gt {gt_masks.shape}"
            )
        if pred_masks.shape[1:] != gt_masks.shape[1:]:
            raise ValueError(f"{where}: pred masks are {pred_masks.shape[1:]} but gt masks {gt_masks.shape[1:]}")
        if not len(pred_scores) == len(pred_labels) == len(pred_masks):
            raise ValueError(
                f"{where}: {len(pred_masks)} pred masks, {len(pred_scores)} scores and {len(pred_labels)} labels"
            )
        if not len(gt_labels) == len(gt_iscrowd) == len(gt_masks):
            raise ValueError(f"{where}: {len(gt_masks)} gt masks, {len(gt_labels)} labels, {len(gt_iscrowd)} iscrowd")
        height, width = gt_masks.shape[1:]
        self.images.append({
            "image_id": image_id,
            "height": int(height),
            "width": int(width),
            "gt": _annotations(gt_masks.astype(bool), gt_labels, iscrowd=gt_iscrowd.astype(np.int64)),
            "pred": _annotations(pred_masks.astype(bool), pred_labels, score=pred_scores.astype(np.float64)),
        })
        self._seen.add(image_id)

    def compute(self) -> dict[str, float]:
        """Gather every rank's images and run COCOeval; undefined values (e.g. no ground truth) are NaN."""
        images = [image for rank_images in all_gather_objects(self.images) for image in rank_images]
        seen: set = set()
        for image in images:
            if image["image_id"] in seen:
                raise ValueError(f"InstanceEvaluator: image_id {image['image_id']!r} was added on several ranks")
            seen.add(image["image_id"])

        if self.thing_class_ids is not None:
            category_ids = self.thing_class_ids
        else:
            category_ids = sorted({a["category_id"] for image in images for a in image["gt"] + image["pred"]})
        results = {key: float("nan") for key in SUMMARY_KEYS}
        results.update({f"AP-{self._name(c)}": float("nan") for c in category_ids})
        if not images or not category_ids:
            return results

        # pycocotools wants positive integer ids (an annotation id of 0 reads as "unmatched").
        image_entries = [{"id": i + 1, "height": im["height"], "width": im["width"]} for i, im in enumerate(images)]
        categories = [{"id": c} for c in category_ids]
        gt_annotations, pred_annotations = [], []
        for i, image in enumerate(images):
            for source, target in ((image["gt"], gt_annotations), (image["pred"], pred_annotations)):
                for annotation in source:
                    target.append({**annotation, "image_id": i + 1, "id": len(target) + 1})
        for annotation in pred_annotations:
            annotation["iscrowd"] = 0

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            coco_gt, coco_pred = COCO(), COCO()
            coco_gt.dataset = {"images": image_entries, "categories": categories, "annotations": gt_annotations}
            coco_pred.dataset = {"images": image_entries, "categories": categories, "annotations": pred_annotations}
            coco_gt.createIndex()
            coco_pred.createIndex()
            coco_eval = COCOeval(coco_gt, coco_pred, iouType="segm")
            coco_eval.params.catIds = category_ids
            coco_eval.params.imgIds = [entry["id"] for entry in image_entries]
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logger.info("COCO mask AP on %d images\n%s", len(images), output.getvalue().strip())

        for key, value in zip(SUMMARY_KEYS, coco_eval.stats[:6]):
            results[key] = 100 * float(value) if value >= 0 else float("nan")
        # precision: [IoU thresholds, recall thresholds, categories, area ranges ("all" first), max dets (100 last)]
        precision = coco_eval.eval["precision"]
        for k, category_id in enumerate(category_ids):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            results[f"AP-{self._name(category_id)}"] = 100 * float(values.mean()) if values.size else float("nan")
        return results

    def _name(self, category_id: int) -> str:
        return self.class_names.get(category_id, str(category_id))
