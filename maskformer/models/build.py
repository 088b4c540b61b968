"""``build_*`` functions: the only place where the model and the loss read the config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from maskformer.config import Config, LossConfig, ModelConfig, load_config
from maskformer.models.criterion import SetCriterion, build_weight_dict
from maskformer.models.linear import use_onednn_linear
from maskformer.models.maskformer import InferenceSettings, MaskFormer
from maskformer.models.matcher import FixedMatcher, HungarianMatcher
from maskformer.models.pixel_decoder import PixelDecoder, TransformerEncoderPixelDecoder
from maskformer.models.predictor import TransformerPredictor

PIXEL_DECODERS = {"fpn": PixelDecoder, "transformer_encoder_fpn": TransformerEncoderPixelDecoder}


def build_backbone(cfg: ModelConfig) -> nn.Module:
    from maskformer.models.backbone import build_backbone as _build

    b = cfg.backbone
    backbone = _build(b.name, pretrained=b.pretrained, freeze_bn=b.freeze_bn, drop_path_rate=b.drop_path_rate,
                      **b.kwargs)
    if b.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def build_pixel_decoder(cfg: ModelConfig, in_channels: list[int]) -> nn.Module:
    if cfg.pixel_decoder == "transformer_encoder_fpn":
        return TransformerEncoderPixelDecoder(
            in_channels=in_channels, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim,
            enc_layers=cfg.pixel_decoder_enc_layers, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout, pre_norm=cfg.pre_norm)
    return PIXEL_DECODERS[cfg.pixel_decoder](in_channels=in_channels, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim)


def build_predictor(cfg: ModelConfig, in_channels: int) -> TransformerPredictor:
    return TransformerPredictor(
        in_channels=in_channels, num_classes=cfg.num_classes, hidden_dim=cfg.hidden_dim,
        num_queries=cfg.num_queries, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, dec_layers=cfg.dec_layers, pre_norm=cfg.pre_norm, mask_dim=cfg.mask_dim,
        enforce_input_proj=cfg.enforce_input_proj, deep_supervision=cfg.deep_supervision)


def build_maskformer(cfg: Config) -> MaskFormer:
    """The network described by ``cfg.model`` (random weights unless the backbone is pretrained)."""
    m = cfg.model
    if m.architecture != "maskformer":  # the paper's per-pixel baselines (maskformer/models/per_pixel.py)
        from maskformer.models.per_pixel import build_per_pixel_model

        return _select_cpu_linear(build_per_pixel_model(cfg), m)
    backbone = build_backbone(m)
    channels = [backbone.out_channels[f] for f in ("res2", "res3", "res4", "res5")]
    pixel_decoder = build_pixel_decoder(m, channels)
    predictor_in = (m.conv_dim if m.transformer_in_feature == "transformer_encoder"
                    else backbone.out_channels[m.transformer_in_feature])
    model = MaskFormer(backbone=backbone, pixel_decoder=pixel_decoder, predictor=build_predictor(m, predictor_in),
                       transformer_in_feature=m.transformer_in_feature, pixel_mean=tuple(m.pixel_mean),
                       pixel_std=tuple(m.pixel_std), size_divisibility=m.size_divisibility,
                       cpu_channels_last=m.cpu_channels_last)
    model.inference = build_inference_settings(cfg)
    return _select_cpu_linear(model, m)


def _select_cpu_linear(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    if cfg.cpu_linear == "onednn":
        use_onednn_linear(model)
    return model


def build_inference_settings(cfg: Config) -> InferenceSettings:
    """Class names and thing flags from the test dataset's metadata (generic ones if it has none)."""
    names = [str(i) for i in range(cfg.model.num_classes)]
    is_thing = [False] * cfg.model.num_classes
    try:
        from maskformer.data import get_metadata

        meta = get_metadata(cfg, "test")
    except Exception:  # metadata is a convenience here; a model must build without its dataset
        meta = None
    if meta is not None and len(meta.class_names) == cfg.model.num_classes:
        names, is_thing = list(meta.class_names), list(meta.is_thing)
    t = cfg.test
    return InferenceSettings(class_names=names, is_thing=is_thing, min_size_test=cfg.data.min_size_test,
                             max_size_test=cfg.data.max_size_test, object_mask_threshold=t.object_mask_threshold,
                             overlap_threshold=t.overlap_threshold, detections_per_image=t.detections_per_image)


def build_matcher(cfg: Config) -> nn.Module:
    loss: LossConfig = cfg.loss
    if loss.matcher == "fixed":
        return FixedMatcher(cfg.model.num_classes)
    return HungarianMatcher(cost_class=loss.cost_class, cost_mask=loss.cost_mask, cost_dice=loss.cost_dice,
                            mask_cost=loss.mask_loss, focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma,
                            num_points=loss.num_points)


def build_criterion(cfg: Config) -> SetCriterion:
    loss, m = cfg.loss, cfg.model
    if m.architecture != "maskformer":  # per-pixel cross-entropy (maskformer/models/per_pixel.py)
        from maskformer.models.per_pixel import build_per_pixel_criterion

        return build_per_pixel_criterion(cfg)
    weight_dict = build_weight_dict(loss.class_weight, loss.mask_weight, loss.dice_weight, m.dec_layers,
                                    m.deep_supervision)
    return SetCriterion(m.num_classes, build_matcher(cfg), weight_dict, eos_coef=loss.no_object_weight,
                        mask_loss=loss.mask_loss, focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma,
                        num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
                        importance_sample_ratio=loss.importance_sample_ratio)


def build_model(config: Config | str | os.PathLike, weights: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> nn.Module:
    """The notebook entry point: a config (object or YAML path) -> a ready model in eval mode.

    Args:
        config: a :class:`Config`, a path to a YAML config, or a model-zoo name such as
            ``"maskformer_swin_tiny_ade20k"`` (see ``maskformer.zoo``).
        weights: optional checkpoint to load: this project's, or an official ``.pkl`` / Hugging Face
            checkpoint (converted on the fly); with a zoo name also ``"download"`` (cached download).
        overrides: dotted ``section.key=value`` overrides (only with a path or a zoo name).
    """
    from maskformer import zoo

    if zoo.is_model_name(config):
        config, overrides, weights = zoo.resolve_model(config, weights, overrides)
    if isinstance(config, (str, Path, os.PathLike)):
        cfg = load_config(config, overrides)
    else:
        if overrides:
            raise ValueError("overrides apply to a config path; edit the Config object directly instead")
        cfg = config
    if weights is not None and cfg.model.backbone.pretrained:
        # The checkpoint replaces every weight: don't download or read backbone weights first.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained=False)))
    model = build_maskformer(cfg)
    if weights is not None:
        from maskformer.checkpoint import load_model_weights

        load_model_weights(model, weights)
    return model.eval()
