"""The MaskFormer set loss (DETR's ``SetCriterion`` with mask losses).

After matching, every query is supervised with a classification loss (matched queries toward
their target's class, the rest toward "no object", down-weighted by ``eos_coef``), and every
matched query's mask with a sigmoid focal loss and a dice loss. Mask losses are summed over
matched masks and divided by the number of target masks averaged over processes. With deep
supervision the same losses (re-matched) apply to every decoder layer, suffixed ``_0``, ``_1``, ...
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from maskformer.distributed import all_reduce_sum, get_world_size
from maskformer.models.matcher import HungarianMatcher
from maskformer.models.point_sampling import point_sample, uncertain_point_coords


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2|p*t| + 1) / (|p| + |t| + 1)`` of each mask: logits, targets [M, P] -> [M]."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Sum over masks of :func:`dice_loss_per_mask`, divided by ``num_masks``.

    Args:
        logits: [M, P] mask logits; targets: [M, P] binary masks.
    """
    return dice_loss_per_mask(logits, targets).sum() / num_masks


def binary_cross_entropy_with_logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-element BCE as ``log(1 + exp(-|x|)) + (1 - t) max(x, 0) + t max(-x, 0)``.

    Every term is >= 0 for targets in [0, 1], so nothing cancels. It equals
    ``F.binary_cross_entropy_with_logits`` to ~1 ulp (plus <= 6e-8 absolute from ``log(1 + e)`` in
    place of ``log1p(e)``) and is several times faster on CPUs, where ``log1p`` is not vectorised.
    """
    log_term = x.abs().neg_().exp_().add_(1).log_()
    return log_term.add_(torch.lerp(x.clamp_min(0), x.neg().clamp_min_(0), t))


class MaskLosses(torch.autograd.Function):
    """Per-mask sigmoid focal (or BCE) loss and dice loss, a few masks at a time.

    ``apply(logits, targets, target_index, size, focal, alpha, gamma) -> (mask_loss [M], dice [M])``

    Args:
        logits: [M, h, w] mask logits, bilinearly upsampled (align_corners=False) to ``size``
            first, or [M, P] logits at P points (``size`` None).
        targets: [T, *size] (or [T, P]) 0/1 masks; mask m is compared with ``targets[target_index[m]]``.
        focal: sigmoid focal loss (``alpha``, ``gamma``) if True, else plain BCE.
    Returns:
        the mean over pixels of the focal/BCE loss of each mask, and each mask's dice loss
        ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(upsampled logits)``.

    The values are those of the plain formulas (torchvision's ``sigmoid_focal_loss`` and the dice
    above), but nothing of pixel size is kept for backward: the backward pass recomputes each chunk
    and applies the closed-form gradients. On CPUs each chunk stays in cache, which makes the loss
    several times faster than the composition of ~20 element-wise operations; everywhere it avoids
    storing those operations' full-resolution outputs (gigabytes with deep supervision).

    Gradients, with ``p_t = p t + (1 - p)(1 - t)``, ``m = 1 - p_t``, ``alpha_t = alpha t + (1 - alpha)(1 - t)``:
      focal: ``d/dx [alpha_t m^gamma ce] = alpha_t m^(gamma-1) (m (p - t) - gamma p (1 - p)(2t - 1) ce)``;
      BCE: ``p - t``;  dice: ``d/dx [1 - N/D] = p (1 - p) (N - 2 t D) / D^2``.
    """

    @staticmethod
    def forward(ctx, logits, targets, target_index, size, focal, alpha, gamma):
        mask_loss, numerator, denominator = (logits.new_empty(logits.shape[0]) for _ in range(3))
        for rows in _chunks(logits, size):
            x = _upsample(logits[rows], size)
            t = targets[target_index[rows]].flatten(1).to(x.dtype)
            p = x.sigmoid()
            ce = binary_cross_entropy_with_logits(x, t)
            if focal:
                ce.mul_(_one_minus_pt(p, t).pow_(gamma)).mul_(_alpha_t(t, alpha))
            mask_loss[rows] = ce.mean(1)
            numerator[rows] = 2 * (p * t).sum(1) + 1
            denominator[rows] = p.sum(1) + t.sum(1) + 1
        dice = 1 - numerator / denominator
        ctx.save_for_backward(logits, targets, target_index, numerator, denominator)
        ctx.size, ctx.focal, ctx.alpha, ctx.gamma = size, focal, alpha, gamma
        return mask_loss, dice

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mask_loss, grad_dice):
        logits, targets, target_index, numerator, denominator = ctx.saved_tensors
        size, alpha, gamma = ctx.size, ctx.alpha, ctx.gamma
        grad_logits = torch.empty_like(logits)
        for rows in _chunks(logits, size):
            x = _upsample(logits[rows], size)
            t = targets[target_index[rows]].flatten(1).to(x.dtype)
            p = x.sigmoid()
            dp = p * (1 - p)  # d sigmoid / dx
            if ctx.focal and gamma != 0:
                m = _one_minus_pt(p, t)
                ce = binary_cross_entropy_with_logits(x, t)
                grad = (2 * t - 1).mul_(dp).mul_(ce).mul_(-gamma).add_(m * (p - t))
                grad.mul_(m.pow_(gamma - 1)).mul_(_alpha_t(t, alpha))
            elif ctx.focal:
                grad = (p - t).mul_(_alpha_t(t, alpha))
            else:
                grad = p - t
            grad.mul_((grad_mask_loss[rows] / x.shape[1])[:, None])
            num, den = numerator[rows, None], denominator[rows, None]
            grad.add_((num - 2 * t * den).mul_(dp).mul_((grad_dice[rows] / den[:, 0].square())[:, None]))
            grad_logits[rows] = grad if size is None else _upsample_backward(grad, logits.shape[-2:], size)
        return grad_logits, None, None, None, None, None, None


def _chunks(logits: torch.Tensor, size: tuple[int, int] | None) -> list[slice]:
    # 2^19 values (2 MB in fp32) per full-resolution intermediate on CPUs, so that a chunk's dozen
    # intermediates stay in cache; GPUs prefer few large launches.
    pixels = logits[0].numel() if size is None else size[0] * size[1]
    budget = 2**19 if logits.device.type == "cpu" else 2**25
    step = max(1, budget // max(pixels, 1))
    return [slice(i, i + step) for i in range(0, logits.shape[0], step)]


def _upsample(logits: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    if size is None:
        return logits
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False).flatten(1)


def _upsample_backward(grad: torch.Tensor, low: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Gradient of :func:`_upsample` ([c, H*W] -> [c, h, w]). Bilinear resizing is separable,
    ``up(X) = A_h X A_w^T``, so its gradient is ``A_h^T G A_w``: two small matrix products, about
    twice as fast on CPUs as ``upsample_bilinear2d_backward``."""
    a_h = _interpolation_matrix(low[0], size[0], grad.device, grad.dtype)  # [H, h]
    a_w = _interpolation_matrix(low[1], size[1], grad.device, grad.dtype)  # [W, w]
    return a_h.T @ grad.view(-1, *size) @ a_w


