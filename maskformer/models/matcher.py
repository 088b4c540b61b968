"""Bipartite (Hungarian) matching between predicted and ground-truth masks.

The cost of assigning query q to target t is
``cost_class * -p_q(c_t) + cost_mask * focal(m_q, m_t) + cost_dice * dice(m_q, m_t)``,
computed in fp32 for every (q, t) pair with two matrix products per image, then solved
with scipy's ``linear_sum_assignment``. As in the original, costs are computed at the mask
prediction resolution (stride 4) with the targets downsampled by nearest interpolation; the
optional point-sampled variant (Mask2Former) evaluates them at random points instead.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from maskformer.models.point_sampling import point_sample


def batch_focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """Mean sigmoid focal loss of every prediction against every target.

    Args:
        logits: [Q, P] mask logits at P pixels (or points).
        targets: [N, P] binary masks at the same pixels.
    Returns:
        [Q, N] costs.
    """
    prob = logits.sigmoid()
    # BCE-with-logits against 1 and against 0 are softplus(-x) and softplus(x).
    pos = alpha * (1 - prob) ** gamma * F.softplus(-logits)
    neg = (1 - alpha) * prob ** gamma * F.softplus(logits)
    # pos @ t.T + neg @ (1 - t).T, with one product fewer.
    return ((pos - neg) @ targets.T + neg.sum(1, keepdim=True)) / logits.shape[1]


def batch_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction ([Q, P] logits) against every target ([N, P]) -> [Q, N]."""
    pos = F.softplus(-logits)
    neg = F.softplus(logits)
    return ((pos - neg) @ targets.T + neg.sum(1, keepdim=True)) / logits.shape[1]


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction ([Q, P] logits) against every target ([N, P]) -> [Q, N]."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(1)[:, None] + targets.sum(1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Assign each ground-truth mask to one query, minimising the total matching cost.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three costs (the original: 1, 20, 1).
        mask_cost: "focal" (the original) or "bce" (Mask2Former).
        num_points: 0 evaluates mask costs on the whole stride-4 map; > 0 on that many uniformly
            drawn points shared by all predictions and targets of an image (Mask2Former).

    forward(outputs, targets) -> [(pred_idx int64 [n_i], tgt_idx int64 [n_i]) for each image]
        outputs: {"pred_logits": [B,Q,K+1], "pred_masks": [B,Q,h,w]}
        targets: [{"labels": int64 [N_i], "masks": [N_i,H,W]}] (H, W the padded input size)
    ``pred_idx`` is sorted; ``n_i = min(Q, N_i)``.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 20.0, cost_dice: float = 1.0,
                 mask_cost: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 num_points: int = 0):
        super().__init__()
        if mask_cost not in ("focal", "bce"):
            raise ValueError(f"mask_cost must be 'focal' or 'bce', got {mask_cost!r}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.mask_cost = mask_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        size = outputs["pred_masks"].shape[-2:]
        if self.num_points > 0:
            target_masks = [t["masks"] for t in targets]
        else:
            target_masks = [downsample_masks(t["masks"], size) for t in targets]
        return self.match(outputs["pred_logits"], outputs["pred_masks"], [t["labels"] for t in targets],
                          target_masks)

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor) -> torch.Tensor:
        """The [Q, N] cost matrix of one image.

        Args:
            pred_logits: [Q, K+1]; pred_masks: [Q, h, w] logits; labels: [N];
            masks: [N, h, w] targets at the prediction size, or [N, H, W] at any size with point sampling.
        """
        with torch.autocast(pred_masks.device.type, enabled=False):
            prob = pred_logits.float().softmax(-1)
            cost_class = -prob[:, labels]
            if self.num_points > 0:
                coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
                out = point_sample(pred_masks[:, None].float(), coords.expand(pred_masks.shape[0], -1, -1))[:, 0]
                tgt = point_sample(masks[:, None].float(), coords.expand(masks.shape[0], -1, -1))[:, 0]
            else:
                out = pred_masks.float().flatten(1)
                tgt = masks.float().flatten(1)
            if self.mask_cost == "focal":
                cost_mask = batch_focal_cost(out, tgt, self.focal_alpha, self.focal_gamma)
            else:
                cost_mask = batch_bce_cost(out, tgt)
            cost_dice = batch_dice_cost(out, tgt)
            return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def match(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: list[torch.Tensor],
              masks: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Matching with targets already at the prediction size (the criterion downsamples once for
        all decoder layers). Shapes as in :meth:`cost_matrix`, batched over a list."""
        indices = []
        for b in range(pred_logits.shape[0]):
            if labels[b].numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels[b], masks[b]).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "matching cost contains NaN or inf: the model produced non-finite logits "
                    f"(image {b} of the batch)")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def downsample_masks(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize of binary masks [N, H, W] -> [N, h, w] (float)."""
    if masks.shape[-2:] == tuple(size):
        return masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    return F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0]


class FixedMatcher(nn.Module):
    """The paper's "fixed matching" ablation: query i predicts class i (needs Q == K).

    Each target of class c is assigned to query c; with semantic targets there is at most one
    target per class, so the assignment is a direct index (no optimisation).

    forward(outputs, targets) -> [(pred_idx, tgt_idx)] as :class:`HungarianMatcher`.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        num_queries = outputs["pred_logits"].shape[1]
        if num_queries != self.num_classes:
            raise ValueError(f"fixed matching needs one query per class: {num_queries} queries, "
                             f"{self.num_classes} classes")
        indices = []
        for t in targets:
            labels = t["labels"].cpu()
            if labels.unique().numel() != labels.numel():
                raise ValueError("fixed matching needs at most one target per class (semantic targets); "
                                 f"got labels {labels.tolist()}")
            order = labels.argsort()
            indices.append((labels[order].to(torch.int64), order.to(torch.int64)))
        return indices
