#!/usr/bin/env python
"""Parameters and FLOPs of a MaskFormer config, counted the way the paper counts them.

    python tools/analyze_model.py configs/ade20k-150/maskformer_R50_bs16_160k.yaml
    python tools/analyze_model.py configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml --size 640 640
    python tools/analyze_model.py CONFIG model.num_queries=50 --json out.json

**Convention.** FLOPs are fvcore's, as the paper reports them (via detectron2's ``FlopCountAnalysis``):
one multiply-add is one FLOP. Counted: convolutions, matrix products (linear, matmul, bmm,
einsum, attention), GroupNorm/LayerNorm (5 per element), nearest upsampling (1 per output
element), bilinear upsampling and grid sampling (4 per output element), adaptive average pooling
(1 per input element). Not counted (detectron2's ignore list): batch norm, element-wise
arithmetic, activations, softmax, pooling, sorting. The products and convolutions come from
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, halved here); the other ops
get fvcore's formulas.

**What is counted** (the original's ``tools/analyze_model.py``: the detectron2 evaluation forward
on one zero image of ``CROP_SIZE[0]^2`` for semantic configs):

* the network as this implementation's evaluation forward runs it: the mask einsum of the last
  decoder layer only;
* post-processing: the 4x bilinear upsampling of the mask logits, the semantic
  ``einsum("qc,qhw->chw")`` of class probabilities and masks (semantic configs), and detectron2's
  ``sem_seg_postprocess`` resize to the output size (same-size, still counted);
* for Swin backbones, the original's q/k/v and output projections of the window-padding tokens,
  which this implementation skips (``original_swin_padding_flops``).

The sum ("paper protocol") reproduces the paper: ADE20K 512x512 R50 52.8G (paper 53G), Swin-T
55.0G (paper 55G). The original also computes the 5 auxiliary layers' masks in eval mode
(deep supervision stays on); counting them gives 55.0G and 57.3G, 4% above the paper for both,
so the paper's figures leave them out; they are printed separately. "this implementation" is the
count without the Swin padding term. Panoptic configs: the paper averages over 100 validation
images; this tool takes one image of ``--size`` (default: ``min_size_test`` square).

Parameters are listed per top-level module (backbone, pixel_decoder, predictor) and their children.
Weights are random (no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from math import prod
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import Config, load_config  # noqa: E402
from maskformer.inference import semantic_inference  # noqa: E402
from maskformer.models.build import build_maskformer  # noqa: E402

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------
# FLOPs, fvcore convention
# ------------------------------------------------------------------------------------------------

def _norm_flops(x, *args, out_shape=None, **kwargs) -> int:
    # fvcore's norm_flop_counter: 5 per element with an affine transform (always the case here).
    return 2 * 5 * prod(x)


def _upsample_flops(per_output: int) -> Callable[..., int]:
    def formula(*args, out_shape=None, **kwargs) -> int:
        return 2 * per_output * prod(out_shape)
    return formula


def _avg_pool_flops(x, *args, out_shape=None, **kwargs) -> int:
    return 2 * prod(x)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA attention kernels only; the CPU one does the same products.
    return sdpa_flop_count(query, key, value)


# Values are 2x fvcore's so that, like FlopCounterMode's own 2-per-multiply-add formulas, they halve
# to fvcore's count.
FVCORE_EXTRA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten.native_group_norm: _norm_flops,
    aten.native_layer_norm: _norm_flops,
    aten.upsample_nearest2d: _upsample_flops(1),
    # FlopCounterMode decomposes ops it finds no formula for *by overload* (and then counts by
    # packet): nearest upsampling has a decomposition (into indexing) that would hide it.
    aten.upsample_nearest2d.default: _upsample_flops(1),
    aten.upsample_bilinear2d: _upsample_flops(4),
    aten.grid_sampler_2d: _upsample_flops(4),
    aten._adaptive_avg_pool2d: _avg_pool_flops,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` and count its FLOPs in fvcore's convention (1 multiply-add = 1 FLOP).

    Returns (total, {module path: FLOPs}) where module paths are FlopCounterMode's ("Global",
    "MaskFormer.backbone", ...). Counting happens on the real tensors, so any device works. Run it
    on a model whose parameters do not require gradients (FlopCounterMode's module tracker cannot
    follow parameter views made under ``no_grad``).
    """
    counter = FlopCounterMode(display=False, depth=3, custom_mapping=FVCORE_EXTRA_OPS)
    with counter:
        fn()
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() // 2, per_module