@functools.lru_cache(maxsize=16)
def _interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n_out, n_in]: 1-D bilinear resizing (align_corners=False) as a matrix, made by resizing the identity."""
    eye = torch.eye(n_in, device=device, dtype=dtype)[:, None, :, None]  # n_in maps of size [n_in, 1]
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


def _one_minus_pt(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (p * t).mul_(-2).add_(p).add_(t)  # 1 - (p t + (1 - p)(1 - t))


def _alpha_t(t: torch.Tensor, alpha: float) -> torch.Tensor:
    return t * (2 * alpha - 1) + (1 - alpha)  # alpha t + (1 - alpha)(1 - t)


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
        return self.loss_masks_layers([outputs], targets, [indices], num_masks, [""])

    def loss_masks_layers(self, layers: list[dict], targets: list[dict], indices: list[list], num_masks: float,
                          suffixes: list[str]) -> dict:
        """Focal/BCE and dice losses of several decoder layers, computed as one batch of masks.

        Every layer's loss is still its own sum over its matched masks (``loss_mask`` + suffix, ...);
        batching only replaces L small upsampling/loss computations by one large one.
        """
        offsets = torch.tensor([0] + [len(t["masks"]) for t in targets]).cumsum(0).tolist()
        srcs, tgt_index, counts = [], [], []
        for outputs, layer_indices in zip(layers, indices):
            pred_masks = outputs["pred_masks"]
            batch_idx, query_idx = _prediction_index(layer_indices)
            srcs.append(pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)])  # [M_l, h, w]
            tgt_index.extend(j + offset for (_, j), offset in zip(layer_indices, offsets))
            counts.append(len(batch_idx))
        losses = {}
        if sum(counts) == 0:
            for outputs, suffix in zip(layers, suffixes):
                # Keep the graph connected so every parameter still receives a (zero) gradient.
                zero = outputs["pred_masks"].float().sum() * 0.0
                losses.update({"loss_mask" + suffix: zero, "loss_dice" + suffix: zero.clone()})
            return losses
        src = torch.cat(srcs).float()  # [M, h, w], M matched masks over all layers
        # One stacked copy of the targets; each matched mask refers to its row by index.
        all_targets = torch.cat([t["masks"] for t in targets]).to(src.device)  # [T, H, W]
        target_index = torch.cat(tgt_index).to(src.device)  # [M]
        if self.num_points > 0:
            with torch.no_grad():
                coords = uncertain_point_coords(src[:, None], self.num_points, self.oversample_ratio,
                                                self.importance_sample_ratio)
                all_targets = torch.cat([point_sample(all_targets[i][:, None].float(), c)[:, 0]
                                         for i, c in zip(target_index.split(64), coords.split(64))])  # [M, P]
                target_index = torch.arange(len(all_targets), device=src.device)
            src = point_sample(src[:, None], coords)[:, 0]  # [M, P]
            size = None
        else:
            # The original computes mask losses at the padded input resolution.
            size = tuple(all_targets.shape[-2:])
        mask_terms, dice_terms = MaskLosses.apply(src, all_targets, target_index, size, self.mask_loss == "focal",
                                                  self.focal_alpha, self.focal_gamma)
        for suffix, mask_term, dice_term in zip(suffixes, mask_terms.split(counts), dice_terms.split(counts)):
            losses["loss_mask" + suffix] = mask_term.sum() / num_masks
            losses["loss_dice" + suffix] = dice_term.sum() / num_masks
        return losses

    # ----------------------------------------------------------------------------------------
    def num_masks(self, targets: list[dict], device: torch.device) -> float:
        """Target masks in the batch, averaged over processes, at least 1."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        count = all_reduce_sum(count) / get_world_size()
        return max(count.item(), 1.0)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        device = outputs["pred_logits"].device
        layers = [outputs, *outputs.get("aux_outputs", [])]
        suffixes = ["", *(f"_{i}" for i in range(len(layers) - 1))]
        with torch.autocast(device.type, enabled=False):
            targets = _pad_target_masks(targets)
            num_masks = self.num_masks(targets, device)
            indices = self.match(layers, targets)
            losses = {}
            if "labels" in self.losses:
                for layer, layer_indices, suffix in zip(layers, indices, suffixes):
                    losses.update({k + suffix: v for k, v in
                                   self.loss_labels(layer, targets, layer_indices, num_masks).items()})
            if "masks" in self.losses:
                losses.update(self.loss_masks_layers(layers, targets, indices, num_masks, suffixes))
        return losses

    @torch.no_grad()
    def match(self, layers: list[dict], targets: list[dict]) -> list[list]:
        """Indices of every decoder layer (main output first), each matched independently."""
        if not isinstance(self.matcher, HungarianMatcher):
            return [self.matcher(layer, targets) for layer in layers]
        # All layers together (one host transfer); targets downsampled once.
        masks = self.matcher.matching_masks(targets, layers[0]["pred_masks"].shape[-2:])
        device = layers[0]["pred_masks"].device
        return self.matcher.match_layers([layer["pred_logits"] for layer in layers],
                                         [layer["pred_masks"] for layer in layers],
                                         [t["labels"].to(device) for t in targets], [m.to(device) for m in masks])

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
