"""Pure state-dict key mappings from other layouts into this package's backbone layout.

Our layout is ``Backbone.state_dict()`` (:mod:`maskformer.models.backbone`): ``"body."`` followed by
timm's parameter names, plus ``norm0..norm3`` for Swin. For example::

    body.conv1.weight, body.bn1.running_mean, body.layer1.0.conv2.weight, body.layer1.0.downsample.0.weight
    body.patch_embed.proj.weight, body.layers.1.downsample.reduction.weight,
    body.layers.1.blocks.0.attn.qkv.weight, body.norm1.weight

Every function takes the backbone part of a checkpoint with the source's own prefix removed
(``backbone.`` for detectron2/official files, ``model.pixel_level_module.encoder.`` for a full HF model),
returns a new dict (the tensors are shared, never copied, except the concatenated Swin ``qkv``) and
raises :class:`KeyError` listing every key it cannot map. Buffers that are recomputed at build time
(``relative_position_index``, ``attn_mask``) and classifier leftovers are dropped.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["swin_hf_to_ours", "swin_official_to_ours", "resnet_d2_to_ours", "resnet_hf_to_ours"]

BODY = "body."

# A rule maps the groups of a full regex match to the new key, or to None to drop the key.
Rule = tuple[str, Callable[[re.Match], "str | None"]]


def rename_keys(state_dict: Mapping[str, Tensor], rules: list[Rule] | tuple[Rule, ...],
                prefix: str = "") -> tuple[dict[str, Tensor], list[str]]:
    """Apply the first full-match rule to every key (``None`` drops the key) and prepend ``prefix``.

    Returns the renamed dict and the keys no rule matched (the caller decides how to report them).
    """
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match:
                new_key = target(match)
                if new_key is not None:
                    out[prefix + new_key] = value
                break
        else:
            unmapped.append(key)
    return out, unmapped


def _apply_rules(state_dict: Mapping[str, Tensor], rules: list[Rule], source: str) -> dict[str, Tensor]:
    out, unmapped = rename_keys(state_dict, rules, BODY)
    if unmapped:
        raise KeyError(f"{source}: cannot map {len(unmapped)} key(s): {', '.join(unmapped)}")
    return out


def _drop(_: re.Match) -> None:
    return None


# ------------------------------------------------------------------------------------------------
# Swin
# ------------------------------------------------------------------------------------------------

_HF_BLOCK_PARTS = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def swin_hf_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers.MaskFormerSwinBackbone`` keys -> ours.

    HF's separate ``query/key/value`` Linears are stacked (in that order) into timm's ``qkv``;
    ``layers.i.downsample`` (end of stage i) becomes ``layers.{i+1}.downsample`` (start of stage i+1);
    ``hidden_states_norms.i`` becomes ``norm{i}``; the unused final ``model.layernorm`` is dropped.
    """
    qkv_parts: dict[tuple[str, str], dict[str, Tensor]] = {}  # (block prefix, weight|bias) -> {query: ...}
    rest = {}
    qkv_pattern = re.compile(
        r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)"
    )
    for key, value in state_dict.items():
        match = qkv_pattern.fullmatch(key)
        if match:
            stage, block, part, kind = match.groups()
            qkv_parts.setdefault((f"layers.{stage}.blocks.{block}.attn.qkv", kind), {})[part] = value
        else:
            rest[key] = value

    block_parts = "|".join(re.escape(part) for part in _HF_BLOCK_PARTS)
    rules: list[Rule] = [
        (r"model\.embeddings\.patch_embeddings\.projection\.(weight|bias)", lambda m: f"patch_embed.proj.{m[1]}"),
        (r"model\.embeddings\.norm\.(weight|bias)", lambda m: f"patch_embed.norm.{m[1]}"),
        (
            rf"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.({block_parts})\.(weight|bias)",
            lambda m: f"layers.{m[1]}.blocks.{m[2]}.{_HF_BLOCK_PARTS[m[3]]}.{m[4]}",
        ),
        (
            r"model\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table",
            lambda m: f"layers.{m[1]}.blocks.{m[2]}.attn.relative_position_bias_table",
        ),
        (r"model\.encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.relative_position_index", _drop),
        (
            r"model\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
            lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}.{m[3]}",
        ),
        (r"hidden_states_norms\.(\d+)\.(weight|bias)", lambda m: f"norm{m[1]}.{m[2]}"),
        (r"model\.layernorm\.(weight|bias)", _drop),
    ]
    out = _apply_rules(rest, rules, "HF MaskFormerSwin state dict")

    incomplete = []
    for (prefix, kind), parts in qkv_parts.items():
        if set(parts) != {"query", "key", "value"}:
            incomplete.append(f"{prefix}.{kind} (has only {sorted(parts)})")
            continue
        out[f"{BODY}{prefix}.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if incomplete:
        raise KeyError(f"HF MaskFormerSwin state dict: query/key/value incomplete for: {', '.join(incomplete)}")
    return out


def swin_official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official MaskFormer (mmseg-style) Swin keys -> ours; also reads the official Swin ImageNet files.

    Only the patch merging moves: ``layers.i.downsample`` (end of stage i) becomes
    ``layers.{i+1}.downsample``. ``relative_position_index`` and ``attn_mask`` buffers are dropped, and
    so are the classification leftovers ``norm.*`` and ``head.*`` of the ImageNet files.
    """
    rules: list[Rule] = [
        (r"patch_embed\.(proj|norm)\.(weight|bias)", lambda m: m[0]),
        (
            r"layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
            lambda m: m[0],
        ),
        (r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table", lambda m: m[0]),
        (r"layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)", _drop),
        (
            r"layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
            lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}.{m[3]}",
        ),
        (r"norm[0-9]\.(weight|bias)", lambda m: m[0]),
        (r"(norm|head)\.(weight|bias)", _drop),
    ]
    return _apply_rules(state_dict, rules, "official Swin state dict")


# ------------------------------------------------------------------------------------------------
# ResNet
# ------------------------------------------------------------------------------------------------

_NORM_TENSORS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def resnet_d2_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """detectron2 / official MaskFormer ResNet keys -> ours (timm's ResNet names).

    ``stem.conv1`` -> ``conv1``/``bn1``; with the DeepLab stem of R101c (``stem.conv{1,2,3}``) the three
    convs go to timm's deep stem ``conv1.{0,3,6}`` with norms ``conv1.1``, ``conv1.4`` and ``bn1``.
    ``res{t}.{b}.conv{k}[.norm]`` -> ``layer{t-1}.{b}.conv{k}``/``bn{k}``, ``shortcut[.norm]`` ->
    ``downsample.0``/``downsample.1``. ImageNet classifier keys (``fc``, ``stem.fc``, ``fc1000``) are dropped.
    """
    deep_stem = any(key.startswith("stem.conv2.") for key in state_dict)
    if deep_stem:
        stem_conv = {"1": "conv1.0", "2": "conv1.3", "3": "conv1.6"}
        stem_norm = {"1": "conv1.1", "2": "conv1.4", "3": "bn1"}
    else:
        stem_conv, stem_norm = {"1": "conv1"}, {"1": "bn1"}
    stems = "|".join(stem_conv)
    rules: list[Rule] = [
        (rf"stem\.conv({stems})\.weight", lambda m: f"{stem_conv[m[1]]}.weight"),
        (rf"stem\.conv({stems})\.norm\.{_NORM_TENSORS}", lambda m: f"{stem_norm[m[1]]}.{m[2]}"),
        (r"res([2-5])\.(\d+)\.conv([1-3])\.weight", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
        (
            rf"res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_NORM_TENSORS}",
            lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}",
        ),
        (r"res([2-5])\.(\d+)\.shortcut\.weight", lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
        (
            rf"res([2-5])\.(\d+)\.shortcut\.norm\.{_NORM_TENSORS}",
            lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}",
        ),
        (r"(stem\.fc|fc|fc1000)\.(weight|bias)", _drop),
    ]
    return _apply_rules(state_dict, rules, "detectron2 ResNet state dict")


def resnet_hf_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers.ResNetBackbone`` / ``ResNetModel`` keys -> ours (timm's ResNet names).

    ``embedder.embedder.{convolution,normalization}`` -> ``conv1``/``bn1``;
    ``encoder.stages.s.layers.l.layer.k`` -> ``layer{s+1}.{l}.conv{k+1}``/``bn{k+1}`` (basic and
    bottleneck blocks alike); ``...shortcut`` -> ``downsample.0``/``downsample.1``. BatchNorm's
    ``num_batches_tracked`` is kept (our frozen BatchNorm ignores it); a classifier is dropped.
    """
    rules: list[Rule] = [
        (r"embedder\.embedder\.convolution\.weight", lambda m: "conv1.weight"),
        (rf"embedder\.embedder\.normalization\.{_NORM_TENSORS}", lambda m: f"bn1.{m[1]}"),
        (
            r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.weight",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.weight",
        ),
        (
            rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.{_NORM_TENSORS}",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}",
        ),
        (
            r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.weight",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.weight",
        ),
        (
            rf"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.{_NORM_TENSORS}",
            lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}",
        ),
        (r"classifier\.\d+\.(weight|bias)", _drop),
    ]
    return _apply_rules(state_dict, rules, "HF ResNet state dict")
