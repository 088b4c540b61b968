"""Conversions between this package's checkpoints and other layouts (detectron2/official, Hugging Face, timm)."""

from maskformer.interop.backbone_keys import (
    resnet_d2_to_ours,
    resnet_hf_to_ours,
    swin_hf_to_ours,
    swin_official_to_ours,
)
from maskformer.interop.convert import (
    Converted,
    convert,
    detect_layout,
    inspect_weights,
    read_source,
    read_weights,
    save_converted,
)
from maskformer.interop.safe_pickle import UnsafePickleError, load_pickle

__all__ = [
    "resnet_d2_to_ours",
    "resnet_hf_to_ours",
    "swin_hf_to_ours",
    "swin_official_to_ours",
    "Converted",
    "convert",
    "detect_layout",
    "inspect_weights",
    "read_source",
    "read_weights",
    "save_converted",
    "UnsafePickleError",
    "load_pickle",
]
