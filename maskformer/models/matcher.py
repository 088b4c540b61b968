"""Bipartite (Hungarian) matching between predicted and ground-truth masks.

The cost of assigning query q to target t is
``cost_class * -p_q(c_t) + cost_mask * focal(m_q, m_t) + cost_dice * dice(m_q, m_t)``,
computed in fp32 for every (q, t) pair with two matrix products per image, then solved
with scipy's ``linear_sum_assignment``. As in the original, costs are computed at the mask
prediction resolution (stride 4) with the targets downsampled by nearest interpolation; the
optional point-sampled variant (Mask2Former) evaluates them at random points instead.

With deep supervision every decoder layer is matched independently (as the original does).
:meth:`HungarianMatcher.match_layers` computes the cost matrices of all layers of an image in one
batched computation on a GPU and moves all images' matrices to the CPU in one transfer, which is
what makes matching cheap there (the solver takes microseconds for 100 x N matrices); on a CPU it
goes layer by layer in cache-sized blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from maskformer.models.point_sampling import point_sample

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def batch_focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0, prob: torch.Tensor | None = None) -> torch.Tensor:
    """Mean sigmoid focal loss of every prediction against every target (a matching cost: no autograd).

    Args:
        logits: [..., Q, P] mask logits at P pixels (or points).
        targets: [N, P] binary masks at the same pixels, or [..., N, P] (one set per leading index).
        prob: ``logits.sigmoid()`` if the caller has it already.
    Returns:
        [..., Q, N] costs.
    """
    prob = logits.sigmoid() if prob is None else prob
    bce_pos, bce_neg = _bce_against_one_and_zero(logits)
    pos = (1 - prob).pow_(gamma).mul_(bce_pos).mul_(alpha)
    neg = prob.pow(gamma).mul_(bce_neg).mul_(1 - alpha)
    # pos @ t.T + neg @ (1 - t).T, with one product fewer.
    return (pos.sub_(neg) @ targets.transpose(-1, -2) + neg.sum(-1, keepdim=True)) / logits.shape[-1]


def batch_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction ([..., Q, P] logits) against every target
    ([N, P] or [..., N, P]) -> [..., Q, N]."""
    pos, neg = _bce_against_one_and_zero(logits)
    return (pos.sub_(neg) @ targets.transpose(-1, -2) + neg.sum(-1, keepdim=True)) / logits.shape[-1]


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor, prob: torch.Tensor | None = None) -> torch.Tensor:
    """Dice loss of every prediction ([..., Q, P] logits) against every target ([N, P] or
    [..., N, P]) -> [..., Q, N]. ``prob``: ``logits.sigmoid()`` if the caller has it already."""
    prob = logits.sigmoid() if prob is None else prob
    numerator = 2 * prob @ targets.transpose(-1, -2)
    denominator = prob.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _bce_against_one_and_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softplus(-x), softplus(x)), the BCE of logits x against 1 and against 0.

    As ``max(-x, 0) + log(1 + exp(-|x|))`` and ``max(x, 0) + log(1 + exp(-|x|))``: equal to
    ``F.softplus`` up to ~1e-7 absolute, and several times faster on CPUs, whose ``log1p`` is not
    vectorised. For matching only (in-place operations, no autograd).
    """
    log_term = x.abs().neg_().exp_().add_(1).log_()
    return x.neg().clamp_min_(0).add_(log_term), log_term.add_(x.clamp_min(0))


class HungarianMatcher(nn.Module):
    """Assign each ground-truth mask to one query, minimising the total matching cost.

    Args:
        cost_class, cost_mask, cost_dice: weights of the three costs (the original: 1, 20, 1).
        mask_cost: "focal" (the original) or "bce" (Mask2Former).
        num_points: 0 evaluates mask costs on the whole stride-4 map; > 0 on that many uniformly
            drawn points shared by all predictions and targets of an image and layer (Mask2Former).

    forward(outputs, targets) -> [(pred_idx int64 [n_i], tgt_idx int64 [n_i]) for each image]
        outputs: {"pred_logits": [B,Q,K+1], "pred_masks": [B,Q,h,w]}
        targets: [{"labels": int64 [N_i], "masks": [N_i,H,W]}] (H, W the padded input size)
    ``pred_idx`` is sorted; ``n_i = min(Q, N_i)``. The indices live on the CPU.
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
    def forward(self, outputs: dict, targets: list[dict]) -> Indices:
        return self.match(outputs["pred_logits"], outputs["pred_masks"], [t["labels"] for t in targets],
                          self.matching_masks(targets, outputs["pred_masks"].shape[-2:]))

    def matching_masks(self, targets: list[dict], size: tuple[int, int] | torch.Size) -> list[torch.Tensor]:
        """Each image's target masks as the cost needs them: at the prediction size ``size``
        (nearest), or as they are for point sampling. Done once for all decoder layers."""
        if self.num_points > 0:
            return [t["masks"] for t in targets]
        return [downsample_masks(t["masks"], size) for t in targets]

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor,
                    masks: torch.Tensor) -> torch.Tensor:
        """The [..., Q, N] cost matrices of one image, for any number of leading (layer) dimensions.

        Args:
            pred_logits: [..., Q, K+1]; pred_masks: [..., Q, h, w] logits; labels: [N];
            masks: [N, h, w] targets at the prediction size, or [N, H, W] at any size with point sampling.
        """
        with torch.autocast(pred_masks.device.type, enabled=False):
            prob = pred_logits.float().softmax(-1)
            cost_class = -prob[..., labels]
            if self.num_points > 0:
                out, tgt = self._sample_points(pred_masks.float(), masks.float())
            else:
                out = pred_masks.float().flatten(-2)
                tgt = masks.float().flatten(1)
            return self.cost_class * cost_class + self._mask_costs(out, tgt)

    def _mask_costs(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Weighted mask + dice costs: out [..., Q, P], tgt [N, P] or [..., N, P] -> [..., Q, N]."""
        if out.device.type != "cpu":
            return self._mask_costs_block(out, tgt)
        # On a CPU, a block of ~2^18 logits at a time keeps every intermediate in cache, which is
        # several times faster than whole-tensor passes. Rows (queries) are independent.
        lead = out.shape[:-2]
        out = out.reshape(-1, *out.shape[-2:])  # [L, Q, P]
        tgt = tgt.reshape(-1, *tgt.shape[-2:])  # [1 or L, N, P]
        rows = max(1, 2**18 // out.shape[-1])
        costs = [torch.cat([self._mask_costs_block(block, tgt[min(i, len(tgt) - 1)]) for block in layer.split(rows)])
                 for i, layer in enumerate(out)]
        return torch.stack(costs).reshape(*lead, *costs[0].shape)

    def _mask_costs_block(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        prob = out.sigmoid()
        if self.mask_cost == "focal":
            cost_mask = batch_focal_cost(out, tgt, self.focal_alpha, self.focal_gamma, prob=prob)
        else:
            cost_mask = batch_bce_cost(out, tgt)
        return self.cost_mask * cost_mask + self.cost_dice * batch_dice_cost(out, tgt, prob=prob)

    def _sample_points(self, pred_masks: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions [..., Q, h, w] and targets [N, H, W] at ``num_points`` random points, drawn
        independently for every leading index (layer) -> ([..., Q, P], [..., N, P])."""
        lead = pred_masks.shape[:-3]
        pred = pred_masks.reshape(-1, *pred_masks.shape[-3:])  # [L, Q, h, w]
        coords = torch.rand(pred.shape[0], self.num_points, 2, device=pred.device)
        out = point_sample(pred, coords)  # [L, Q, P]
        tgt = point_sample(masks[None].expand(pred.shape[0], -1, -1, -1), coords)  # [L, N, P]
        return out.reshape(*lead, *out.shape[-2:]), tgt.reshape(*lead, *tgt.shape[-2:])

    @torch.no_grad()
    def match(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: list[torch.Tensor],
              masks: list[torch.Tensor]) -> Indices:
        """Matching of one decoder layer with targets from :meth:`matching_masks`.

        Args: pred_logits [B,Q,K+1]; pred_masks [B,Q,h,w]; labels and masks: one entry per image.
        """
        return self.match_layers(pred_logits[None], pred_masks[None], labels, masks)[0]

    @torch.no_grad()
    def match_layers(self, pred_logits: torch.Tensor | Sequence[torch.Tensor],
                     pred_masks: torch.Tensor | Sequence[torch.Tensor], labels: list[torch.Tensor],
                     masks: list[torch.Tensor]) -> list[Indices]:
        """Independent matchings of L decoder layers, computed together.

        Args:
            pred_logits: [L,B,Q,K+1] (or a sequence of L [B,Q,K+1]);
            pred_masks: [L,B,Q,h,w] (or a sequence of L [B,Q,h,w]);
            labels, masks: one entry per image, masks from :meth:`matching_masks`.
        Returns:
            [L] lists of [B] ``(pred_idx, tgt_idx)`` pairs.
        """
        num_layers, batch = len(pred_masks), pred_masks[0].shape[0]
        on_cpu = pred_masks[0].device.type == "cpu"
        costs = []  # per image with targets: [L, Q, N_b]
        for b in range(batch):
            if labels[b].numel() == 0:
                continue
            if on_cpu:
                # Layer by layer (each in cache-sized blocks): no [L, Q, h, w] copy to allocate.
                costs.append(torch.stack([self.cost_matrix(logits[b], layer_masks[b], labels[b], masks[b])
                                          for logits, layer_masks in zip(pred_logits, pred_masks)]))
            else:
                # All layers of an image in one batched computation.
                costs.append(self.cost_matrix(torch.stack([logits[b] for logits in pred_logits]),
                                              torch.stack([layer_masks[b] for layer_masks in pred_masks]),
                                              labels[b], masks[b]))
        # All images' matrices in one device -> host copy.
        host = torch.cat([c.flatten() for c in costs]).cpu().split([c.numel() for c in costs]) if costs else []
        host_costs = iter(h.view(c.shape) for h, c in zip(host, costs))
        empty = torch.empty(0, dtype=torch.int64)
        indices: list[Indices] = [[] for _ in range(num_layers)]
        for b in range(batch):
            if labels[b].numel() == 0:
                for layer in indices:
                    layer.append((empty, empty.clone()))
                continue
            cost = next(host_costs)
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "matching cost contains NaN or inf: the model produced non-finite logits "
                    f"(image {b} of the batch)")
            for layer, layer_cost in zip(indices, cost.numpy()):
                rows, cols = linear_sum_assignment(layer_cost)
                layer.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
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
