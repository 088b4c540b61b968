"""Reading, recognising and converting MaskFormer weights from other implementations.

Supported sources (detected from the file's content and key names, never from its name alone):

* **official MaskFormer** model-zoo files: detectron2 ``.pkl`` (``{"model": {name: numpy array}, ...}``,
  read with a restricted unpickler, :mod:`maskformer.interop.safe_pickle`) or a torch file with the same
  keys. Both the old (v1: ``sem_seg_head.adapter_1...``) and the current (v2:
  ``sem_seg_head.pixel_decoder.adapter_1...``) head names, ResNet (R101c's deep stem too) and Swin
  backbones, the FPN and the "+6 Enc" pixel decoder (the per-pixel baselines too, given their config).
* **Hugging Face** ``MaskFormerForInstanceSegmentation``: a ``save_pretrained`` folder (``config.json``
  and ``model.safetensors`` / ``pytorch_model.bin``, sharded or not) or the weight file alone; ResNet
  and MaskFormer-Swin backbones.
* **this package**: a training checkpoint or a bare state dict.
* **backbone-only** ImageNet weights: timm/torchvision ResNet state dicts, detectron2 ``R-50.pkl``-style
  pickles (``stem.conv1``, ``res2.0...``), the official Swin ``.pth`` (``{"model": ...}``), timm Swin,
  Hugging Face ResNet/MaskFormer-Swin. They convert into a file for ``model.backbone.pretrained``.

Everything converts into this package's key layout (``MaskFormer.state_dict()``), after which the
*facts* of the weights are read from tensor shapes alone (:func:`inspect_weights`): the number of
classes (``class_embed`` has K+1 rows), the backbone (ResNet depth and stem, Swin width, depths, heads
and window size from the relative-position table), the pixel decoder and the transformer sizes.
Comparing the facts of a checkpoint with those of a model built from a config gives errors such as
"checkpoint has 133 classes and a Swin-T backbone, config says 150 classes and resnet50"; any key that
is missing, unexpected or of the wrong shape is named as well.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from maskformer.checkpoint import CHECKPOINT_FORMAT, CheckpointError, describe_mismatch, save_checkpoint
from maskformer.interop.backbone_keys import (
    Rule,
    _drop,
    rename_keys,
    resnet_d2_to_ours,
    resnet_hf_to_ours,
    swin_hf_to_ours,
    swin_official_to_ours,
)

__all__ = [
    "SourceFile",
    "Converted",
    "read_source",
    "detect_layout",
    "official_to_ours",
    "hf_to_ours",
    "backbone_to_ours",
    "inspect_weights",
    "inspect_backbone",
    "inspect_model",
    "compare_facts",
    "config_from_facts",
    "convert",
    "save_converted",
    "read_weights",
]

OFFICIAL = "official"
HUGGING_FACE = "huggingface"
OURS = "maskformer"
BACKBONE = "backbone"

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceFile:
    """A weights file as read from disk, before any renaming.

    ``state_dict``: name -> tensor (numpy arrays already converted); ``file_format``: how it was stored;
    ``hf_config``: the Hugging Face ``config.json`` next to the weights, if any; ``extras``: the other
    top-level entries of the file (``__author__``, ``detected``, ``kind``, ``config``...).
    """

    path: str
    state_dict: dict[str, Tensor]
    file_format: str
    hf_config: dict | None = None
    extras: dict = dataclasses.field(default_factory=dict)


def read_source(path: str | os.PathLike) -> SourceFile:
    """Read a weights file or a Hugging Face ``save_pretrained`` folder without running code from it.

    ``.pkl`` files go through the restricted unpickler; everything else through
    ``torch.load(weights_only=True)`` or safetensors.
    """
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    hf_config = None
    sibling = path.parent / "config.json"
    if path.name in HF_WEIGHT_FILES and sibling.is_file():
        hf_config = _read_json(sibling)
    obj, file_format = _load_file(path)
    return _unwrap(path, obj, file_format, hf_config)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_hf_folder(folder: Path) -> SourceFile:
    present = [name for name in HF_WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(
            f"{folder}: a Hugging Face model folder needs one of {', '.join(HF_WEIGHT_FILES)}; found "
            f"{sorted(p.name for p in folder.iterdir())[:20]}"
        )
    hf_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    weights = folder / present[0]
    if weights.name.endswith(".index.json"):
        index = _read_json(weights)
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{weights}: no 'weight_map' entries")
        state_dict: dict[str, Tensor] = {}
        for shard in shards:
            obj, file_format = _load_file(folder / shard)
            state_dict.update(_unwrap(folder / shard, obj, file_format, None).state_dict)
        return SourceFile(str(folder), state_dict, f"Hugging Face folder ({len(shards)} shards)", hf_config)
    obj, file_format = _load_file(weights)
    source = _unwrap(weights, obj, file_format, hf_config)
    source.path, source.file_format = str(folder), f"Hugging Face folder ({weights.name})"
    return source


def _load_file(path: Path) -> tuple[Any, str]:
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading safetensors files needs the 'safetensors' package "
                                  "(pip install safetensors)") from None
        try:
            return load_file(str(path)), "safetensors"
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if not head.startswith(b"PK"):  # not a zip archive (torch's format since 1.6): a pickle
        # A pickle (detectron2 writes plain pickles; torch's legacy format is a pickle too): the restricted
        # unpickler reads numpy arrays and refuses everything else, naming the global.
        if path.suffix != ".pkl":
            try:
                return torch.load(path, map_location="cpu", weights_only=True), "torch (legacy)"
            except Exception:
                pass
        from maskformer.interop.safe_pickle import load_pickle

        return load_pickle(path), "pickle"
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "torch"
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path} (loaded with weights_only=True): {error}") from None


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len < 100_000_000 and head[8:9] == b"{"


def _unwrap(path: Path, obj: Any, file_format: str, hf_config: dict | None) -> SourceFile:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    extras: dict = {}
    weights = obj
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            weights = obj[wrapper]
            extras = {k: v for k, v in obj.items() if k != wrapper}
            break
    state_dict: dict[str, Tensor] = {}
    for key, value in weights.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: weight names must be strings, got {key!r}")
        if isinstance(value, Tensor):
            state_dict[key] = value
        elif isinstance(value, (np.ndarray, np.generic)):
            array = value if isinstance(value, np.ndarray) and value.flags.writeable else np.array(value)
            state_dict[key] = torch.from_numpy(array)  # shares the unpickled array's memory
        else:
            raise CheckpointError(f"{path}: '{key}' holds a {type(value).__name__}, not a tensor or numpy array")
    return SourceFile(str(path), state_dict, file_format, hf_config, extras)


# ------------------------------------------------------------------------------------------------
# Recognising the layout
# ------------------------------------------------------------------------------------------------


def _strip_module(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``module.`` of (Distributed)DataParallel."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"official"``, ``"huggingface"``, ``"maskformer"`` (ours) or ``"backbone"`` (backbone weights only)."""
    keys = list(_strip_module(state_dict))
    if not keys:
        raise CheckpointError("the file holds no weights")
    if any(k.startswith("sem_seg_head.") for k in keys):
        return OFFICIAL
    if any(k.startswith(("model.pixel_level_module.", "model.transformer_module.", "class_predictor.")) for k in keys):
        return HUGGING_FACE
    if any(k.startswith(("pixel_level_module.", "transformer_module.")) for k in keys):
        raise CheckpointError(
            "this is a Hugging Face MaskFormerModel without the class and mask heads (keys start with "
            "'pixel_level_module.'); save a MaskFormerForInstanceSegmentation instead"
        )
    if any(k.startswith("predictor.") for k in keys) and any(k.startswith("pixel_decoder.") for k in keys):
        return OURS
    _backbone_layout(dict.fromkeys(keys))  # raises for anything unrecognisable
    return BACKBONE


