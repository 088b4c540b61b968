"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) from a confusion matrix.

The numbers follow detectron2's ``SemSegEvaluator`` (the evaluator behind every MaskFormer semantic result):

* pixels whose ground truth equals ``ignore_label`` are left out entirely;
* ``ACC_c = TP_c / GT_c`` and ``IoU_c = TP_c / (GT_c + Pred_c - TP_c)`` exist only for classes with ``GT_c > 0``;
  classes without ground-truth pixels get NaN and are left out of every mean, even when they were
  predicted (their false-positive pixels still lower the IoU of the classes they were taken from);
* ``mIoU`` / ``mACC`` are plain means over those classes, ``fwIoU = sum_c IoU_c * GT_c / sum GT`` and
  ``pACC = sum TP / sum GT``; everything is reported in percent.

Older detectron2 releases (2021) divided the summed IoU by the number of classes present in the ground truth
*or* the prediction, i.e. a predicted-but-absent class counted as IoU 0. On full validation sets where every
class occurs in the ground truth (ADE20K-150, Cityscapes, ...) the two rules give the same number.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from maskformer.distributed import all_reduce_sum, is_distributed

ArrayLike = Union[torch.Tensor, np.ndarray]


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` summed over all ranks, on its original device.

    NCCL reduces only CUDA tensors, so a CPU tensor is moved to this rank's GPU for the reduction.
    """
    if not is_distributed():
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        tensor = tensor.clone()
    return all_reduce_sum(tensor).to(device)


def _as_label_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    """Integer map (numpy or torch, any integer dtype) -> int64 tensor, keeping a tensor's device."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"{what} must hold integer class ids, got a numpy array of dtype {x.dtype}")
        # uint16/uint32 maps (ADE20K-Full TIFFs) have no general torch counterpart: widen in numpy first.
        return torch.from_numpy(x.astype(np.int64, copy=False))
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(
                f"{what} must hold integer class ids, got a tensor of dtype {x.dtype} "
                "(take argmax over the class dimension of score maps first)"
            )
        return x.long()
    raise TypeError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


class SemSegEvaluator:
    """Accumulates a ``[K, K]`` int64 confusion matrix (rows: ground truth, columns: prediction).

    Args:
        num_classes: K; valid class ids are ``0..K-1``.
        ignore_label: ground-truth value excluded from evaluation (255, 65535 for ADE20K-Full, 65 for
            Mapillary Vistas where it equals K). Any other ground-truth value outside ``[0, K)`` is an error.
        class_names: K names used in the per-class keys; default ``"0".."K-1"``.
        device: where the matrix lives. None: the device of the first prediction given to :meth:`update`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} is a valid class id for num_classes={num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries, expected num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.class_names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
        self.device = None if device is None else torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None
        if self.device is not None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one image ``[H, W]`` or a batch ``[B, H, W]`` of predicted and ground-truth class ids."""
        pred = _as_label_tensor(pred, "pred")
        target = _as_label_tensor(target, "target")
        if pred.shape != target.shape or pred.dim() not in (2, 3):
            raise ValueError(
                f"pred and target must both be [H, W] or [B, H, W] with the same shape, "
                f"got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
            )
        if self.confusion is None:
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=pred.device)
        pred = pred.to(self.confusion.device)
        target = target.to(self.confusion.device)
        k = self.num_classes

        if pred.numel() == 0:
            return
        pred_min, pred_max = torch.aminmax(pred)
        if pred_min < 0 or pred_max >= k:
            bad = pred_min.item() if pred_min < 0 else pred_max.item()
            raise ValueError(f"pred contains class id {bad}, outside [0, {k}) for num_classes={k}")
        keep = target != self.ignore_label
        gt_min, gt_max = torch.aminmax(torch.where(keep, target, 0))
        if gt_min < 0 or gt_max >= k:
            bad = gt_min.item() if gt_min < 0 else gt_max.item()
            raise ValueError(
                f"target contains label {bad}, which is neither a class id in [0, {k}) "
                f"nor ignore_label={self.ignore_label}"
            )
        # Ignored pixels go to an overflow bin that is dropped, which avoids a slow boolean gather.
        index = torch.where(keep, target * k + pred, k * k)
        counts = torch.bincount(index.flatten(), minlength=k * k + 1)[: k * k]
        self.confusion += counts.view(k, k)

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen by every rank (percent; NaN where undefined)."""
        k = self.num_classes
        confusion = self.confusion
        if confusion is None:
            confusion = torch.zeros(k, k, dtype=torch.int64)
        confusion = sum_across_ranks(confusion).cpu().numpy().astype(np.float64)

        tp = np.diag(confusion)
        gt = confusion.sum(1)
        predicted = confusion.sum(0)
        union = gt + predicted - tp
        valid = gt > 0  # implies union > 0
        acc = np.full(k, np.nan)
        iou = np.full(k, np.nan)
        acc[valid] = tp[valid] / gt[valid]
        iou[valid] = tp[valid] / union[valid]

        total = gt.sum()
        if valid.any():
            miou = iou[valid].mean()
            macc = acc[valid].mean()
            fwiou = (iou[valid] * gt[valid]).sum() / total
            pacc = tp.sum() / total
        else:
            miou = macc = fwiou = pacc = float("nan")

        results = {"mIoU": 100 * float(miou), "fwIoU": 100 * float(fwiou)}
        for name, value in zip(self.class_names, iou):
            results[f"IoU-{name}"] = 100 * float(value)
        results["mACC"] = 100 * float(macc)
        results["pACC"] = 100 * float(pacc)
        for name, value in zip(self.class_names, acc):
            results[f"ACC-{name}"] = 100 * float(value)
        return results
