"""Evaluation metrics: semantic (mIoU), panoptic (PQ) and instance (COCO mask AP)."""

from maskformer.evaluation.instance import InstanceEvaluator
from maskformer.evaluation.panoptic import (
    PanopticEvaluator,
    PanopticPredictionWriter,
    id2rgb,
    panoptic_image_stats,
    pq_compute,
    rgb2id,
)
from maskformer.evaluation.semantic import SemSegEvaluator

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "PanopticPredictionWriter",
    "SemSegEvaluator",
    "id2rgb",
    "panoptic_image_stats",
    "pq_compute",
    "rgb2id",
]
