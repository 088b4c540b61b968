"""MaskFormer on torch + timm: per-pixel classification is not all you need for semantic segmentation."""

from maskformer.config import Config, ConfigError, load_config, save_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "save_config", "__version__"]