def original_swin_padding_flops(model: nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds the original Swin spends on window padding and this implementation does not.

    The original pads each block's map to a multiple of the window *before* its q/k/v and output
    projections, so those two linear layers also run on the padding tokens; ours projects first
    and never multiplies padding (``maskformer.models.swin.WindowAttention``). Zero for other backbones.
    """
    from maskformer.models.swin import WindowAttention

    total = 0

    def hook(module: WindowAttention, args: tuple) -> None:
        nonlocal total
        b, h, w, _ = args[0].shape
        ws = module.window_size
        padding_tokens = b * (-(-h // ws) * ws * -(-w // ws) * ws - h * w)
        per_token = (module.qkv.in_features * module.qkv.out_features
                     + module.proj.in_features * module.proj.out_features)
        total += padding_tokens * per_token

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, WindowAttention)]
    try:
        with torch.no_grad():
            model.backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    return total


def paper_protocol_flops(model: nn.Module, images: torch.Tensor, semantic: bool = True) -> dict[str, Any]:
    """FLOPs of inference on ``images`` [1,3,H,W], split into parts (see the module docstring).
    ``semantic``: semantic post-processing (else panoptic: the masks' resizing only).

    Returns {"network": this implementation's eval forward (last decoder layer's masks),
    "modules": {backbone/pixel_decoder/predictor: FLOPs}, "postprocess": upsampling +
    semantic einsum + same-size resize, "original_swin_padding": see
    :func:`original_swin_padding_flops`, "aux_masks": the 5 auxiliary layers' mask einsums,
    "this_implementation": network + postprocess, "paper_protocol": + original_swin_padding}.
    """
    model.eval().requires_grad_(False)
    outputs: dict = {}

    def network(with_aux: bool) -> None:
        outputs.update(model(images, with_aux=with_aux))

    def postprocess() -> None:
        masks = F.interpolate(outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        # Panoptic inference multiplies and compares (uncounted) after resizing the masks;
        # semantic inference contracts masks and class probabilities into [K, H, W] scores.
        result = semantic_inference(outputs["pred_logits"][0], masks[0])[None] if semantic else masks
        # detectron2's sem_seg_postprocess resizes to the output size even when it is unchanged.
        F.interpolate(result, size=images.shape[-2:], mode="bilinear", align_corners=False)

    all_layers, _ = count_flops(lambda: network(True))
    network_flops, per_module = count_flops(lambda: network(False))
    post, _ = count_flops(postprocess)
    padding = original_swin_padding_flops(model, images)
    modules = {name.split(".", 1)[1]: v for name, v in per_module.items() if name.count(".") == 1}
    return {"network": network_flops, "modules": modules, "postprocess": post,
            "original_swin_padding": padding, "aux_masks": all_layers - network_flops,
            "this_implementation": network_flops + post, "paper_protocol": network_flops + post + padding}


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def parameter_table(model: nn.Module, depth: int = 2) -> list[tuple[str, int]]:
    """(module path, parameter count) for the model ("" = total), its children and their children,
    down to ``depth`` levels; modules without parameters are left out."""
    rows = [("", sum(p.numel() for p in model.parameters()))]

    def visit(module: nn.Module, prefix: str, level: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            count = sum(p.numel() for p in child.parameters())
            if count:
                rows.append((path, count))
                if level < depth:
                    visit(child, path + ".", level + 1)

    visit(model, "", 1)
    return rows


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def default_size(cfg: Config) -> tuple[int, int]:
    """The original's fixed analysis input: CROP_SIZE[0]^2 for semantic configs, else min_size_test^2."""
    if cfg.data.mapper == "semantic" and cfg.data.crop_size:
        side = cfg.data.crop_size[0]
    else:
        side = cfg.data.min_size_test
    return side, side


def analyze(cfg: Config, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Parameters and FLOPs of ``cfg``'s model (random weights) on one zero image of ``size``."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, backbone=dataclasses.replace(cfg.model.backbone, pretrained=False)))
    if cfg.model.architecture != "maskformer":
        raise ValueError(f"analyze_model supports model.architecture=maskformer, got {cfg.model.architecture!r}")
    size = tuple(size) if size is not None else default_size(cfg)
    torch.manual_seed(0)
    model = build_maskformer(cfg).eval()
    images = torch.zeros(1, 3, *size)
    flops = paper_protocol_flops(model, images, semantic=cfg.test.semantic_on)
    return {"config": cfg.source, "size": list(size), "parameters": dict(parameter_table(model)), "flops": flops}


def _format(result: dict[str, Any]) -> str:
    params = result["parameters"]
    lines = [f"config: {result['config']}", f"input: 1x3x{result['size'][0]}x{result['size'][1]}", "",
             f"{'module':<42}{'parameters':>14}"]
    for name, count in params.items():
        if name:
            indent = "  " * name.count(".")
            lines.append(f"{indent + name.split('.')[-1]:<42}{count:>14,}")
    lines.append(f"{'total':<42}{params['']:>14,}")
    f = result["flops"]
    g = lambda v: f"{v / 1e9:9.2f} G"  # noqa: E731
    lines += ["", "FLOPs (fvcore convention: 1 multiply-add = 1 FLOP)"]
    lines += [f"  {name:<46}{g(value)}" for name, value in f["modules"].items()]
    lines += [f"  {'post-processing':<46}{g(f['postprocess'])}",
              f"{'this implementation':<48}{g(f['this_implementation'])}"]
    if f["original_swin_padding"]:
        lines.append(f"  {'+ original Swin: projections of window padding':<46}{g(f['original_swin_padding'])}")
    lines += [f"{'paper protocol (compare with the paper)':<48}{g(f['paper_protocol'])}",
              f"  (the original also computes the auxiliary layers' masks in eval, {f['aux_masks'] / 1e9:.2f} G "
              "more;",
              "   the paper's figures leave them out, see docs/performance.md)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_queries=50")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="input size (default: the crop size for semantic configs, else min_size_test)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = analyze(cfg, args.size)
    print(_format(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
