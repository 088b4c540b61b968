"""The MaskFormer meta-architecture: backbone -> pixel decoder -> transformer predictor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class InferenceSettings:
    """What ``MaskFormer.predict`` needs beyond the network: dataset metadata and test options."""

    class_names: list[str] = field(default_factory=list)
    is_thing: list[bool] = field(default_factory=list)
    min_size_test: int = 512
    max_size_test: int = 2048
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.0
    detections_per_image: int = 100


TRANSFORMER_IN_FEATURES = ("res5", "res4", "res3", "res2", "transformer_encoder")


class MaskFormer(nn.Module):
    """Mask classification for semantic/panoptic/instance segmentation.

    Args:
        backbone: returns {"res2".."res5"} NCHW maps (see ``maskformer.models.backbone``).
        pixel_decoder: maps backbone features to (per-pixel embeddings at stride 4, encoder output or None).
        predictor: the transformer predictor.
        transformer_in_feature: which map the queries attend to: a backbone map, "res5" (the
            paper's models) or a finer "res4"/"res3"/"res2" (the original accepts any backbone
            feature name here), or "transformer_encoder" (the pixel decoder's encoder output, the
            "+6 Enc" models).
        pixel_mean, pixel_std: RGB normalisation on the 0-255 scale (used by ``predict``; ``forward``
            expects normalised input).
        size_divisibility: inputs are padded to a multiple of this (by the collator / ``predict``).
        cpu_channels_last: ``forward`` converts CPU inputs to channels-last, which every layer then
            follows (oneDNN's faster NHWC convolutions; same results). GPU inputs are left as they are.

    forward(images [B,3,H,W] normalised, H and W multiples of size_divisibility) -> {
        "pred_logits": [B,Q,K+1], "pred_masks": [B,Q,H/4,W/4],
        "aux_outputs": [{"pred_logits", "pred_masks"}] * (dec_layers-1)  (training, deep supervision)}
    Loss and post-processing live outside the model (``SetCriterion``, ``maskformer.inference``).
    """

    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, predictor: nn.Module,
                 transformer_in_feature: str = "res5",
                 pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
                 pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
                 size_divisibility: int = 32, cpu_channels_last: bool = True):
        super().__init__()
        if transformer_in_feature not in TRANSFORMER_IN_FEATURES:
            raise ValueError(f"transformer_in_feature must be one of {TRANSFORMER_IN_FEATURES}, "
                             f"got {transformer_in_feature!r}")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.transformer_in_feature = transformer_in_feature
        self.cpu_channels_last = cpu_channels_last
        # Not persistent: they are configuration, not learned state (as the original).
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.size_divisibility = size_divisibility
        self.inference = InferenceSettings()

    @property
    def num_classes(self) -> int:
        return self.predictor.num_classes

    def forward(self, images: torch.Tensor, with_aux: bool | None = None) -> dict[str, Any]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"MaskFormer expects images of shape [B,3,H,W], got {tuple(images.shape)}")
        if self.cpu_channels_last and images.device.type == "cpu":
            # oneDNN's NHWC convolution kernels are faster than its NCHW ones, and every later layer
            # follows the input's layout: ~18% of a ResNet-50 training step on a CPU. GPUs: train.channels_last.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        mask_features, encoder_features = self.pixel_decoder(features)
        if self.transformer_in_feature == "transformer_encoder":
            x = encoder_features
        else:
            x = features[self.transformer_in_feature]
        return self.predictor(x, mask_features, with_aux=with_aux)

    def predict(self, image: Any, *, panoptic: bool = False, instance: bool = False):
        """Segment one image: a path, PIL image, HxWx3 uint8 numpy array or [3,H,W] uint8 tensor.

        Handles resizing (``inference.min_size_test``/``max_size_test``), normalisation, padding
        and post-processing; returns a :class:`maskformer.predict.Prediction` whose ``sem_seg``
        is the [H,W] label map at the image's own size.
        """
        from maskformer.predict import predict

        return predict(self, image, panoptic=panoptic, instance=instance)
