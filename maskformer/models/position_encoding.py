"""Sine positional encoding of a 2-D feature map (DETR's ``PositionEmbeddingSine``, normalised)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of (y, x) positions, ``2 * num_pos_feats`` channels.

    MaskFormer never masks padding, so the encoding depends only on the map's size: positions run
    1..H and 1..W, are normalised to (0, 2*pi], and channel pairs alternate sin/cos. The first
    ``num_pos_feats`` channels encode y, the rest x.

    forward(x: [B, C, H, W]) -> [B, 2 * num_pos_feats, H, W] (same dtype/device as x)
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def encoding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[2 * num_pos_feats, H, W] for a map of the given size."""
        y = torch.arange(1, height + 1, device=device, dtype=torch.float32)
        x = torch.arange(1, width + 1, device=device, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y = y / (height + eps) * self.scale
            x = x / (width + eps) * self.scale
        i = torch.arange(self.num_pos_feats, device=device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = y[:, None] / dim_t  # [H, F]
        pos_x = x[:, None] / dim_t  # [W, F]
        # Interleave: even channels sin, odd channels cos.
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=2
        )
        return pos.permute(2, 0, 1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.encoding(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return pos.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
