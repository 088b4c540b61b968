"""The paper's per-pixel classification baselines (Table 4: "per-pixel vs. mask classification").

Both keep MaskFormer's backbone and FPN pixel decoder and change only what predicts the classes:

* :class:`PerPixelBaseline` (the original ``PerPixelBaselineHead``): a 1x1 conv from the stride-4
  per-pixel embeddings to K class logits.
* :class:`PerPixelBaselinePlus` (``PerPixelBaselinePlusHead``): MaskFormer's transformer predictor
  without its class head (``mask_classification=False``) and with N = K queries, each tied to one
  class: the "mask" of query k is the per-pixel score of class k.

Both are trained with per-pixel cross-entropy (:class:`PerPixelCriterion`, the same interface as
``SetCriterion``) on the logits upsampled 4x to the label map, ignoring the dataset's ignore label;
Baseline+ adds the loss on every decoder layer (deep supervision). They do semantic segmentation
only: their outputs ``{"pred_sem_seg": [B,K,H/4,W/4]}`` are post-processed by
``maskformer.inference.postprocess`` into logits at the original size, as the original's
detectron2 ``SemanticSegmentor`` returns them (no softmax; evaluation takes the argmax).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from maskformer.models.maskformer import MaskFormer
from maskformer.models.predictor import TransformerPredictor

__all__ = [
    "PER_PIXEL_ARCHITECTURES",
    "c2_msra_fill",
    "PerPixelBaseline",
    "PerPixelBaselinePlus",
    "ClassQueryPredictor",
    "PerPixelCriterion",
    "build_per_pixel_model",
    "build_per_pixel_criterion",
]

PER_PIXEL_ARCHITECTURES = ("per_pixel_baseline", "per_pixel_baseline_plus")


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2's "MSRAFill" as detectron2 uses it: kaiming-normal (fan_out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class PerPixelBaseline(MaskFormer):
    """Per-pixel classification: backbone -> FPN pixel decoder -> 1x1 conv to K classes.

    Args:
        backbone, pixel_decoder, pixel_mean, pixel_std, size_divisibility: as :class:`MaskFormer`.
        num_classes: K; the classifier reads the pixel decoder's ``mask_dim`` channels.

    forward(images [B,3,H,W] normalised) -> {"pred_sem_seg": [B,K,H/4,W/4] class logits}
    """

    def __init__(self, *, backbone: nn.Module, pixel_decoder: nn.Module, num_classes: int,
                 pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
                 pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
                 size_divisibility: int = 32):
        classifier = nn.Conv2d(pixel_decoder.mask_dim, num_classes, kernel_size=1)
        c2_msra_fill(classifier)
        super().__init__(backbone=backbone, pixel_decoder=pixel_decoder, predictor=classifier,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, size_divisibility=size_divisibility)

    @property
    def num_classes(self) -> int:
        return self.predictor.out_channels

    def forward(self, images: torch.Tensor, with_aux: bool | None = None) -> dict[str, Any]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"PerPixelBaseline expects images of shape [B,3,H,W], got {tuple(images.shape)}")
        mask_features, _ = self.pixel_decoder(self.backbone(images))
        return {"pred_sem_seg": self.predictor(mask_features)}


class ClassQueryPredictor(TransformerPredictor):
    """The transformer predictor with ``mask_classification=False``: one query per class, no class head.

    Query k's mask logits are the per-pixel scores of class k, so the "masks" of all K queries
    together are a [K, H/4, W/4] class-score map. Takes the arguments of
    :class:`TransformerPredictor` except ``num_queries`` (always ``num_classes``).

    forward(x [B,C_in,h,w], mask_features [B,mask_dim,H/4,W/4], with_aux: bool | None = None) -> {
        "pred_sem_seg": [B,K,H/4,W/4], "aux_outputs": [{"pred_sem_seg"}] * (dec_layers - 1) (when with_aux)}
    """

    def __init__(self, *, num_classes: int, **kwargs: Any):
        if "num_queries" in kwargs and kwargs["num_queries"] != num_classes:
            raise ValueError(f"ClassQueryPredictor has one query per class: num_queries must be {num_classes}, "
                             f"got {kwargs['num_queries']}")
        kwargs["num_queries"] = num_classes
        super().__init__(num_classes=num_classes, **kwargs)
        # The original builds no class head in this mode; drop ours so parameters and weights match.
        del self.class_embed

    def forward(self, x: torch.Tensor, mask_features: torch.Tensor,
                with_aux: bool | None = None) -> dict[str, object]:
        if with_aux is None:
            with_aux = self.training
        with_aux = with_aux and self.deep_supervision
        pos = self.pe_layer(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        memory = self.input_proj(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        hs = self.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, all_layers=with_aux)  # [L,B,K,C]
        scores = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)  # [L,B,K,H/4,W/4]
        # unbind rather than indexing: the backward then stacks the layers' gradients once.
        scores = scores.unbind(0)
        out: dict[str, object] = {"pred_sem_seg": scores[-1]}
        if with_aux:
            out["aux_outputs"] = [{"pred_sem_seg": s} for s in scores[:-1]]
        return out


class PerPixelBaselinePlus(MaskFormer):
    """Per-pixel classification with MaskFormer's transformer predictor as K class-specific queries.

    Same arguments as :class:`MaskFormer`, with a :class:`ClassQueryPredictor` as ``predictor``.

    forward(images [B,3,H,W] normalised, with_aux: bool | None = None) -> {
        "pred_sem_seg": [B,K,H/4,W/4] class logits,
        "aux_outputs": [{"pred_sem_seg"}] * (dec_layers - 1)  (training, deep supervision)}
    """

    def __init__(self, *, predictor: ClassQueryPredictor, **kwargs: Any):
        if not isinstance(predictor, ClassQueryPredictor):
            raise TypeError(f"PerPixelBaselinePlus needs a ClassQueryPredictor, got {type(predictor).__name__}")
        super().__init__(predictor=predictor, **kwargs)


class PerPixelCriterion(nn.Module):
    """Per-pixel cross-entropy of class logits against the label map (the baselines' loss).

    The logits are upsampled bilinearly (``align_corners=False``) to the label map's size (4x for a
    stride-4 prediction of the padded batch) and compared pixel by pixel; pixels labelled
    ``ignore_label`` (unlabeled, crop padding) count for nothing. The loss is the mean over the
    other pixels of the batch, and 0 (still connected to the graph) when every pixel is ignored.

    Args:
        num_classes: K.
        ignore_label: the dataset's ignore value (255 for every bundled dataset).
        weight_dict: loss name -> weight (``loss_sem_seg`` and its ``_i`` copies for auxiliary layers).

    forward(outputs, targets) -> {"loss_sem_seg", "loss_sem_seg_0", ...} (unweighted)
        outputs: {"pred_sem_seg": [B,K,h,w], "aux_outputs": [{"pred_sem_seg"}] (optional)}
        targets: [{"sem_seg": int64 [H,W], ...}] (label maps of the padded batch, padded with ignore_label)
    """

    def __init__(self, num_classes: int, ignore_label: int, weight_dict: dict[str, float]):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.weight_dict = dict(weight_dict)

    def loss_sem_seg(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits [B,K,h,w], labels int64 [B,H,W] -> scalar mean cross-entropy over non-ignored pixels."""
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits, labels, ignore_index=self.ignore_label, reduction="sum")
        # sum / count equals F.cross_entropy's "mean", but stays finite when every pixel is ignored.
        count = labels.ne(self.ignore_label).sum().clamp(min=1)
        return total / count

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        if "pred_sem_seg" not in outputs:
            raise KeyError(f"PerPixelCriterion needs the per-pixel baselines' 'pred_sem_seg' output; got keys "
                           f"{sorted(outputs)} (a MaskFormer model trains with SetCriterion)")
        if any("sem_seg" not in t for t in targets):
            raise KeyError("per-pixel losses need the label map of each image as targets[i]['sem_seg'] "
                           "(int64 [H,W]); the trainer adds it when the collated batch has 'sem_seg'")
        device = outputs["pred_sem_seg"].device
        labels = torch.stack([t["sem_seg"] for t in targets]).to(device, torch.int64)  # [B, H, W]
        layers = [outputs, *outputs.get("aux_outputs", [])]
        suffixes = ["", *(f"_{i}" for i in range(len(layers) - 1))]
        with torch.autocast(device.type, enabled=False):
            return {"loss_sem_seg" + s: self.loss_sem_seg(layer["pred_sem_seg"], labels)
                    for layer, s in zip(layers, suffixes)}

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses present in ``weight_dict`` (others are ignored)."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


