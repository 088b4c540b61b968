"""The network (:class:`MaskFormer` and its parts), the matcher and the set loss."""

from maskformer.models.backbone import Backbone, build_backbone
from maskformer.models.build import build_criterion, build_maskformer, build_model
from maskformer.models.criterion import SetCriterion
from maskformer.models.maskformer import MaskFormer
from maskformer.models.matcher import FixedMatcher, HungarianMatcher
from maskformer.models.pixel_decoder import PixelDecoder, TransformerEncoderPixelDecoder
from maskformer.models.predictor import TransformerPredictor

__all__ = [
    "Backbone",
    "FixedMatcher",
    "HungarianMatcher",
    "MaskFormer",
    "PixelDecoder",
    "SetCriterion",
    "TransformerEncoderPixelDecoder",
    "TransformerPredictor",
    "build_backbone",
    "build_criterion",
    "build_maskformer",
    "build_model",
]
