"""Typed configuration: YAML files with ``_base_`` inheritance loaded into nested dataclasses.

A config file is plain YAML (read with ``yaml.safe_load``; no code, no tags). Its top-level sections
mirror the dataclasses below: ``model``, ``loss``, ``data``, ``solver``, ``train``, ``test``,
``output``. ``_base_`` (a path or a list of paths, relative to the file) names files merged first,
in order; mappings merge deeply and every other value (lists included) is replaced.

Dotted overrides ``section.key=value`` are applied last; the value is parsed as YAML, so
``solver.base_lr=1e-4``, ``data.crop_size=[256,256]`` and ``model.backbone.pretrained=null`` work.

Errors are raised at load time as :class:`ConfigError`, naming the file (or override), the dotted
key and, for unknown keys, the closest known key::

    configs/x.yaml: unknown key 'model.num_querys' (did you mean 'model.num_queries'?)

The dataclass defaults are the original MaskFormer's ADE20K-150 R50 values, so ``Config()`` is a
documented reference in itself.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "BackboneConfig",
    "ModelConfig",
    "LossConfig",
    "DatasetConfig",
    "DataConfig",
    "SolverConfig",
    "TrainConfig",
    "TTAConfig",
    "SlidingWindowConfig",
    "TestConfig",
    "OutputConfig",
    "Config",
    "ConfigError",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A config file, override or value that cannot be used. The message names the source and key."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """Which backbone feeds the pixel decoder.

    ``name`` is a timm model name (``resnet50``, ``resnet101``, ``swin_tiny_patch4_window7_224``,
    ``convnext_tiny``, ...) or one of the package's aliases (``resnet101c`` for the DeepLab
    deep-stem R101 with multi-grid res5). ``pretrained: true`` downloads timm's weights;
    a string is a local file (a timm/torchvision state dict or a converted backbone checkpoint).
    """

    name: str = "resnet50.tv_in1k"
    pretrained: Union[bool, str] = False
    freeze_bn: bool = True
    drop_path_rate: float = 0.0
    # Recompute the backbone's blocks in backward instead of storing their activations: less training
    # memory (Swin-T at 512x512: 0.64x -> 0.47x of HF's peak, ~25% more time per CPU step; see
    # docs/performance.md). With trainable BatchNorm the recomputation updates running statistics twice.
    grad_checkpointing: bool = False
    # Extra keyword arguments for ``timm.create_model`` (plain values only).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Architecture. ``num_classes`` counts real classes (K); the class head has K+1 outputs."""

    # maskformer | per_pixel_baseline | per_pixel_baseline_plus
    architecture: str = "maskformer"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 150
    # fpn (BasePixelDecoder) | transformer_encoder_fpn (the "+6 Enc" TransformerEncoderPixelDecoder)
    pixel_decoder: str = "fpn"
    conv_dim: int = 256
    mask_dim: int = 256
    pixel_decoder_enc_layers: int = 6
    # Which map the transformer decoder attends to: res5 (the paper) | res4 | res3 | res2 | transformer_encoder
    transformer_in_feature: str = "res5"
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dropout: float = 0.1
    dec_layers: int = 6
    pre_norm: bool = False
    deep_supervision: bool = True
    enforce_input_proj: bool = False
    # RGB, 0-255 scale.
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # The batch is zero-padded (after normalisation) to a multiple of this; 0 pads to the batch max only.
    size_divisibility: int = 32
    # fp32 linear layers on CPUs: onednn (a 1x1 convolution in oneDNN: same results, ~2x faster than MKL on
    # AMD CPUs, see maskformer/models/linear.py) | blas (PyTorch's default). No effect on GPUs or under autocast.
    cpu_linear: str = "onednn"
    # CPU inputs enter the network channels-last (oneDNN's faster NHWC convolutions; the layers follow the
    # input's layout): ~18% of a ResNet-50 CPU training step. No effect on GPUs (there: train.channels_last).
    cpu_channels_last: bool = True