def _backbone_layout(state_dict: Mapping[str, Any]) -> str:
    keys = set(state_dict)
    for prefix in ("backbone.", "resnet."):
        if keys and all(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):] for k in keys}
    if any(k.startswith("body.") for k in keys):
        return "ours"
    if "stem.conv1.weight" in keys:
        return "detectron2 resnet"
    if any(re.match(r"res\d_\d+_branch", k) for k in keys) or "conv1_w" in keys:
        raise CheckpointError(
            "these are Caffe2-style ResNet names (e.g. MSRA R-50.pkl: 'res2_0_branch2a_w'), which this "
            "package does not read; use torchvision/timm weights or detectron2's torchvision R-50.pkl"
        )
    if "embedder.embedder.convolution.weight" in keys:
        return "huggingface resnet"
    if ("conv1.weight" in keys or "conv1.0.weight" in keys) and "layer1.0.conv1.weight" in keys:
        return "timm resnet"
    if "model.embeddings.patch_embeddings.projection.weight" in keys:
        return "huggingface swin"
    if "patch_embed.proj.weight" in keys:
        if any(k.startswith("layers.0.downsample.") for k in keys):
            return "official swin"
        return "timm swin"
    shown = ", ".join(sorted(keys)[:8])
    raise CheckpointError(
        f"cannot tell what these weights are: not an official MaskFormer, Hugging Face MaskFormer, this "
        f"package's or a known backbone layout (first keys: {shown})"
    )


# ------------------------------------------------------------------------------------------------
# Renaming
# ------------------------------------------------------------------------------------------------

def _rename(state_dict: Mapping[str, Tensor], rules: Sequence[Rule], source: str) -> dict[str, Tensor]:
    """Apply the first full-match rule to every key; ``None`` drops the key; unmatched keys are an error."""
    out, unmapped = rename_keys(state_dict, tuple(rules))
    if unmapped:
        raise CheckpointError(f"{source}: {len(unmapped)} unexpected key(s) that map to nothing in MaskFormer: "
                              + _listing(unmapped))
    return out


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _split_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return inside, outside


