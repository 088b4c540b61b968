"""SemSegEvaluator against torchmetrics and against a direct per-class numpy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassJaccardIndex

from maskformer.evaluation import SemSegEvaluator


def direct_metrics(preds: list[np.ndarray], targets: list[np.ndarray], k: int, ignore: int) -> dict[str, float]:
    """detectron2's rule written out class by class with boolean masks (no confusion matrix)."""
    pred = np.concatenate([p.ravel() for p in preds]).astype(np.int64)
    target = np.concatenate([t.ravel() for t in targets]).astype(np.int64)
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    iou, acc, weight = {}, {}, {}
    for c in range(k):
        in_gt, in_pred = target == c, pred == c
        if in_gt.sum() == 0:
            continue
        tp = (in_gt & in_pred).sum()
        iou[c] = tp / (in_gt | in_pred).sum()
        acc[c] = tp / in_gt.sum()
        weight[c] = in_gt.sum() / len(target)
    return {
        "mIoU": 100 * np.mean(list(iou.values())),
        "mACC": 100 * np.mean(list(acc.values())),
        "fwIoU": 100 * sum(iou[c] * weight[c] for c in iou),
        "pACC": 100 * (pred == target).mean(),
        "iou": {c: 100 * v for c, v in iou.items()},
        "acc": {c: 100 * v for c, v in acc.items()},
    }


def random_pair(rng: np.random.Generator, shape, k: int, ignore: int, dtype=np.int64, ignore_fraction=0.2):
    target = rng.integers(0, k, size=shape).astype(dtype)
    target[rng.random(shape) < ignore_fraction] = ignore
    # Mostly right predictions so IoUs are spread out rather than all near 1/k.
    pred = np.where(rng.random(shape) < 0.6, np.where(target == ignore, 0, target), rng.integers(0, k, size=shape))
    return pred.astype(dtype), target


@pytest.mark.parametrize(
    "k, ignore, dtype",
    [(7, 255, np.uint8), (847, 65535, np.uint16), (65, 65, np.uint8)],
    ids=["ade150-like", "ade-full-uint16", "mapillary-ignore-equals-K"],
)
def test_matches_torchmetrics_when_every_predicted_class_is_in_the_ground_truth(k, ignore, dtype):
    rng = np.random.default_rng(0)
    shape = (3, 40, 50) if k < 100 else (2, 60, 80)
    evaluator = SemSegEvaluator(num_classes=k, ignore_label=ignore)
    reference_macro = MulticlassJaccardIndex(num_classes=k, ignore_index=ignore, average="macro")
    reference_none = MulticlassJaccardIndex(num_classes=k, ignore_index=ignore, average="none")
    seen: set[int] = set()
    for step in range(2):
        pred, target = random_pair(rng, shape, k, ignore, dtype)
        # Restrict predictions to ground-truth classes, where torchmetrics and detectron2 agree.
        present = np.unique(target[target != ignore])
        pred = np.where(np.isin(pred, present), pred, present[0]).astype(dtype)
        seen.update(present.tolist())
        p, t = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
        # numpy input (uint8/uint16) on the first step, torch int64 on the second: both must be accepted.
        if step == 0:
            evaluator.update(pred, target)
        else:
            evaluator.update(p, t)
        reference_macro.update(p, t)
        reference_none.update(p, t)
    results = evaluator.compute()
    assert results["mIoU"] == pytest.approx(100 * reference_macro.compute().item(), abs=1e-4)
    per_class = reference_none.compute()
    for c in range(k):
        if c in seen:
            assert results[f"IoU-{c}"] == pytest.approx(100 * per_class[c].item(), abs=1e-4)
        else:
            assert math.isnan(results[f"IoU-{c}"])


def test_predicted_class_absent_from_ground_truth_is_left_out_of_the_mean():
    rng = np.random.default_rng(1)
    k, ignore = 5, 255
    pred, target = random_pair(rng, (2, 30, 30), k, ignore)
    target[target == 3] = 1  # class 3 never in the ground truth...
    pred[0, :5, :5] = 3  # ...but predicted
    evaluator = SemSegEvaluator(num_classes=k, ignore_label=ignore)
    evaluator.update(pred, target)
    results = evaluator.compute()
    expected = direct_metrics([pred], [target], k, ignore)
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert results[key] == pytest.approx(expected[key], rel=1e-12)
    assert math.isnan(results["IoU-3"]) and math.isnan(results["ACC-3"])
    # torchmetrics counts the predicted-only class as IoU 0, so it must come out lower here.
    reference = MulticlassJaccardIndex(num_classes=k, ignore_index=ignore, average="macro")
    lower = 100 * reference(torch.from_numpy(pred), torch.from_numpy(target)).item()
    assert lower == pytest.approx(results["mIoU"] * 4 / 5, abs=1e-4)