@dataclass
class LossConfig:
    """Matching costs and set-loss weights (the original: class 1, focal 20, dice 1, no-object 0.1)."""

    class_weight: float = 1.0
    mask_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1
    cost_class: float = 1.0
    cost_mask: float = 20.0
    cost_dice: float = 1.0
    # focal (the original) | bce (Mask2Former)
    mask_loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # hungarian (bipartite) | fixed (query i <-> class i; needs num_queries == num_classes)
    matcher: str = "hungarian"
    # 0: losses on full-resolution upsampled masks (the original). >0: Mask2Former point sampling.
    num_points: int = 0
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class DatasetConfig:
    """One split of one dataset. ``name`` is a registered dataset (see ``maskformer.data``)."""

    name: str = "shapes"
    split: str = "train"
    # None: ``$MASKFORMER_DATASETS`` (default ``./datasets``) joined with the dataset's usual folder.
    root: Union[str, None] = None
    # Dataset-specific keyword arguments, checked by the dataset builder.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Datasets and the original's training/test transforms."""

    train: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="train"))
    test: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="val"))
    # semantic (MaskFormerSemanticDatasetMapper) | panoptic (MaskFormerPanopticDatasetMapper)
    # | detr_panoptic (DETRPanopticDatasetMapper, COCO)
    mapper: str = "semantic"
    num_workers: int = 4
    # Shortest-edge sizes drawn uniformly ("choice"), then capped so the long side <= max_size_train.
    min_size_train: list[int] = field(
        default_factory=lambda: [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]
    )
    max_size_train: int = 2048
    # [h, w] random crop after resizing; null disables cropping.
    crop_size: Union[list[int], None] = field(default_factory=lambda: [512, 512])
    # 1.0 disables the category-area constraint (every MaskFormer config uses 1.0).
    crop_single_category_max_area: float = 1.0
    color_aug_ssd: bool = True
    random_flip: bool = True
    # Pad each training image (right/bottom) to exactly crop_size: image with this value, label with ignore.
    pad_to_crop: bool = True
    image_pad_value: int = 128
    min_size_test: int = 512
    max_size_test: int = 2048
    # Skip unreadable/invalid samples with a warning count instead of stopping.
    skip_bad_samples: bool = False


@dataclass
class SolverConfig:
    """Optimiser and schedule. ``ims_per_batch`` is the total batch over all processes."""

    # adamw (the original) | sgd (momentum below; for baselines and exact equivalence checks)
    optimizer: str = "adamw"
    ims_per_batch: int = 16
    max_iter: int = 160000
    base_lr: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    # None: biases use weight_decay (the original does not exempt them).
    weight_decay_bias: Union[float, None] = None
    backbone_multiplier: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    # poly | multistep
    lr_scheduler: str = "poly"
    poly_power: float = 0.9
    steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    # linear | constant
    warmup_method: str = "linear"
    # Full-model L2 gradient-norm clipping; 0 disables.
    clip_grad_norm: float = 0.01
    grad_accum_steps: int = 1


@dataclass
class TrainConfig:
    """Runtime of a training run."""

    seed: int = 42
    # auto (cuda if available) | cpu | cuda | cuda:N
    device: str = "auto"
    # off | bf16 | fp16 (fp16 uses a gradient scaler; CUDA only). CPU honours bf16.
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    log_period: int = 20
    checkpoint_period: int = 5000
    eval_period: int = 5000
    # Periodic checkpoints to keep besides last.pth and best.pth (0 keeps all).
    keep_checkpoints: int = 2
    # Metric that selects best.pth (mIoU, PQ, ...); null disables.
    best_metric: Union[str, None] = None
    # Threads for intra-op CPU work (0: torch's default).
    num_threads: int = 0
    # glibc: keep freed memory in the process instead of page-faulting every step's activations in again
    # (maskformer/engine/memory.py; ~15% of a CPU training step here); the RSS stays at its peak.
    keep_freed_memory: bool = True


@dataclass
class TTAConfig:
    """Multi-scale + flip test-time augmentation (semantic probabilities are averaged)."""

    enabled: bool = False
    min_sizes: list[int] = field(default_factory=lambda: [256, 384, 512, 640, 768, 896])
    max_size: int = 3584
    flip: bool = True


@dataclass
class SlidingWindowConfig:
    """Sliding-window semantic inference for inputs much larger than the training crop."""

    enabled: bool = False
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    stride: list[int] = field(default_factory=lambda: [341, 683])