def _without_bn_counters(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (detectron2) MaskFormer keys, v1 or v2 head names, -> ``MaskFormer.state_dict()`` keys.

    v1 files have the pixel decoder directly under ``sem_seg_head``; ``pixel_decoder.`` is inserted only
    when no key already starts with ``sem_seg_head.pixel_decoder.`` (the original's version hook).
    ``criterion.empty_weight`` (recomputed from the loss config), ``pixel_mean``/``pixel_std`` (config)
    and the Swin ``relative_position_index``/``attn_mask`` buffers (recomputed) are dropped.
    """
    state_dict = _strip_module(state_dict)
    if not any(k.startswith("sem_seg_head.pixel_decoder.") for k in state_dict):
        state_dict = {
            ("sem_seg_head.pixel_decoder." + k[len("sem_seg_head."):])
            if k.startswith("sem_seg_head.") and not k.startswith("sem_seg_head.predictor.") else k: v
            for k, v in state_dict.items()
        }
    backbone, rest = _split_prefix(state_dict, "backbone.")
    if "patch_embed.proj.weight" in backbone:
        body = _mapped(swin_official_to_ours, backbone, "official Swin backbone")
    elif "stem.conv1.weight" in backbone:
        body = _mapped(resnet_d2_to_ours, backbone, "official ResNet backbone")
    else:
        raise CheckpointError("official checkpoint: the 'backbone.*' keys are neither a detectron2 ResNet "
                              f"('backbone.stem.conv1.weight') nor a Swin ('backbone.patch_embed.proj.weight'): "
                              f"{_listing(list(backbone), 8)}")
    out = {"backbone." + k: v for k, v in _without_bn_counters(body).items()}

    pd, pr = re.escape("sem_seg_head.pixel_decoder."), re.escape("sem_seg_head.predictor.")
    dec = pr + re.escape("transformer.decoder.")
    rules: list[Rule] = [
        (r"criterion\.empty_weight|pixel_mean|pixel_std", _drop),
        (rf"{pd}transformer\.encoder\.layers\.(\d+)\.(.+)",
         lambda m: f"pixel_decoder.transformer.layers.{m[1]}.{m[2]}"),
        (rf"{pd}transformer\.encoder\.norm\.(weight|bias)", lambda m: f"pixel_decoder.transformer.norm.{m[1]}"),
        (rf"{pd}((?:adapter|layer)_\d|mask_features|input_proj)\.(.+)", lambda m: f"pixel_decoder.{m[1]}.{m[2]}"),
        (rf"{dec}layers\.(\d+)\.multihead_attn\.(.+)", lambda m: f"predictor.decoder.layers.{m[1]}.cross_attn.{m[2]}"),
        (rf"{dec}layers\.(\d+)\.((?:self_attn|linear1|linear2|norm1|norm2|norm3)\..+)",
         lambda m: f"predictor.decoder.layers.{m[1]}.{m[2]}"),
        (rf"{dec}norm\.(weight|bias)", lambda m: f"predictor.decoder.norm.{m[1]}"),
        (rf"{pr}(query_embed|input_proj|class_embed|mask_embed)\.(.+)", lambda m: f"predictor.{m[1]}.{m[2]}"),
        (rf"{pr}(weight|bias)", lambda m: f"predictor.{m[1]}"),  # PerPixelBaseline's 1x1 classifier
    ]
    out.update(_rename(rest, rules, "official MaskFormer checkpoint"))
    return out


def _mapped(fn: Callable[[Mapping[str, Tensor]], dict[str, Tensor]], state_dict: Mapping[str, Tensor],
            what: str) -> dict[str, Tensor]:
    try:
        return fn(state_dict)
    except KeyError as error:  # the key maps list what they cannot map
        raise CheckpointError(f"{what}: {error.args[0]}") from None


_HF_LAYER_PARTS = {
    "fc1": "linear1",
    "fc2": "linear2",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "self_attn.out_proj": "self_attn.out_proj",
    "encoder_attn.out_proj": "cross_attn.out_proj",
}


def hf_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``MaskFormerForInstanceSegmentation`` keys -> ``MaskFormer.state_dict()`` keys.

    The decoder's separate ``q_proj/k_proj/v_proj`` are stacked (in that order) into
    ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias``; the FPN's ``layers.{0,1,2}``
    (top-down: res4, res3, res2) become ``adapter/layer_{3,2,1}``, ``fpn.stem`` is ``layer_4`` and
    ``mask_projection`` is ``mask_features``. ``criterion.empty_weight``, Swin's unused final
    ``layernorm`` and ``relative_position_index`` buffers and BatchNorm counters are dropped.
    """
    state_dict = _strip_module(state_dict)
    backbone, rest = _split_prefix(state_dict, "model.pixel_level_module.encoder.")
    if any(k.startswith(("model.embeddings.", "hidden_states_norms.")) for k in backbone):
        body = _mapped(swin_hf_to_ours, backbone, "Hugging Face MaskFormer-Swin backbone")
    elif "embedder.embedder.convolution.weight" in backbone:
        body = _mapped(resnet_hf_to_ours, backbone, "Hugging Face ResNet backbone")
    else:
        raise CheckpointError(
            "Hugging Face checkpoint: the backbone ('model.pixel_level_module.encoder.*') is neither "
            "MaskFormer-Swin nor transformers' ResNet (timm backbones are not supported): "
            + _listing(list(backbone), 8)
        )
    out = {"backbone." + k: v for k, v in _without_bn_counters(body).items()}

    # q/k/v projections -> one stacked in_proj per attention.
    dec = "model.transformer_module.decoder.layers."
    qkv_pattern = re.compile(rf"{re.escape(dec)}(\d+)\.(self_attn|encoder_attn)\.(q|k|v)_proj\.(weight|bias)")
    parts: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    others = {}
    for key, value in rest.items():
        match = qkv_pattern.fullmatch(key)
        if match:
            layer, attn, which, kind = match.groups()
            parts.setdefault((layer, attn, kind), {})[which] = value
        else:
            others[key] = value
    for (layer, attn, kind), found in sorted(parts.items()):
        name = "self_attn" if attn == "self_attn" else "cross_attn"
        if set(found) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(found))
            raise CheckpointError(f"Hugging Face checkpoint: missing key(s) "
                                  + ", ".join(f"{dec}{layer}.{attn}.{p}_proj.{kind}" for p in missing))
        out[f"predictor.decoder.layers.{layer}.{name}.in_proj_{kind}"] = torch.cat(
            [found["q"], found["k"], found["v"]], dim=0)

    fpn = re.escape("model.pixel_level_module.decoder.fpn.")
    layer_parts = "|".join(re.escape(p) for p in _HF_LAYER_PARTS)
    rules: list[Rule] = [
        (r"criterion\.empty_weight", _drop),
        (rf"{fpn}stem\.0\.weight", lambda m: "pixel_decoder.layer_4.weight"),
        (rf"{fpn}stem\.1\.(weight|bias)", lambda m: f"pixel_decoder.layer_4.norm.{m[1]}"),
        # HF's FPN layers run top-down (res4, res3, res2): layers.j is level 3 - j of the original.
        (rf"{fpn}layers\.([0-2])\.proj\.0\.weight", lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}.weight"),
        (rf"{fpn}layers\.([0-2])\.proj\.1\.(weight|bias)",
         lambda m: f"pixel_decoder.adapter_{3 - int(m[1])}.norm.{m[2]}"),
        (rf"{fpn}layers\.([0-2])\.block\.0\.weight", lambda m: f"pixel_decoder.layer_{3 - int(m[1])}.weight"),
        (rf"{fpn}layers\.([0-2])\.block\.1\.(weight|bias)",
         lambda m: f"pixel_decoder.layer_{3 - int(m[1])}.norm.{m[2]}"),
        (r"model\.pixel_level_module\.decoder\.mask_projection\.(weight|bias)",
         lambda m: f"pixel_decoder.mask_features.{m[1]}"),
        (r"model\.transformer_module\.queries_embedder\.weight", lambda m: "predictor.query_embed.weight"),
        (r"model\.transformer_module\.input_projection\.(weight|bias)", lambda m: f"predictor.input_proj.{m[1]}"),
        (rf"{re.escape(dec)}(\d+)\.({layer_parts})\.(weight|bias)",
         lambda m: f"predictor.decoder.layers.{m[1]}.{_HF_LAYER_PARTS[m[2]]}.{m[3]}"),
        (r"model\.transformer_module\.decoder\.layernorm\.(weight|bias)", lambda m: f"predictor.decoder.norm.{m[1]}"),
        (r"class_predictor\.(weight|bias)", lambda m: f"predictor.class_embed.{m[1]}"),
        (r"mask_embedder\.(\d+)\.0\.(weight|bias)", lambda m: f"predictor.mask_embed.layers.{m[1]}.{m[2]}"),
    ]
    out.update(_rename(others, rules, "Hugging Face MaskFormer checkpoint"))
    return out


def backbone_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Backbone-only weights of any supported layout -> ``Backbone.state_dict()`` keys (``body.*``).

    ImageNet leftovers (classifier ``fc``/``head``, Swin's final ``norm``) and recomputed buffers are
    dropped; Swin's per-stage ``norm0..3`` are absent from ImageNet files and stay so (they start at
    ones/zeros, as in the original).
    """
    state_dict = _strip_module(state_dict)
    layout = _backbone_layout(state_dict)
    for prefix in ("backbone.", "resnet."):
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if layout == "ours":
        body = {k: v for k, v in state_dict.items() if k.startswith("body.")}
    elif layout == "detectron2 resnet":
        body = _mapped(resnet_d2_to_ours, state_dict, "detectron2 ResNet weights")
    elif layout == "huggingface resnet":
        body = _mapped(resnet_hf_to_ours, state_dict, "Hugging Face ResNet weights")
    elif layout == "official swin":
        body = _mapped(swin_official_to_ours, state_dict, "official Swin weights")
    elif layout == "huggingface swin":
        body = _mapped(swin_hf_to_ours, state_dict, "Hugging Face Swin weights")
    elif layout == "timm swin":
        rules: list[Rule] = [
            (r"(head|norm)\..+|.*\.(relative_position_index|attn_mask)", _drop),
            (r"(patch_embed|layers|norm\d)\..+", lambda m: "body." + m[0]),
        ]
        body = _rename(state_dict, rules, "timm Swin weights")
    else:  # timm / torchvision ResNet: already our names
        rules = [
            (r"(fc|head|classifier)\..+", _drop),
            (r"(conv1|bn1|layer[1-4])\..+", lambda m: "body." + m[0]),
        ]
        body = _rename(state_dict, rules, "timm/torchvision ResNet weights")
    return _without_bn_counters(body)


# ------------------------------------------------------------------------------------------------
# Facts read from the weights
# ------------------------------------------------------------------------------------------------

# (block type, blocks per stage, deep stem) -> timm name (our alias for R101c).
_RESNETS = {
    ("basic", (2, 2, 2, 2), False): "resnet18",
    ("basic", (3, 4, 6, 3), False): "resnet34",
    ("bottleneck", (2, 2, 2, 2), False): "resnet26",
    ("bottleneck", (3, 4, 6, 3), False): "resnet50",
    ("bottleneck", (3, 4, 23, 3), False): "resnet101",
    ("bottleneck", (3, 8, 36, 3), False): "resnet152",
    ("bottleneck", (3, 4, 23, 3), True): "resnet101c",
}
_LABELS = {
    "resnet18": "ResNet-18",
    "resnet26": "ResNet-26",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnet152": "ResNet-152",
    "resnet101c": "R101c (ResNet-101, deep stem)",
    "swin_tiny_patch4_window7_224": "Swin-T",
    "swin_small_patch4_window7_224": "Swin-S",
    "swin_base_patch4_window7_224": "Swin-B (window 7)",
    "swin_base_patch4_window12_384": "Swin-B (window 12)",
    "swin_large_patch4_window7_224": "Swin-L (window 7)",
    "swin_large_patch4_window12_384": "Swin-L (window 12)",
}


def _count(keys: Sequence[str], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` (0 if it never matches)."""
    compiled = re.compile(pattern)
    found = [int(m[1]) for k in keys if (m := compiled.match(k))]
    return max(found) + 1 if found else 0


def inspect_backbone(shapes: Mapping[str, Sequence[int]]) -> dict:
    """Facts of a backbone from ``Backbone.body`` key names and shapes (``body.`` already removed).

    Returns ``{"family": "resnet"|"swin"|"unknown", "name": timm name or None, "label": readable,
    "channels": [C2..C5], ...}`` plus ``block``/``depths``/``deep_stem`` (ResNet) or
    ``embed_dim``/``depths``/``num_heads``/``window_size``/``patch_size`` (Swin).
    """
    keys = list(shapes)
    if "patch_embed.proj.weight" in shapes:
        embed_dim = int(shapes["patch_embed.proj.weight"][0])
        num_stages = _count(keys, r"layers\.(\d+)\.")
        depths = [_count(keys, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
        tables = [shapes.get(f"layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(num_stages)]
        if any(t is None for t in tables):
            raise CheckpointError("Swin weights without 'layers.i.blocks.0.attn.relative_position_bias_table'")
        num_heads = [int(t[1]) for t in tables]
        side = math.isqrt(int(tables[0][0]))
        if side * side != int(tables[0][0]) or side % 2 == 0:
            raise CheckpointError(f"Swin relative position table of {tables[0][0]} rows is not (2W-1)^2")
        window = (side + 1) // 2
        facts = {"family": "swin", "embed_dim": embed_dim, "depths": depths, "num_heads": num_heads,
                 "window_size": window, "patch_size": int(shapes["patch_embed.proj.weight"][-1]),
                 "channels": [embed_dim * 2**i for i in range(num_stages)]}
        from maskformer.models.swin import SWIN_VARIANTS

        name = next((n for n, v in SWIN_VARIANTS.items()
                     if (v["embed_dim"], list(v["depths"]), list(v["num_heads"]), v["window_size"])
                     == (embed_dim, depths, num_heads, window) and facts["patch_size"] == 4), None)
        label = _LABELS.get(name) or (f"Swin (embed_dim {embed_dim}, depths {depths}, heads {num_heads}, "
                                      f"window {window})")
        return {"name": name, "label": label, **facts}
    stem = "conv1.0.weight" if "conv1.0.weight" in shapes else "conv1.weight"
    if stem in shapes and "layer1.0.conv1.weight" in shapes:
        block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
        last_conv = "conv3" if block == "bottleneck" else "conv2"
        depths = [_count(keys, rf"layer{i}\.(\d+)\.") for i in range(1, 5)]
        channels = [int(shapes[f"layer{i}.0.{last_conv}.weight"][0]) for i in range(1, 5) if depths[i - 1]]
        deep_stem = stem == "conv1.0.weight"
        name = _RESNETS.get((block, tuple(depths), deep_stem))
        if deep_stem and int(shapes[stem][0]) != 64:
            name = None  # timm's 32-wide deep stems (resnet50d, ...) are other models
        label = _LABELS.get(name) or f"ResNet ({block} blocks, depths {depths}{', deep stem' if deep_stem else ''})"
        return {"family": "resnet", "name": name, "label": label, "block": block, "depths": depths,
                "deep_stem": deep_stem, "channels": channels}
    return {"family": "unknown", "name": None, "label": "an unrecognised backbone", "channels": None}


def inspect_weights(state_dict: Mapping[str, Tensor]) -> dict:
    """Facts of a full model from ``MaskFormer.state_dict()`` key names and shapes (no values are read).

    Keys: ``num_classes``, ``num_queries``, ``hidden_dim``, ``mask_dim``, ``conv_dim``, ``dec_layers``,
    ``dim_feedforward``, ``pixel_decoder``, ``pixel_decoder_enc_layers``, ``transformer_in_feature``,
    ``enforce_input_proj``, ``backbone`` (see :func:`inspect_backbone`).
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    required = ["predictor.class_embed.weight", "predictor.query_embed.weight", "pixel_decoder.layer_4.weight",
                "pixel_decoder.layer_1.weight", "predictor.decoder.layers.0.linear1.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(f"cannot read the model's sizes: missing key(s) {', '.join(missing)}")
    keys = list(shapes)
    body = {k[len("backbone.body."):]: s for k, s in shapes.items() if k.startswith("backbone.body.")}
    backbone = inspect_backbone(body)
    num_queries, hidden_dim = shapes["predictor.query_embed.weight"]
    conv_dim = shapes["pixel_decoder.layer_1.weight"][0]
    enc_layers = _count(keys, r"pixel_decoder\.transformer\.layers\.(\d+)\.")
    has_encoder = "pixel_decoder.input_proj.weight" in shapes
    if has_encoder:
        res5 = shapes["pixel_decoder.input_proj.weight"][1]
    else:
        res5 = shapes["pixel_decoder.layer_4.weight"][1]
    mask_layers = _count(keys, r"predictor\.mask_embed\.layers\.(\d+)\.")
    mask_dim = shapes.get(f"predictor.mask_embed.layers.{mask_layers - 1}.weight", (None,))[0]
    proj = shapes.get("predictor.input_proj.weight")
    if proj is None:
        in_feature = "transformer_encoder" if has_encoder else "res5"
        enforce = False
    elif has_encoder and proj[1] == conv_dim and proj[1] != res5:
        in_feature, enforce = "transformer_encoder", True
    else:
        in_feature, enforce = "res5", proj[1] == hidden_dim
    return {
        "num_classes": int(shapes["predictor.class_embed.weight"][0]) - 1,
        "backbone": backbone,
        "pixel_decoder": "transformer_encoder_fpn" if has_encoder else "fpn",
        "pixel_decoder_enc_layers": enc_layers,
        "transformer_in_feature": in_feature,
        "enforce_input_proj": bool(enforce),
        "num_queries": int(num_queries),
        "hidden_dim": int(hidden_dim),
        "mask_dim": None if mask_dim is None else int(mask_dim),
        "conv_dim": int(conv_dim),
        "dec_layers": _count(keys, r"predictor\.decoder\.layers\.(\d+)\."),
        "dim_feedforward": int(shapes["predictor.decoder.layers.0.linear1.weight"][0]),
    }


def inspect_model(model: nn.Module) -> dict:
    """:func:`inspect_weights` of a built model, plus ``nheads`` read from its attention modules."""
    facts = inspect_weights(model.state_dict())
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    facts["nheads"] = attention[0].num_heads if attention else None
    return facts


def _hf_facts(hf_config: dict | None) -> dict:
    """What only ``config.json`` knows: the number of attention heads."""
    if not hf_config:
        return {}
    decoder = hf_config.get("decoder_config") or {}
    heads = decoder.get("decoder_attention_heads")
    return {"nheads": int(heads)} if isinstance(heads, int) else {}


_COMPARED = ("pixel_decoder", "pixel_decoder_enc_layers", "transformer_in_feature", "enforce_input_proj",
             "num_queries", "hidden_dim", "mask_dim", "conv_dim", "dec_layers", "dim_feedforward", "nheads")


def _same_backbone(a: dict, b: dict) -> bool:
    if "unknown" in (a.get("family"), b.get("family")):
        return True  # nothing to compare on; the key check decides
    drop = ("label", "name")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def compare_facts(checkpoint: dict, target: dict, *, target_name: str = "config",
                  target_backbone: str | None = None) -> str | None:
    """``None`` if ``checkpoint`` fits ``target`` (both from :func:`inspect_weights`), else a one-paragraph
    explanation such as "checkpoint has 133 classes and a Swin-T backbone, config says 150 classes and
    resnet50 (ResNet-50)". ``target_backbone``: the backbone as the config names it.
    """
    if "num_classes" not in checkpoint:  # backbone-only facts
        if _same_backbone(checkpoint["backbone"], target["backbone"]):
            return None
        return (f"checkpoint has a {checkpoint['backbone']['label']} backbone, {target_name} says "
                f"{_backbone_text(target['backbone'], target_backbone)}")
    differences = []
    if checkpoint["num_classes"] != target["num_classes"] or not _same_backbone(checkpoint["backbone"],
                                                                                target["backbone"]):
        differences.append(
            f"checkpoint has {checkpoint['num_classes']} classes and a {checkpoint['backbone']['label']} backbone, "
            f"{target_name} says {target['num_classes']} classes and "
            f"{_backbone_text(target['backbone'], target_backbone)}"
        )
    for key in _COMPARED:
        a, b = checkpoint.get(key), target.get(key)
        if a is not None and b is not None and a != b:
            differences.append(f"{key}: checkpoint {a}, {target_name} {b}")
    return "; ".join(differences) or None


def _backbone_text(facts: dict, configured: str | None) -> str:
    if configured and facts.get("label") and facts.get("name") != configured:
        return f"{configured} ({facts['label']})"
    return configured or facts.get("label", "?")


def config_from_facts(facts: dict):
    """A :class:`~maskformer.config.Config` whose model has the detected architecture (``None`` when the
    backbone has no buildable name). Used to check a conversion when no config is given."""
    backbone = facts["backbone"]
    if not backbone.get("name"):
        return None
    from maskformer.config import config_from_dict

    hidden = facts["hidden_dim"]
    nheads = facts.get("nheads") or next(h for h in (8, 4, 2, 1) if hidden % h == 0)
    model = {key: facts[key] for key in ("num_classes", "pixel_decoder", "transformer_in_feature",
                                          "enforce_input_proj", "num_queries", "hidden_dim", "conv_dim",
                                          "dec_layers", "dim_feedforward")}
    model.update(backbone={"name": backbone["name"], "pretrained": False}, nheads=nheads,
                 pixel_decoder_enc_layers=facts["pixel_decoder_enc_layers"] or 6,
                 mask_dim=facts["mask_dim"] or facts["conv_dim"])
    return config_from_dict({"model": model}, source="<detected from the checkpoint>")


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Converted:
    """Weights in this package's layout.

    ``kind``: ``"model"`` (``MaskFormer.state_dict()`` keys) or ``"backbone"`` (``Backbone.state_dict()``
    keys, ``body.*``, for ``model.backbone.pretrained``); ``source_layout``: what was read, e.g.
    ``"official (v1 head names)"``; ``facts``: :func:`inspect_weights` (``{"backbone": ...}`` for a backbone).
    """

    state_dict: dict[str, Tensor]
    kind: str
    source_layout: str
    facts: dict
    source: str = ""


def to_ours(source: SourceFile) -> Converted:
    """Rename ``source`` into this package's layout and read its facts (no model is built)."""
    state_dict = _strip_module(source.state_dict)
    if source.extras.get("kind") == BACKBONE:
        layout = BACKBONE
    else:
        layout = detect_layout(state_dict)
    if layout == BACKBONE:
        sub = _backbone_layout(state_dict)
        body = backbone_to_ours(state_dict)
        facts = {"backbone": inspect_backbone({k[len("body."):]: tuple(v.shape) for k, v in body.items()})}
        return Converted(body, BACKBONE, f"backbone ({sub})", facts, source.path)
    if layout == OFFICIAL:
        v1 = not any(k.startswith("sem_seg_head.pixel_decoder.") for k in state_dict)
        converted = official_to_ours(state_dict)
        described = f"official MaskFormer ({'v1' if v1 else 'v2'} head names)"
    elif layout == HUGGING_FACE:
        converted = hf_to_ours(state_dict)
        described = "Hugging Face MaskFormerForInstanceSegmentation"
    else:
        converted = dict(state_dict)  # BatchNorm counters of a trainable-BN model are kept
        described = "this package"
    try:
        facts = inspect_weights(converted)
    except CheckpointError as error:
        # Per-pixel baselines (no class head) or incomplete files: the key check against a model decides.
        facts = {"unreadable": str(error)}
    facts.update(_hf_facts(source.hf_config))
    stored = source.extras.get("detected")
    if layout == OURS and isinstance(stored, dict) and stored.get("nheads") and not facts.get("nheads"):
        facts["nheads"] = stored["nheads"]
    return Converted(converted, "model", described, facts, source.path)


def _build_for_checking(cfg) -> nn.Module:
    """The model of ``cfg`` with no backbone download, on the meta device when possible (shapes only)."""
    from maskformer.models.build import build_maskformer

    cfg = _without_pretrained(cfg)
    try:
        with torch.device("meta"):
            return build_maskformer(cfg)
    except Exception:  # a backbone that cannot be built on the meta device: build it for real
        return build_maskformer(cfg)


def _without_pretrained(cfg):
    backbone = dataclasses.replace(cfg.model.backbone, pretrained=False)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))


def align_to_model(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Add or drop BatchNorm ``num_batches_tracked`` counters to match ``expected`` (a trainable
    BatchNorm has them, the frozen one and every foreign layout do not)."""
    out = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked") or k in expected}
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = torch.zeros((), dtype=torch.long)
    return out


def _check_model(converted: Converted, model: nn.Module, *, where: str, target_name: str,
                 target_backbone: str | None) -> dict[str, Tensor]:
    try:
        target = inspect_model(model)
    except CheckpointError:  # not shaped like a MaskFormer: only the key check applies
        target = None
    problem = None
    if target is not None and "unreadable" not in converted.facts:
        problem = compare_facts(converted.facts, target, target_name=target_name, target_backbone=target_backbone)
    state_dict = align_to_model(converted.state_dict, model.state_dict())
    keys = describe_mismatch(model, state_dict)
    if problem or keys:
        lines = [f"{where}: the checkpoint does not fit the model built from the {target_name}"]
        if problem:
            lines.append(problem)
        lines.extend(keys)
        raise CheckpointError("\n".join(lines))
    return state_dict


def _check_backbone(converted: Converted, cfg, *, where: str) -> None:
    from maskformer.models.build import build_backbone
    from maskformer.models.swin import SwinTransformer

    cfg = _without_pretrained(cfg)
    try:
        with torch.device("meta"):
            backbone = build_backbone(cfg.model)
    except Exception:
        backbone = build_backbone(cfg.model)
    expected = {"body." + k: v for k, v in backbone.body.state_dict().items()}
    target = {"backbone": inspect_backbone({k[5:]: tuple(v.shape) for k, v in expected.items()})}
    problem = compare_facts(converted.facts, target, target_backbone=cfg.model.backbone.name)
    state_dict = align_to_model(converted.state_dict, expected)
    missing = sorted(set(expected) - set(state_dict))
    if isinstance(backbone.body, SwinTransformer):  # ImageNet Swin files have no per-stage norms
        missing = [k for k in missing if not re.fullmatch(r"body\.norm\d\.(weight|bias)", k)]
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    if problem or missing or unexpected or shapes:
        lines = [f"{where}: the backbone weights do not fit backbone '{cfg.model.backbone.name}' of the config"]
        if problem:
            lines.append(problem)
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"{title} ({len(items)}): {_listing(items)}")
        raise CheckpointError("\n".join(lines))


def convert(path: str | os.PathLike, config=None) -> tuple[Converted, Any]:
    """Read ``path`` (any supported layout), convert it and check it.

    With ``config`` (a :class:`~maskformer.config.Config` or a YAML path) the weights are checked
    against the model the config builds (random init, ``pretrained`` off, nothing downloaded); without,
    against a model of the detected architecture when its backbone has a buildable name. Returns
    ``(converted, config used for the check or None)``; raises :class:`CheckpointError` naming
    missing/unexpected/mis-shaped keys and the facts that differ.
    """
    from maskformer.config import load_config

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    converted = to_ours(read_source(path))
    where = str(path)
    if converted.kind == BACKBONE:
        if config is not None:
            _check_backbone(converted, config, where=where)
        elif converted.facts["backbone"].get("name"):
            from maskformer.config import config_from_dict

            detected = config_from_dict({"model": {"backbone": {"name": converted.facts["backbone"]["name"]}}})
            _check_backbone(converted, detected, where=where)
        return converted, config
    if config is not None:
        model = _build_for_checking(config)
        converted.state_dict = _check_model(converted, model, where=where, target_name="config",
                                            target_backbone=config.model.backbone.name)
        return converted, config
    if "unreadable" in converted.facts:
        raise CheckpointError(f"{where}: {converted.facts['unreadable']}. The architecture cannot be detected "
                              "(a per-pixel baseline, or an incomplete checkpoint): give the config it belongs to")
    detected = config_from_facts(converted.facts)
    if detected is not None:
        model = _build_for_checking(detected)
        converted.state_dict = _check_model(converted, model, where=where, target_name="detected architecture",
                                            target_backbone=None)
    return converted, None


def save_converted(converted: Converted, out: str | os.PathLike, config=None) -> None:
    """Write ``converted`` as a checkpoint of this package (``torch.load(weights_only=True)`` reads it).

    ``{"format": "maskformer/1", "model": state_dict, "detected": facts, "source": file name}``, plus
    ``"config"`` (with ``model.backbone.pretrained`` off: the file holds every weight) when a config was
    checked, and ``"kind": "backbone"`` for backbone-only weights (use those as ``model.backbone.pretrained``).
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.contiguous() for k, v in converted.state_dict.items()},
        "detected": converted.facts,
        "source": os.path.basename(os.path.normpath(converted.source)) if converted.source else "",
    }
    if converted.kind == BACKBONE:
        payload["kind"] = BACKBONE
    if config is not None:
        from maskformer.config import config_to_dict

        payload["config"] = config_to_dict(config if converted.kind == BACKBONE else _without_pretrained(config))
    save_checkpoint(payload, out)


def read_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, Tensor]:
    """The weights in ``path`` as a state dict for ``model`` (used by ``checkpoint.load_model_weights``).

    Reads this package's checkpoints and converts official ``.pkl`` and Hugging Face checkpoints on
    the fly. Raises :class:`CheckpointError` when the checkpoint's facts (classes, backbone, sizes) or
    keys do not fit ``model``, or when the file holds backbone weights only.
    """
    converted = to_ours(read_source(path))
    if converted.kind == BACKBONE:
        raise CheckpointError(
            f"{path} holds backbone weights only ({converted.facts['backbone']['label']}); use it as "
            "model.backbone.pretrained, not as the weights of the whole model"
        )
    backbone_name = getattr(getattr(model, "backbone", None), "name", None)
    return _check_model(converted, model, where=str(path), target_name="config", target_backbone=backbone_name)