def test_all_metrics_match_direct_computation_over_several_updates():
    rng = np.random.default_rng(2)
    k, ignore = 6, 255
    names = [f"class{c}" for c in range(k)]
    evaluator = SemSegEvaluator(num_classes=k, ignore_label=ignore, class_names=names)
    preds, targets = [], []
    for _ in range(4):
        pred, target = random_pair(rng, (1, 25, 35), k, ignore)
        target[target == 5] = ignore  # a class with no ground truth at all
        evaluator.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    results = evaluator.compute()
    expected = direct_metrics(preds, targets, k, ignore)
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert results[key] == pytest.approx(expected[key], rel=1e-12)
    for c in range(5):
        assert results[f"IoU-class{c}"] == pytest.approx(expected["iou"][c], rel=1e-12)
        assert results[f"ACC-class{c}"] == pytest.approx(expected["acc"][c], rel=1e-12)
    assert math.isnan(results["IoU-class5"]) and math.isnan(results["ACC-class5"])
    assert set(results) == {"mIoU", "fwIoU", "mACC", "pACC"} | {f"{m}-{n}" for m in ("IoU", "ACC") for n in names}

    evaluator.reset()
    evaluator.update(targets[0].clip(0, k - 1), targets[0])
    assert evaluator.compute()["mIoU"] == pytest.approx(100.0)


def test_ignored_pixels_do_not_count_whatever_is_predicted_there():
    rng = np.random.default_rng(3)
    k = 4
    pred, target = random_pair(rng, (20, 20), k, 255)
    other = pred.copy()
    other[target == 255] = rng.integers(0, k, size=int((target == 255).sum()))
    a, b = SemSegEvaluator(k), SemSegEvaluator(k)
    a.update(pred, target)
    b.update(other, target)
    assert a.confusion.equal(b.confusion)
    assert int(a.confusion.sum()) == int((target != 255).sum())

    empty = SemSegEvaluator(k)
    empty.update(pred, np.full_like(target, 255))
    assert all(math.isnan(v) for v in empty.compute().values())


def test_invalid_values_raise_clear_errors():
    evaluator = SemSegEvaluator(num_classes=3, ignore_label=255)
    target = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="class id 3"):
        evaluator.update(torch.full((4, 4), 3), target)
    with pytest.raises(ValueError, match="class id -1"):
        evaluator.update(torch.full((4, 4), -1), target)
    bad_target = target.clone()
    bad_target[0, 0] = 7
    with pytest.raises(ValueError, match="label 7"):
        evaluator.update(torch.zeros(4, 4, dtype=torch.long), bad_target)
    with pytest.raises(TypeError, match="argmax"):
        evaluator.update(torch.zeros(4, 4), target)
    with pytest.raises(ValueError, match="same shape"):
        evaluator.update(torch.zeros(4, 5, dtype=torch.long), target)
    with pytest.raises(ValueError, match="ignore_label"):
        SemSegEvaluator(num_classes=3, ignore_label=2)
    # Nothing was accumulated by the failed updates.
    assert evaluator.confusion is None or int(evaluator.confusion.sum()) == 0


def _distributed_worker(rank: int, init_file: str, preds: np.ndarray, targets: np.ndarray, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = SemSegEvaluator(num_classes=5, ignore_label=255)
        evaluator.update(preds[rank::2], targets[rank::2])
        out[rank] = evaluator.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compute_sums_the_confusion_matrix_over_ranks(tmp_path):
    rng = np.random.default_rng(4)
    preds, targets = random_pair(rng, (4, 16, 16), 5, 255)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), preds, targets, out), nprocs=2)
        per_rank = dict(out)
    single = SemSegEvaluator(num_classes=5, ignore_label=255)
    single.update(preds, targets)
    expected = single.compute()
    for rank in (0, 1):
        assert per_rank[rank] == pytest.approx(expected, nan_ok=True)