@dataclass
class TestConfig:
    """Inference and evaluation."""

    semantic_on: bool = True
    panoptic_on: bool = False
    instance_on: bool = False
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.0
    detections_per_image: int = 100
    ims_per_batch: int = 1
    # Evaluate on at most this many images (0: all); handy for quick periodic evaluation.
    max_images: int = 0
    aug: TTAConfig = field(default_factory=TTAConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)


@dataclass
class OutputConfig:
    """Where a run writes. None: ``outputs/<config file stem>``."""

    dir: Union[str, None] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The file the config was loaded from (set by load_config; not a YAML key).
    source: Union[str, None] = field(default=None, metadata={"internal": True})


# --------------------------------------------------------------------------------------------
# Values: checking types, and the "impossible value" rules
# --------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.architecture": ("maskformer", "per_pixel_baseline", "per_pixel_baseline_plus"),
    "model.pixel_decoder": ("fpn", "transformer_encoder_fpn"),
    "model.transformer_in_feature": ("res5", "res4", "res3", "res2", "transformer_encoder"),
    "model.cpu_linear": ("onednn", "blas"),
    "loss.mask_loss": ("focal", "bce"),
    "loss.matcher": ("hungarian", "fixed"),
    "data.mapper": ("semantic", "panoptic", "detr_panoptic"),
    "solver.optimizer": ("adamw", "sgd"),
    "solver.lr_scheduler": ("poly", "multistep"),
    "solver.warmup_method": ("linear", "constant"),
    "train.amp": ("off", "bf16", "fp16"),
}


