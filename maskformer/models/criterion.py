"""The MaskFormer set loss (DETR's ``SetCriterion`` with mask losses).

After matching, every query is supervised with a classification loss (matched queries toward
their target's class, the rest toward "no object", down-weighted by ``eos_coef``), and every
matched query's mask with a sigmoid focal loss and a dice loss. Mask losses are summed over
matched masks and divided by the number of target masks averaged over processes. With deep
supervision the same losses (re-matched) apply to every decoder layer, suffixed ``_0``, ``_1``, ...
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from maskformer.distributed import all_reduce_sum, get_world_size
from maskformer.models.matcher import HungarianMatcher, downsample_masks
from maskformer.models.point_sampling import point_sample, uncertain_point_coords


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of ``1 - (2|p*t| + 1) / (|p| + |t| + 1)``, divided by ``num_masks``.

    Args:
        logits: [M, P] mask logits; targets: [M, P] binary masks.
    """
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    """Matching + losses for MaskFormer outputs.

    Args:
        num_classes: K (without no-object).
        matcher: a :class:`HungarianMatcher` (or :class:`FixedMatcher`).
        weight_dict: loss name -> weight, including the ``_i`` auxiliary names; used by :meth:`total_loss`.
        eos_coef: weight of the no-object class in the classification loss (0.1).
        losses: which loss groups to compute: "labels" (``loss_ce``) and/or "masks" (``loss_mask``, ``loss_dice``).
        mask_loss: "focal" (the original, with ``focal_alpha``/``focal_gamma``) or "bce" (Mask2Former).
        num_points: 0 computes mask losses on the predictions upsampled to the padded input size (the
            original); > 0 on that many points per mask, chosen by uncertainty (Mask2Former), which
            avoids materialising full-resolution masks.

    forward(outputs, targets) -> {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", ...} (unweighted)
        outputs: {"pred_logits": [B,Q,K+1], "pred_masks": [B,Q,h,w], "aux_outputs": [...] (optional)}
        targets: [{"labels": int64 [N_i], "masks": [N_i,H,W] (0/1, zero-padded to the batch size)}]
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict[str, float], eos_coef: float = 0.1,
                 losses: tuple[str, ...] = ("labels", "masks"), mask_loss: str = "focal", focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, num_points: int = 0, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"unknown loss groups {sorted(unknown)}; choose from 'labels', 'masks'")
        if mask_loss not in ("focal", "bce"):
            raise ValueError(f"mask_loss must be 'focal' or 'bce', got {mask_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = tuple(losses)
        self.mask_loss = mask_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # ----------------------------------------------------------------------------------------
    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_masks: float) -> dict:
        logits = outputs["pred_logits"].float()  # [B, Q, K+1]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        batch_idx, query_idx = _prediction_index(indices)
        matched = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes[batch_idx, query_idx] = matched
        # A weighted mean over all B*Q queries (not divided by num_masks), as the original. Under DDP
        # the weight total is averaged over processes so that N processes train exactly like one
        # process with the N-times larger batch (the original divides by each process's own total).
        nll = F.cross_entropy(logits.transpose(1, 2), target_classes, reduction="none")  # [B, Q]
        weights = self.empty_weight.to(logits.dtype)[target_classes]
        total_weight = all_reduce_sum(weights.sum().detach().clone()) / get_world_size()
        return {"loss_ce": (weights * nll).sum() / total_weight}

    def loss_masks(self, outputs: dict, targets: list[dict], indices: list, num_masks: float) -> dict:
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = _prediction_index(indices)
        src = pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)].float()  # [M, h, w]
        if src.shape[0] == 0:
            # Keep the graph connected so every parameter still receives a (zero) gradient.
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)]).to(src.device, torch.float32)

        if self.num_points > 0:
            with torch.no_grad():
                coords = uncertain_point_coords(src[:, None], self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio)
                tgt = point_sample(tgt[:, None], coords)[:, 0]
            src = point_sample(src[:, None], coords)[:, 0]  # [M, P]
        else:
            # The original computes mask losses at the padded input resolution.
            src = F.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)
            src, tgt = src.flatten(1), tgt.flatten(1)

        if self.mask_loss == "focal":
            per_pixel = sigmoid_focal_loss(src, tgt, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        else:
            per_pixel = F.binary_cross_entropy_with_logits(src, tgt, reduction="none")
        return {"loss_mask": per_pixel.mean(1).sum() / num_masks, "loss_dice": dice_loss(src, tgt, num_masks)}

    # ----------------------------------------------------------------------------------------
    def num_masks(self, targets: list[dict], device: torch.device) -> float:
        """Target masks in the batch, averaged over processes, at least 1."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        count = all_reduce_sum(count) / get_world_size()
        return max(count.item(), 1.0)

    def _layer_losses(self, outputs: dict, targets: list[dict], matching_masks: list[torch.Tensor] | None,
                      num_masks: float, suffix: str) -> dict:
        labels = [t["labels"] for t in targets]
        if matching_masks is None:
            indices = self.matcher(outputs, targets)
        else:
            indices = self.matcher.match(outputs["pred_logits"], outputs["pred_masks"], labels, matching_masks)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_masks))
        if "masks" in self.losses:
            losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        with torch.autocast(device.type, enabled=False):
            targets = _pad_target_masks(targets)
            num_masks = self.num_masks(targets, device)
            # Downsample targets for matching once, not once per decoder layer.
            matching_masks = None
            if isinstance(self.matcher, HungarianMatcher) and self.matcher.num_points == 0:
                size = outputs["pred_masks"].shape[-2:]
                matching_masks = [downsample_masks(t["masks"], size).to(device) for t in targets]
            losses = self._layer_losses(outputs, targets, matching_masks, num_masks, "")
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update(self._layer_losses(aux, targets, matching_masks, num_masks, f"_{i}"))
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses present in ``weight_dict`` (others are ignored)."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


def _prediction_index(indices: list) -> tuple[torch.Tensor, torch.Tensor]:
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def _pad_target_masks(targets: list[dict]) -> list[dict]:
    """Zero-pad every image's target masks to the largest size in the batch (usually a no-op)."""
    sizes = {tuple(t["masks"].shape[-2:]) for t in targets}
    if len(sizes) <= 1:
        return targets
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    out = []
    for t in targets:
        masks = t["masks"]
        padded = masks.new_zeros((masks.shape[0], height, width))
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        out.append({**t, "masks": padded})
    return out


def build_weight_dict(class_weight: float, mask_weight: float, dice_weight: float, dec_layers: int,
                      deep_supervision: bool) -> dict[str, float]:
    """{"loss_ce", "loss_mask", "loss_dice"} weights plus their ``_i`` copies for the auxiliary layers."""
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    weights = dict(base)
    if deep_supervision:
        for i in range(dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights
