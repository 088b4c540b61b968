"""Backbones: the four feature maps ``res2..res5`` (strides 4, 8, 16, 32) that the pixel decoder reads.

:func:`build_backbone` takes a timm model name (with or without a pretrained tag) or an alias:

* ``resnet18/34/50/101`` (and tags such as ``resnet50.tv_in1k``): timm's ResNet, which has the
  torchvision/detectron2 layout MaskFormer uses (stride in the 3x3 conv).
* ``resnet101c``: **our alias**, MaskFormer's "R101c" (detectron2's DeepLab ResNet): timm's
  ``resnet101s`` (deep stem of three 3x3 convs 3->64 s2, 64->64, 64->128, each BN+ReLU, then the
  max-pool) with the res5 blocks' 3x3 convs dilated (1, 2, 4) while the output stride stays 32.
  timm's own ``resnet101c`` (stem width 32) is *not* this model and cannot be reached by that name here.
* the Swin names of :data:`maskformer.models.swin.SWIN_VARIANTS` (``swin_tiny_patch4_window7_224``,
  ``swin_base_patch4_window12_384.ms_in22k``, ...): :class:`~maskformer.models.swin.SwinTransformer`,
  the original MaskFormer Swin on timm's weight layout; any input size works.
* any other timm model whose ``features_only`` variant has maps at strides 4, 8, 16 and 32
  (``convnext_tiny``, ``efficientnet_b3``, ...); NHWC outputs are permuted to NCHW.

``freeze_bn=True`` (the original's detectron2 ``FrozenBN``) replaces every BatchNorm by a frozen one
whose affine parameters and statistics are buffers (:class:`FrozenBatchNorm2d`, one fused
``batch_norm`` call that keeps bf16 activations in bf16 under autocast). In timm ResNets each one
is then folded into the convolution before it (:func:`fold_frozen_batch_norm`; same outputs,
gradients and state-dict keys, one pass over the activations less in forward and in backward).
``pretrained=True`` loads timm's weights (downloads); a path loads a local state dict (see
:func:`load_backbone_weights`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d as TimmFrozenBatchNorm2d  # torchvision's, where installed
from timm.models import split_model_name_tag
from torch import Tensor, nn

from maskformer.interop.backbone_keys import resnet_d2_to_ours, swin_hf_to_ours, swin_official_to_ours
from maskformer.models.swin import SWIN_VARIANTS, SwinTransformer

__all__ = ["Backbone", "Conv2dFrozenBN", "FrozenBatchNorm2d", "FoldedFrozenBatchNorm2d", "build_backbone",
           "fold_frozen_batch_norm", "load_backbone_weights", "ALIASES"]

FEATURE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_STRIDES = (4, 8, 16, 32)

# Names that mean something else here than in timm, with what they build.
ALIASES = {"resnet101c": "resnet101s + res5 multi-grid dilations (1, 2, 4): MaskFormer's R101c"}

# timm ResNet-family models list the stride-2 stem activation first; skip it.
_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet", "seresnet", "seresnext", "ecaresnet")


class Backbone(nn.Module):
    """A feature extractor ``body`` behind MaskFormer's interface.

    ``forward(x [B, 3, H, W]) -> {"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}`` (NCHW),
    for H and W multiples of ``size_divisibility`` (other sizes work; the maps are then rounded up).

    Attributes: ``out_features`` (``["res2", "res3", "res4", "res5"]``), ``out_channels`` and
    ``out_strides`` (name -> int), ``size_divisibility`` (32), ``name`` (as given to
    :func:`build_backbone`), ``body`` (the network: a timm ``features_only`` model or a
    :class:`SwinTransformer`), whose output list is read at ``feature_indices`` (all by default).
    """

    def __init__(
        self,
        body: nn.Module,
        channels: Sequence[int],
        name: str = "",
        feature_indices: Sequence[int] | None = None,
        channels_last_output: bool = False,
        strides: Sequence[int] = FEATURE_STRIDES,
    ):
        super().__init__()
        if len(channels) != len(FEATURE_NAMES):
            raise ValueError(f"backbone '{name}': expected {len(FEATURE_NAMES)} channel counts, got {list(channels)}")
        self.body = body
        self.name = name
        self.out_features = list(FEATURE_NAMES)
        self.out_channels = dict(zip(FEATURE_NAMES, (int(c) for c in channels)))
        self.out_strides = dict(zip(FEATURE_NAMES, (int(v) for v in strides)))
        self.size_divisibility = 32
        self.feature_indices = list(feature_indices) if feature_indices is not None else None
        self.channels_last_output = channels_last_output

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for training memory: the body's blocks (Swin) or stages (timm models) keep only
        their inputs and run again in backward. Outputs and gradients are unchanged."""
        if not hasattr(self.body, "set_grad_checkpointing"):
            raise ValueError(f"backbone '{self.name}' does not support gradient checkpointing")
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"backbone '{self.name}' expects images [B, C, H, W], got shape {tuple(x.shape)}")
        features = self.body(x)
        if self.feature_indices is not None:
            features = [features[i] for i in self.feature_indices]
        if self.channels_last_output:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return dict(zip(self.out_features, features))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}"