# ------------------------------------------------------------------------------------------------
# Builders (the only functions here that read the config)
# ------------------------------------------------------------------------------------------------

# The original's SEM_SEG_HEAD.LOSS_WEIGHT in both baseline configs.
SEM_SEG_LOSS_WEIGHT = 1.0


def _check_per_pixel_config(cfg, *, semantic_only: bool) -> None:
    from maskformer.config import ConfigError

    arch = cfg.model.architecture
    if arch not in PER_PIXEL_ARCHITECTURES:
        raise ConfigError(f"{cfg.source or '<config>'}: 'model.architecture' is {arch!r}, "
                          f"not a per-pixel baseline {list(PER_PIXEL_ARCHITECTURES)}")
    # Refused when the model is built, not after training, at the first evaluation.
    if semantic_only and (cfg.test.panoptic_on or cfg.test.instance_on):
        raise ConfigError(
            f"{cfg.source or '<config>'}: model.architecture={arch} does semantic segmentation only "
            f"(per-pixel classification has no segments to make panoptic or instance results from); "
            f"set test.panoptic_on: false and test.instance_on: false")


def build_per_pixel_model(cfg) -> MaskFormer:
    """:class:`PerPixelBaseline` or :class:`PerPixelBaselinePlus` as ``cfg.model.architecture`` says."""
    from maskformer.models.build import build_backbone, build_inference_settings, build_pixel_decoder

    _check_per_pixel_config(cfg, semantic_only=True)
    m = cfg.model
    backbone = build_backbone(m)
    channels = [backbone.out_channels[f] for f in ("res2", "res3", "res4", "res5")]
    common = dict(backbone=backbone, pixel_decoder=build_pixel_decoder(m, channels),
                  pixel_mean=tuple(m.pixel_mean), pixel_std=tuple(m.pixel_std),
                  size_divisibility=m.size_divisibility)
    if m.architecture == "per_pixel_baseline":
        model = PerPixelBaseline(num_classes=m.num_classes, **common)
    else:
        predictor = ClassQueryPredictor(
            in_channels=(m.conv_dim if m.transformer_in_feature == "transformer_encoder"
                         else backbone.out_channels[m.transformer_in_feature]),
            num_classes=m.num_classes, hidden_dim=m.hidden_dim, nheads=m.nheads,
            dim_feedforward=m.dim_feedforward, dropout=m.dropout, dec_layers=m.dec_layers, pre_norm=m.pre_norm,
            mask_dim=m.mask_dim, enforce_input_proj=m.enforce_input_proj, deep_supervision=m.deep_supervision)
        model = PerPixelBaselinePlus(predictor=predictor, transformer_in_feature=m.transformer_in_feature, **common)
    model.inference = build_inference_settings(cfg)
    return model


def build_per_pixel_criterion(cfg) -> PerPixelCriterion:
    """Cross-entropy with the training dataset's ignore label; Baseline+ also weights every decoder layer."""
    from maskformer.data import get_metadata

    _check_per_pixel_config(cfg, semantic_only=False)
    m = cfg.model
    weight_dict = {"loss_sem_seg": SEM_SEG_LOSS_WEIGHT}
    if m.architecture == "per_pixel_baseline_plus" and m.deep_supervision:
        weight_dict.update({f"loss_sem_seg_{i}": SEM_SEG_LOSS_WEIGHT for i in range(m.dec_layers - 1)})
    return PerPixelCriterion(m.num_classes, get_metadata(cfg, "train").ignore_label, weight_dict)
