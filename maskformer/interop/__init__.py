"""Conversions between this package's checkpoints and other layouts (detectron2/official, Hugging Face, timm)."""

from maskformer.interop.backbone_keys import resnet_d2_to_ours, swin_hf_to_ours, swin_official_to_ours

__all__ = ["resnet_d2_to_ours", "swin_hf_to_ours", "swin_official_to_ours"]
