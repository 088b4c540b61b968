"""MaskFormer on torch + timm: per-pixel classification is not all you need for semantic segmentation.

The public entry points: :func:`build_model` (a config path, Config or zoo name -> a ready model),
:func:`load_config`, :func:`register_dataset`, and the post-processing functions in
:mod:`maskformer.inference`.
"""

from maskformer.config import Config, ConfigError, load_config, save_config
from maskformer.data import register_dataset
from maskformer.inference import instance_inference, panoptic_inference, semantic_inference
from maskformer.models.build import build_criterion, build_model

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "build_criterion",
    "build_model",
    "instance_inference",
    "load_config",
    "panoptic_inference",
    "register_dataset",
    "save_config",
    "semantic_inference",
    "__version__",
]