def _validate(cfg: Config) -> list[tuple[str, str]]:
    """Return (dotted key, problem) pairs for values that cannot work, across fields."""
    problems: list[tuple[str, str]] = []

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            problems.append((key, msg))

    for key, choices in _CHOICES.items():
        value = _get_dotted(cfg, key)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            need(False, key, f"must be one of {list(choices)}, got {value!r}{extra}")
    m, loss, d, s, t, te = cfg.model, cfg.loss, cfg.data, cfg.solver, cfg.train, cfg.test
    need(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    need(m.num_queries >= 1, "model.num_queries", f"must be >= 1, got {m.num_queries}")
    need(m.dec_layers >= 1, "model.dec_layers", f"must be >= 1, got {m.dec_layers}")
    need(m.hidden_dim >= 1 and m.nheads >= 1 and m.hidden_dim % m.nheads == 0, "model.nheads",
         f"hidden_dim ({m.hidden_dim}) must be a positive multiple of nheads ({m.nheads})")
    need(m.hidden_dim % 2 == 0, "model.hidden_dim", f"must be even for the sine position encoding, got {m.hidden_dim}")
    need(m.conv_dim >= 1 and m.conv_dim % 32 == 0, "model.conv_dim",
         f"must be a positive multiple of 32 (GroupNorm with 32 groups), got {m.conv_dim}")
    need(m.mask_dim >= 1, "model.mask_dim", f"must be >= 1, got {m.mask_dim}")
    need(m.dim_feedforward >= 1, "model.dim_feedforward", f"must be >= 1, got {m.dim_feedforward}")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    need(m.pixel_decoder_enc_layers >= 0, "model.pixel_decoder_enc_layers", "must be >= 0")
    need(len(m.pixel_mean) == 3, "model.pixel_mean", f"needs 3 values (RGB), got {len(m.pixel_mean)}")
    need(len(m.pixel_std) == 3 and all(v > 0 for v in m.pixel_std), "model.pixel_std",
         f"needs 3 positive values (RGB), got {m.pixel_std}")
    need(m.size_divisibility >= 0, "model.size_divisibility", "must be >= 0")
    need(0.0 <= m.backbone.drop_path_rate < 1.0, "model.backbone.drop_path_rate", "must be in [0, 1)")
    if m.transformer_in_feature == "transformer_encoder":
        need(m.pixel_decoder == "transformer_encoder_fpn", "model.transformer_in_feature",
             "'transformer_encoder' needs model.pixel_decoder: transformer_encoder_fpn")
    if m.architecture != "maskformer":
        need(not (te.panoptic_on or te.instance_on), "test.panoptic_on",
             f"{m.architecture} predicts per-pixel classes only: panoptic and instance output need "
             "model.architecture: maskformer")
    if m.architecture == "per_pixel_baseline_plus" or loss.matcher == "fixed":
        key = "model.num_queries"
        need(m.num_queries == m.num_classes, key,
             f"must equal model.num_classes ({m.num_classes}) for "
             f"{'fixed matching' if loss.matcher == 'fixed' else m.architecture}, got {m.num_queries}")

    for k in ("class_weight", "mask_weight", "dice_weight", "cost_class", "cost_mask", "cost_dice"):
        need(getattr(loss, k) >= 0, f"loss.{k}", f"must be >= 0, got {getattr(loss, k)}")
    need(0.0 < loss.no_object_weight <= 1.0, "loss.no_object_weight", f"must be in (0, 1], got {loss.no_object_weight}")
    need(0.0 <= loss.focal_alpha <= 1.0, "loss.focal_alpha", "must be in [0, 1]")
    need(loss.num_points >= 0, "loss.num_points", "must be >= 0")
    need(loss.oversample_ratio >= 1.0, "loss.oversample_ratio", "must be >= 1")
    need(0.0 <= loss.importance_sample_ratio <= 1.0, "loss.importance_sample_ratio", "must be in [0, 1]")

    need(len(d.min_size_train) > 0 and all(v > 0 for v in d.min_size_train), "data.min_size_train",
         "needs at least one positive size")
    need(d.max_size_train > 0, "data.max_size_train", "must be > 0")
    if d.crop_size is not None:
        need(len(d.crop_size) == 2 and all(v > 0 for v in d.crop_size), "data.crop_size",
             f"must be [height, width] with positive values or null, got {d.crop_size}")
    need(0.0 < d.crop_single_category_max_area <= 1.0, "data.crop_single_category_max_area", "must be in (0, 1]")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(0 <= d.image_pad_value <= 255, "data.image_pad_value", "must be in [0, 255]")
    need(d.min_size_test > 0 and d.max_size_test > 0, "data.min_size_test", "test sizes must be > 0")

    need(s.ims_per_batch >= 1, "solver.ims_per_batch", f"must be >= 1, got {s.ims_per_batch}")
    need(s.max_iter >= 1, "solver.max_iter", f"must be >= 1, got {s.max_iter}")
    need(s.base_lr > 0, "solver.base_lr", f"must be > 0, got {s.base_lr}")
    need(s.weight_decay >= 0, "solver.weight_decay", "must be >= 0")
    need(s.backbone_multiplier >= 0, "solver.backbone_multiplier", "must be >= 0")
    need(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), "solver.betas", "must be two values in [0, 1)")
    need(0 <= s.momentum < 1, "solver.momentum", "must be in [0, 1)")
    need(s.poly_power >= 0, "solver.poly_power", "must be >= 0")
    need(list(s.steps) == sorted(s.steps) and all(0 < x < s.max_iter for x in s.steps), "solver.steps",
         f"must be increasing iterations inside (0, max_iter={s.max_iter}), got {s.steps}")
    need(s.warmup_iters >= 0, "solver.warmup_iters", "must be >= 0")
    need(0 < s.warmup_factor <= 1.0, "solver.warmup_factor", "must be in (0, 1]")
    need(s.clip_grad_norm >= 0, "solver.clip_grad_norm", "must be >= 0 (0 disables clipping)")
    need(s.grad_accum_steps >= 1, "solver.grad_accum_steps", "must be >= 1")

    need(t.log_period >= 1, "train.log_period", "must be >= 1")
    need(t.checkpoint_period >= 0, "train.checkpoint_period", "must be >= 0 (0: only last.pth at the end)")
    need(t.eval_period >= 0, "train.eval_period", "must be >= 0 (0: evaluate only at the end)")
    need(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
    need(t.num_threads >= 0, "train.num_threads", "must be >= 0")
    dev = t.device
    need(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "train.device",
         f"must be auto, cpu, cuda or cuda:N, got {dev!r}")

    need(0.0 <= te.object_mask_threshold <= 1.0, "test.object_mask_threshold", "must be in [0, 1]")
    need(0.0 <= te.overlap_threshold <= 1.0, "test.overlap_threshold", "must be in [0, 1]")
    need(te.detections_per_image >= 1, "test.detections_per_image", "must be >= 1")
    need(te.ims_per_batch >= 1, "test.ims_per_batch", "must be >= 1")
    need(te.max_images >= 0, "test.max_images", "must be >= 0")
    need(te.semantic_on or te.panoptic_on or te.instance_on, "test.semantic_on",
         "at least one of test.semantic_on / panoptic_on / instance_on must be true")
    need(len(te.aug.min_sizes) > 0, "test.aug.min_sizes", "needs at least one size")
    sw = te.sliding_window
    need(len(sw.crop_size) == 2 and len(sw.stride) == 2 and all(v > 0 for v in sw.crop_size + sw.stride),
         "test.sliding_window", "crop_size and stride must be [h, w] with positive values")
    return problems


# --------------------------------------------------------------------------------------------
# Structural checks against the schema (per file, so errors can name the file)
# --------------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError`` with a description."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except TypeError:
                continue
        raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, arg, f"{key}[{i}]"))
            except TypeError as err:
                raise TypeError(f"element {i}: {err}") from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise TypeError(f"expected number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if value is False and "off" in _CHOICES.get(key, ()):
            return "off"  # YAML 1.1 reads an unquoted `off` as false
        if not isinstance(value, str):
            raise TypeError(f"expected string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r}")


def _check_partial(data: Any, cls: type, source: str, prefix: str = "") -> None:
    """Check a (partial) mapping against dataclass ``cls``: keys known, leaf values of the right type."""
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(data).__name__} {data!r}")
    known = _fields(cls)
    hints = _hints(cls)
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} under '{where}' must be a string")
        dotted = prefix + key
        if key not in known:
            hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            if hint:
                suggestion = f" (did you mean '{prefix}{hint[0]}'?)"
            else:
                suggestion = f" (known keys under '{where}': {', '.join(sorted(known))})"
            raise ConfigError(f"{source}: unknown key '{dotted}'{suggestion}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _check_partial(value, tp, source, dotted + ".")
        else:
            try:
                _coerce(value, tp, dotted)
            except TypeError as err:
                raise ConfigError(f"{source}: '{dotted}': {err}") from None


def _build(cls: type, data: dict, base: Any = None, prefix: str = "") -> Any:
    """``base`` (default ``cls()``) with the values in ``data`` applied, recursively.

    Nested sections start from their parent's default, not their own class default: a partial
    ``data.test`` mapping keeps ``data.test.split: val`` even though ``DatasetConfig()`` says "train".
    """
    base = cls() if base is None else base
    hints = _hints(cls)
    kwargs = {}
    for name in _fields(cls):
        if name not in data:
            continue
        tp = hints[name]
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, getattr(base, name), f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return dataclasses.replace(base, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading, merging, overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, update: dict) -> dict:
    """Mappings merge recursively; every other value (lists included) replaces the base value."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _load_raw(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``_base_`` files merged under it; each file is checked on its own."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"{path}: _base_ inheritance cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '_base_' must be a path or a list of paths, got {bases!r}")
    _check_partial(data, Config, str(path))
    merged: dict = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        merged = _deep_merge(merged, _load_raw(base_path, chain + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b.c=value`` into the dotted key and the YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a plain mapping (as stored in checkpoints) plus overrides."""
    data = dict(data)
    data.pop("_base_", None)
    _check_partial(data, Config, source)
    for text in overrides:
        key, value = parse_override(text)
        patch = _nest(key, value)
        _check_partial(patch, Config, f"override {text!r}")
        data = _deep_merge(data, patch)
    cfg = _build(Config, data)
    problems = _validate(cfg)
    if problems:
        lines = "\n".join(f"  '{k}': {msg}" for k, msg in problems)
        raise ConfigError(f"{source}: impossible values:\n{lines}")
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config with its ``_base_`` chain, apply ``section.key=value`` overrides, validate.

    Args:
        path: the YAML file.
        overrides: dotted overrides, e.g. ``["solver.base_lr=2e-4", "data.crop_size=[256,256]"]``.
    Returns:
        A :class:`Config` whose ``source`` is the resolved file path.
    """
    path = Path(path)
    data = _load_raw(path)
    cfg = config_from_dict(data, overrides, source=str(path))
    cfg.source = str(path)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The config as plain data (what ``config.yaml`` and checkpoints store)."""
    out = dataclasses.asdict(cfg)
    out.pop("source", None)
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; ``load_config`` on the file gives back an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
