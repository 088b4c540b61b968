"""Point sampling for memory-light mask losses (Mask2Former's option, PointRend's idea)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample maps at normalised points.

    Args:
        inputs: [N, C, H, W].
        coords: [N, P, 2] as (x, y) in [0, 1] over the whole map.
    Returns:
        [N, C, P].
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # [N, P, 1, 2] in [-1, 1]
    return F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False)[..., 0]


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float,
                           importance_sample_ratio: float) -> torch.Tensor:
    """Points concentrated where the prediction is least certain, plus uniform ones.

    Draws ``oversample_ratio * num_points`` uniform points, keeps the
    ``importance_sample_ratio * num_points`` whose logits are closest to 0, and fills the rest
    with fresh uniform points.

    Args:
        logits: [N, 1, H, W] mask logits (no gradient needed).
    Returns:
        [N, num_points, 2] coordinates in [0, 1].
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits.float(), coords).abs()[:, 0]  # [N, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = uncertainty.topk(num_uncertain, dim=1).indices
    coords = torch.gather(coords, 1, top[..., None].expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=logits.device)], dim=1)
    return coords