def build_backbone(
    name: str,
    pretrained: Union[bool, str, os.PathLike, None] = False,
    freeze_bn: bool = True,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> Backbone:
    """Build the backbone ``name`` (a timm name, optionally ``.tag``-ged, or an alias of :data:`ALIASES`).

    ``pretrained``: False/None (random init), True (timm's weights for the name and tag; needs the
    network) or a path to a local state dict (:func:`load_backbone_weights`). ``freeze_bn``: turn every
    BatchNorm into a frozen one (buffers only, eps kept). ``drop_path_rate``: stochastic depth, linear
    over the blocks (Swin, ConvNeXt, ...; the original Swin configs use 0.3). ``timm_kwargs`` go to
    ``timm.create_model`` (not accepted for the MaskFormer Swin).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    path = None
    if pretrained is None or pretrained is False:
        pretrained = False
    elif isinstance(pretrained, (str, os.PathLike)):
        path, pretrained = os.fspath(pretrained), False
    elif pretrained is not True:
        raise ValueError(f"backbone '{name}': pretrained must be a bool or a file path, got {pretrained!r}")

    arch, tag = split_model_name_tag(name)
    if arch == "resnet101c":
        backbone = _build_resnet101_deeplab(name, tag, pretrained, drop_path_rate, timm_kwargs)
    elif arch in SWIN_VARIANTS:
        backbone = _build_swin(name, arch, pretrained, drop_path_rate, timm_kwargs)
    elif timm.is_model(name):
        backbone = _build_timm(name, pretrained, drop_path_rate, timm_kwargs)
    else:
        raise ValueError(
            f"unknown backbone '{name}': neither a timm model nor one of this package's aliases "
            f"({', '.join(ALIASES)}); list timm's names with timm.list_models('pattern*')"
        )
    if freeze_bn:
        backbone.body = freeze_batch_norm_2d(backbone.body)
        for module in backbone.body.modules():
            if type(module) is TimmFrozenBatchNorm2d:
                module.__class__ = FrozenBatchNorm2d
        fold_frozen_batch_norm(backbone.body)
    if path is not None:
        load_backbone_weights(backbone, path)
    return backbone


class FrozenBatchNorm2d(TimmFrozenBatchNorm2d):
    """The frozen BatchNorm timm uses (same buffers and state-dict keys) computed by one ``F.batch_norm`` call.

    That one computes ``x * scale + bias`` with its fp32 buffers, which under bf16 autocast
    promotes every activation of the backbone back to fp32 (and every next convolution casts it
    down again); ``batch_norm`` accepts bf16 input with fp32 statistics and returns bf16.
    Input and output ``[B, C, H, W]``.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """``(scale [C], shift [C])`` with ``forward(x) == x * scale + shift`` per channel."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm that its preceding :class:`Conv2dFrozenBN` applies: ``forward`` is the identity.

    It keeps its buffers (and state-dict keys), which the convolution reads at every call, so loading
    weights or moving the model updates the folded convolution too.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


class Conv2dFrozenBN(nn.Conv2d):
    """A convolution followed by a frozen BatchNorm, computed as one convolution.

    ``conv(x, W * scale) + shift`` equals ``bn(conv(x, W))`` (scale and shift per output channel, see
    :meth:`FrozenBatchNorm2d.scale_and_shift`), and the gradient reaching ``W`` is the same. It saves
    the normalisation's pass over the activations in forward and in backward (about 5% of a ResNet-50
    training step on a CPU); the weight product is cheap next to them. Parameters and state-dict keys
    are those of the ``nn.Conv2d`` it replaces; the BatchNorm stays registered where it was.
    """

    frozen_bn: FoldedFrozenBatchNorm2d

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.frozen_bn.scale_and_shift()
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else shift + self.bias * scale
        return self._conv_forward(x, weight, bias)


def fold_frozen_batch_norm(body: nn.Module) -> int:
    """Fold every frozen BatchNorm of a timm ResNet (``Bottleneck``/``BasicBlock``, downsampling
    shortcuts, plain and deep stems) into the convolution before it; returns how many were folded.

    Only layouts known to compute ``bn(conv(x))`` are folded; other models are left as they are.
    """
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in body.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    if not blocks:
        return 0
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for block in blocks:
        pairs += [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
                  for i in (1, 2, 3) if hasattr(block, f"conv{i}")]
        if isinstance(block.downsample, nn.Sequential):  # ([avg-pool,] conv, bn)
            pairs += list(zip(block.downsample[:-1], block.downsample[1:]))
    stem = getattr(body, "conv1", None)
    if isinstance(stem, nn.Sequential):  # the deep stem: conv, bn, act, conv, bn, act, conv
        pairs += list(zip(stem[:-1], stem[1:]))
        stem = stem[-1]
    if stem is not None and hasattr(body, "bn1"):
        pairs.append((stem, body.bn1))
    folded = 0
    for conv, bn in pairs:
        if type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d and conv.out_channels == bn.weight.numel():
            conv.__class__, bn.__class__ = Conv2dFrozenBN, FoldedFrozenBatchNorm2d
            # A plain attribute, not a submodule: the BatchNorm's parameters stay under their own name.
            object.__setattr__(conv, "frozen_bn", bn)
            folded += 1
    return folded


def _create_features_model(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except (RuntimeError, TypeError, AssertionError) as error:
        raise ValueError(f"timm cannot build '{name}' as a feature extractor with {kwargs}: {error}") from error


def _build_timm(name: str, pretrained: bool, drop_path_rate: float, timm_kwargs: dict) -> Backbone:
    arch, _ = split_model_name_tag(name)
    kwargs = dict(pretrained=pretrained, drop_path_rate=drop_path_rate, **timm_kwargs)
    if arch.startswith(_RESNET_PREFIXES) and "out_indices" not in kwargs:
        kwargs["out_indices"] = (1, 2, 3, 4)
    body = _create_features_model(name, **kwargs)
    reductions = list(body.feature_info.reduction())
    channels = list(body.feature_info.channels())
    # timm's output_stride=16 (or 8) dilates the last stage(s) instead of striding them (DeepLab):
    # res5 (and res4) then keep a finer grid, e.g. for small images.
    output_stride = int(timm_kwargs.get("output_stride", 32))
    wanted = [min(stride, output_stride) for stride in FEATURE_STRIDES]
    indices: list[int] = []
    for level, stride in enumerate(wanted):
        at_stride = [i for i, r in enumerate(reductions) if r == stride and (not indices or i > indices[-1])]
        if not at_stride:
            raise ValueError(
                f"timm model '{name}' offers feature maps at strides {reductions}; "
                f"MaskFormer needs strides {wanted}"
            )
        # The deepest map at that stride, unless a later level needs a map at the same stride.
        later_same = wanted[level + 1:].count(stride)
        indices.append(at_stride[-1 - later_same] if len(at_stride) > later_same else at_stride[0])
    return Backbone(
        body,
        [channels[i] for i in indices],
        name=name,
        feature_indices=None if indices == list(range(len(reductions))) else indices,
        channels_last_output=getattr(body, "output_fmt", "NCHW") == "NHWC",
        strides=wanted,
    )


def _build_resnet101_deeplab(name: str, tag: str, pretrained: bool, drop_path_rate: float, timm_kwargs: dict):
    timm_name = "resnet101s" + (f".{tag}" if tag else "")
    backbone = _build_timm(timm_name, pretrained, drop_path_rate, timm_kwargs)
    # detectron2's RES5_MULTI_GRID: dilate the 3x3 conv of each res5 block, keeping block 0's stride 2.
    for block, dilation in zip(backbone.body.layer4, (1, 2, 4)):
        block.conv2.dilation = (dilation, dilation)
        block.conv2.padding = (dilation, dilation)
    backbone.name = name
    return backbone


def _build_swin(name: str, arch: str, pretrained: bool, drop_path_rate: float, timm_kwargs: dict) -> Backbone:
    if timm_kwargs:
        raise ValueError(
            f"backbone '{name}' is MaskFormer's Swin, which takes any input size and no timm keyword "
            f"arguments (got {sorted(timm_kwargs)}); only drop_path_rate is configurable"
        )
    body = SwinTransformer(**SWIN_VARIANTS[arch], drop_path_rate=drop_path_rate)
    backbone = Backbone(body, body.out_channels, name=name)
    if pretrained:
        # timm's classifier carries the weights; its per-stage norms do not exist (they start at ones/zeros,
        # as in the original, whose ImageNet files lack them too).
        classifier = timm.create_model(name, pretrained=True)
        _load_body_state_dict(backbone, classifier.state_dict(), source=f"timm weights of '{name}'")
    return backbone


# ------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------

# Keys of a file that carry nothing for a backbone: classifier heads, recomputed buffers.
_IGNORED_PREFIXES = ("fc.", "head.", "classifier.")
_IGNORED_SUFFIXES = ("relative_position_index", "attn_mask", "num_batches_tracked")


def load_backbone_weights(backbone: Backbone, path: Union[str, os.PathLike]) -> None:
    """Load a local file into ``backbone`` (in place).

    The file holds a state dict (plain, or under a ``"model"`` or ``"state_dict"`` key) in one of these
    layouts, detected from its keys: timm's (e.g. a saved ``timm.create_model(...).state_dict()``),
    this package's ``Backbone.state_dict()``, a full checkpoint whose ``backbone.*`` (or HF
    ``model.pixel_level_module.encoder.*``) keys are taken,
    detectron2/official ResNet (``stem.conv1``, ``res2.0.conv1``...), and for Swin the official
    (``layers.i.downsample`` at the end of stage i) or Hugging Face ``MaskFormerSwinBackbone`` layout.
    Classifier heads (``fc.*``, ``head.*``, ``classifier.*``), Swin's final ``norm.*`` and recomputed
    buffers are ignored; Swin's ``norm0..3`` may be absent (they then keep their init, as in the original).
    Anything else missing, unexpected or of the wrong shape raises :class:`ValueError` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the pickle / zip errors torch raises have no common base
        raise ValueError(
            f"{path}: cannot read a torch state dict ({type(error).__name__}: {error}). detectron2 .pkl files "
            "(numpy arrays) must be converted to a torch state dict first"
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (str -> Tensor), got {type(obj).__name__}")
    _load_body_state_dict(backbone, _to_body_layout(obj, backbone), source=path)


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _to_body_layout(state_dict: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
    """Bring a state dict of any supported layout to the keys of ``backbone.body``."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        state_dict = _strip_prefix(state_dict, "module.")
    for prefix in ("backbone.", "model.pixel_level_module.encoder."):  # a whole model (ours/official, HF)
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = _strip_prefix(state_dict, prefix)
            break
    converted: dict[str, Tensor] | None = None
    if isinstance(backbone.body, SwinTransformer):
        if any(k.startswith(("model.embeddings.", "hidden_states_norms.")) for k in state_dict):
            converted = swin_hf_to_ours(state_dict)
        elif any(re.match(r"layers\.0\.downsample\.", k) for k in state_dict):
            converted = swin_official_to_ours(state_dict)
    elif "stem.conv1.weight" in state_dict:
        converted = resnet_d2_to_ours(state_dict)
    if converted is not None:
        return _strip_prefix(converted, "body.")
    if any(k.startswith("body.") for k in state_dict):  # our own Backbone.state_dict()
        return _strip_prefix(state_dict, "body.")
    return dict(state_dict)


def _summarise(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def _load_body_state_dict(backbone: Backbone, state_dict: Mapping[str, Tensor], source: str) -> None:
    is_swin = isinstance(backbone.body, SwinTransformer)
    own = backbone.body.state_dict()
    ignored_prefixes = _IGNORED_PREFIXES + (("norm.",) if is_swin else ())
    usable = {
        k: v for k, v in state_dict.items() if not k.startswith(ignored_prefixes) and not k.endswith(_IGNORED_SUFFIXES)
    }
    unexpected = sorted(k for k in usable if k not in own)
    missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    stage_norms = [k for k in own if re.fullmatch(r"norm\d\.(weight|bias)", k)]
    if is_swin and set(stage_norms) <= set(missing):
        missing = [k for k in missing if k not in stage_norms]
    mismatched = [
        f"{k} (file {list(v.shape)}, model {list(own[k].shape)})"
        for k, v in usable.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_summarise(mismatched)}")
        raise ValueError(f"{source}: weights do not fit backbone '{backbone.name}': " + "; ".join(problems))
    backbone.body.load_state_dict({k: v for k, v in usable.items() if k in own}, strict=False)
