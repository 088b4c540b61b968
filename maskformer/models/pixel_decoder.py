"""Pixel decoders: the FPN that turns backbone features into per-pixel embeddings at stride 4.

``PixelDecoder`` is the original ``BasePixelDecoder``; ``TransformerEncoderPixelDecoder`` is its
"+6 Enc" variant (a transformer encoder on res5 before the FPN), used by the COCO panoptic R50/R101
models. Module and parameter names follow the original so published weights load one-to-one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from maskformer.models.position_encoding import PositionEmbeddingSine
from maskformer.models.transformer import TransformerEncoder


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's "XavierFill" as detectron2 uses it: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ConvNorm(nn.Conv2d):
    """Conv2d -> optional GroupNorm(32) -> optional ReLU, with the norm stored as ``.norm``.

    A conv followed by a norm has no bias (the norm's shift makes it redundant).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool, relu: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.norm = nn.GroupNorm(32, out_channels) if norm else None
        self.relu = relu
        c2_xavier_fill(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        # In place: the fresh norm (or conv) output is not needed for its own backward.
        return F.relu(x, inplace=True) if self.relu else x


class PixelDecoder(nn.Module):
    """FPN over ``res2..res5`` (the original ``BasePixelDecoder``).

    Top-down: ``y = layer_4(res5)``; then for res4, res3, res2:
    ``y = layer_i(adapter_i(res_i) + nearest_upsample(y))``; the per-pixel embeddings are
    ``mask_features(y)`` at stride 4.

    Args:
        in_channels: channels of res2, res3, res4, res5.
        conv_dim: FPN width (256).
        mask_dim: per-pixel embedding width (256); must equal the mask-embedding width of the predictor.

    forward(features: {"res2": [B,C2,H/4,W/4], ..., "res5": [B,C5,H/32,W/32]})
        -> (mask_features [B,mask_dim,H/4,W/4], None)
    The second element is the transformer-encoder output in the "+6 Enc" subclass.
    """

    def __init__(self, *, in_channels: list[int], conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"PixelDecoder expects 4 input levels (res2..res5), got channels {in_channels}")
        # Indexed from res2 = 1, as in the original; res5 has no lateral adapter.
        for i, c in enumerate(in_channels[:3], start=1):
            self.add_module(f"adapter_{i}", ConvNorm(c, conv_dim, 1, norm=True, relu=False))
            self.add_module(f"layer_{i}", ConvNorm(conv_dim, conv_dim, 3, norm=True, relu=True))
        self.layer_4 = ConvNorm(in_channels[3], conv_dim, 3, norm=True, relu=True)
        self.mask_features = ConvNorm(conv_dim, mask_dim, 3, norm=False, relu=False)
        self.mask_dim = mask_dim

    def _top_down(self, features: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        for i, name in ((3, "res4"), (2, "res3"), (1, "res2")):
            lateral = getattr(self, f"adapter_{i}")(features[name])
            # In place into the fresh upsampled map: one full-resolution allocation fewer.
            y = F.interpolate(y, size=lateral.shape[-2:], mode="nearest").add_(lateral)
            y = getattr(self, f"layer_{i}")(y)
        return y

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self._top_down(features, self.layer_4(features["res5"]))
        return self.mask_features(y), None


class TransformerEncoderPixelDecoder(PixelDecoder):
    """The "+6 Enc" pixel decoder: a transformer encoder over res5 feeds the FPN and the predictor.

    forward(features) -> (mask_features [B,mask_dim,H/4,W/4], encoder_output [B,conv_dim,H/32,W/32])
    """

    def __init__(self, *, in_channels: list[int], conv_dim: int = 256, mask_dim: int = 256,
                 enc_layers: int = 6, nheads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = False):
        super().__init__(in_channels=in_channels, conv_dim=conv_dim, mask_dim=mask_dim)
        self.input_proj = nn.Conv2d(in_channels[3], conv_dim, kernel_size=1)
        c2_xavier_fill(self.input_proj)
        self.transformer = TransformerEncoder(enc_layers, conv_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        # The encoder output already has conv_dim channels, so layer_4 becomes a 3x3 conv_dim -> conv_dim.
        self.layer_4 = ConvNorm(conv_dim, conv_dim, 3, norm=True, relu=True)

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        res5 = features["res5"]
        src = self.input_proj(res5)
        b, c, h, w = src.shape
        pos = self.pe_layer(res5).flatten(2).transpose(1, 2)
        encoded = self.transformer(src.flatten(2).transpose(1, 2), pos)  # [B, h*w, C]
        encoded = encoded.transpose(1, 2).reshape(b, c, h, w)
        y = self._top_down(features, self.layer_4(encoded))
        return self.mask_features(y), encoded
