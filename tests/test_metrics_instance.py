"""InstanceEvaluator: hand-reasoned AP values and agreement with pycocotools run the usual way (JSON + loadRes)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskformer.evaluation import InstanceEvaluator


def box_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def no_masks(h: int = 16, w: int = 16) -> np.ndarray:
    return np.zeros((0, h, w), dtype=bool)


def test_perfect_predictions_give_100_for_every_size():
    # small (20x20 < 32²), medium (50x50) and large (100x100 > 96²) objects.
    masks = np.stack([box_mask(120, 120, 0, 0, 20, 20), box_mask(120, 120, 0, 30, 50, 80),
                      box_mask(120, 120, 10, 10, 110, 110)])
    labels = np.array([1, 2, 1])
    evaluator = InstanceEvaluator(thing_class_ids=[1, 2], class_names={1: "person", 2: "car"})
    for image_id in range(2):
        evaluator.update(image_id, torch.from_numpy(masks), torch.tensor([0.9, 0.8, 0.7]), torch.from_numpy(labels),
                         torch.from_numpy(masks), torch.from_numpy(labels))
    results = evaluator.compute()
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-person", "AP-car"):
        assert results[key] == pytest.approx(100.0), key


def one_missed_detection_and_one_false_positive(fp_score: float) -> dict[str, float]:
    """Two ground-truth objects; one is found exactly (score 0.9), the other is missed, and a detection
    (score ``fp_score``) lands on empty background."""
    gt = np.stack([box_mask(64, 64, 0, 0, 20, 20), box_mask(64, 64, 40, 40, 60, 60)])
    pred = np.stack([box_mask(64, 64, 0, 0, 20, 20), box_mask(64, 64, 0, 40, 20, 60)])
    evaluator = InstanceEvaluator()
    evaluator.update("img", pred, np.array([0.9, fp_score]), np.array([3, 3]), gt, np.array([3, 3]))
    return evaluator.compute()


def test_one_missed_detection_and_one_false_positive_hand_reasoned():
    # Ranked TP then FP: precision 1 up to recall 0.5, nothing beyond, so 51 of COCO's 101 recall points
    # (0.00..0.50) score 1 at every IoU threshold.
    results = one_missed_detection_and_one_false_positive(fp_score=0.5)
    assert results["AP"] == pytest.approx(100 * 51 / 101)
    assert results["AP50"] == pytest.approx(100 * 51 / 101)
    assert results["AP-3"] == pytest.approx(100 * 51 / 101)
    # Ranked FP then TP: the interpolated precision is 1/2 on those 51 points.
    results = one_missed_detection_and_one_false_positive(fp_score=0.95)
    assert results["AP"] == pytest.approx(100 * 0.5 * 51 / 101)


def random_blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(3, h // 2, size=2)
        yy, xx = np.mgrid[:h, :w]
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[i, cy, cx] = True
    return masks


def make_random_images(seed: int = 0):
    """Noisy detections of blob objects, crowd objects, an image without ground truth, one without detections."""
    rng = np.random.default_rng(seed)
    images = []
    for image_id in range(6):
        h, w = 48 + 8 * image_id, 64
        m = 0 if image_id == 4 else int(rng.integers(1, 5))
        gt_masks = random_blob_masks(rng, m, h, w)
        gt_labels = rng.integers(1, 4, size=m)
        gt_iscrowd = (rng.random(m) < 0.2).astype(np.int64)
        if image_id == 5:
            pred_masks, pred_labels = no_masks(h, w), np.zeros(0, dtype=np.int64)
        else:
            # Perturbed copies of the ground truth (some relabelled) plus random extras.
            shifted = np.array([np.roll(g, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1)) for g in gt_masks],
                               dtype=bool).reshape(m, h, w)
            noisy = shifted & (rng.random((m, h, w)) > 0.1)
            pred_masks = np.concatenate([noisy, random_blob_masks(rng, int(rng.integers(0, 3)), h, w)])
            pred_labels = np.concatenate([np.where(rng.random(m) < 0.8, gt_labels, rng.integers(1, 4, size=m)),
                                          rng.integers(1, 4, size=len(pred_masks) - m)])
        pred_scores = rng.random(len(pred_masks))
        images.append((image_id, pred_masks, pred_scores, pred_labels, gt_masks, gt_labels, gt_iscrowd))
    return images


def pycocotools_reference(tmp_path, images) -> np.ndarray:
    """COCOeval fed the usual way: a ground-truth JSON file and a results list through ``loadRes``."""
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in (1, 2, 3)]}
    results = []
    for image_id, pred_masks, pred_scores, pred_labels, gt_masks, gt_labels, gt_iscrowd in images:
        gt["images"].append({"id": image_id + 1, "height": gt_masks.shape[1], "width": gt_masks.shape[2]})
        for mask, label, crowd in zip(gt_masks, gt_labels, gt_iscrowd):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id + 1, "category_id": int(label),
                "iscrowd": int(crowd), "area": float(mask.sum()), "bbox": list(mask_utils.toBbox(rle)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            })
        for mask, score, label in zip(pred_masks, pred_scores, pred_labels):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append({"image_id": image_id + 1, "category_id": int(label), "score": float(score),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats[:6]


def test_random_case_equals_pycocotools_fed_directly(tmp_path, capsys):
    images = make_random_images()
    evaluator = InstanceEvaluator(thing_class_ids=[1, 2, 3])
    for image in images:
        evaluator.update(*image)
    results = evaluator.compute()
    reference = pycocotools_reference(tmp_path, images)
    assert 5 < results["AP"] < 95  # a non-trivial case
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), reference):
        if value < 0:
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(100 * value, abs=1e-9), key
    assert "Average Precision" not in capsys.readouterr().out  # pycocotools' prints are silenced


def test_labels_outside_thing_class_ids_are_ignored():
    images = make_random_images(seed=1)
    reference = InstanceEvaluator(thing_class_ids=[1, 2, 3])
    with_stuff = InstanceEvaluator(thing_class_ids=[1, 2, 3])
    for image in images:
        reference.update(*image)
        image_id, pred_masks, pred_scores, pred_labels, gt_masks, gt_labels, gt_iscrowd = image
        # A confident "stuff" mask over the whole image on both sides must change nothing.
        full = np.ones((1,) + gt_masks.shape[1:], dtype=bool)
        with_stuff.update(image_id, np.concatenate([pred_masks, full]), np.append(pred_scores, 1.0),
                          np.append(pred_labels, 99), np.concatenate([gt_masks, full]), np.append(gt_labels, 99),
                          np.append(gt_iscrowd, 0))
    assert with_stuff.compute() == pytest.approx(reference.compute(), nan_ok=True)


def test_empty_cases():
    gt = np.stack([box_mask(16, 16, 0, 0, 8, 8)])
    evaluator = InstanceEvaluator()
    evaluator.update(0, no_masks(), np.zeros(0), np.zeros(0, dtype=np.int64), gt, np.array([1]))
    assert evaluator.compute()["AP"] == 0.0  # objects but no detections at all

    evaluator = InstanceEvaluator(thing_class_ids=[1])
    evaluator.update(0, gt, np.array([0.9]), np.array([1]), no_masks(), np.zeros(0, dtype=np.int64))
    assert math.isnan(evaluator.compute()["AP"])  # detections but no ground truth: AP undefined

    evaluator = InstanceEvaluator()
    assert math.isnan(evaluator.compute()["AP"])  # nothing at all

    # An image with detections but no objects adds false positives to the others.
    evaluator = InstanceEvaluator()
    evaluator.update(0, gt, np.array([0.9]), np.array([1]), gt, np.array([1]))
    evaluator.update(1, gt, np.array([0.95]), np.array([1]), no_masks(), np.zeros(0, dtype=np.int64))
    assert evaluator.compute()["AP"] == pytest.approx(100 * 0.5)


def test_bad_inputs_raise_clear_errors():
    evaluator = InstanceEvaluator()
    gt = np.stack([box_mask(16, 16, 0, 0, 8, 8)])
    evaluator.update(7, gt, np.array([0.9]), np.array([1]), gt, np.array([1]))
    with pytest.raises(ValueError, match="image_id 7 was already added"):
        evaluator.update(7, gt, np.array([0.9]), np.array([1]), gt, np.array([1]))
    with pytest.raises(ValueError, match="2 scores"):
        evaluator.update(8, gt, np.array([0.9, 0.1]), np.array([1]), gt, np.array([1]))
    with pytest.raises(ValueError, match="pred masks are"):
        evaluator.update(9, no_masks(8, 8), np.zeros(0), np.zeros(0), gt, np.array([1]))


def _distributed_worker(rank: int, init_file: str, images: list, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = InstanceEvaluator(thing_class_ids=[1, 2, 3])
        for image in images[rank::2]:
            evaluator.update(*image)
        out[rank] = evaluator.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compute_gathers_images_from_every_rank(tmp_path):
    images = make_random_images()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), images, out), nprocs=2)
        per_rank = dict(out)
    single = InstanceEvaluator(thing_class_ids=[1, 2, 3])
    for image in images:
        single.update(*image)
    expected = single.compute()
    for rank in (0, 1):
        assert per_rank[rank] == pytest.approx(expected, nan_ok=True)
