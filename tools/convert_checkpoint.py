#!/usr/bin/env python
"""Convert official MaskFormer, Hugging Face MaskFormer or ImageNet backbone weights to this package's format.

    python tools/convert_checkpoint.py model_final_8657a5.pkl swin_t_ade20k.pth \\
        --config configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml
    python tools/convert_checkpoint.py model_final_8657a5.pkl swin_t_ade20k.pth --config maskformer_swin_tiny_ade20k
    python tools/convert_checkpoint.py path/to/hf_save_pretrained_folder out.pth      # detect only, no config
    python tools/convert_checkpoint.py R-50.pkl r50_backbone.pth                       # backbone-only

The source layout is detected from the file: an official (detectron2) ``.pkl`` or torch file, with
old or new head names; a Hugging Face ``MaskFormerForInstanceSegmentation`` folder or weight file;
a checkpoint of this package; or backbone-only ImageNet weights (timm/torchvision ResNet,
detectron2 ``R-50.pkl``-style, official Swin ``.pth``, timm Swin). Pickles are read with a
restricted unpickler that admits numpy arrays and plain containers only; torch files with
``weights_only=True``.

The number of classes, the backbone and the other sizes found in the weights are printed. With
``--config`` (a YAML file or a model-zoo name) the weights must fit the model that config builds
(random init, no download); the output then also stores the config. Without it they are checked
against a model of the detected architecture. Any missing, unexpected or mis-shaped key is named.

Use the output with ``tools/eval.py --config CONFIG --weights OUT`` or ``build_model(CONFIG, weights=OUT)``;
a backbone-only output goes into ``model.backbone.pretrained: OUT``.

Exit status: 0 on success, 1 when the weights cannot be read, are unsafe or do not fit, 2 for a bad
config or command line. Overrides are ``section.key=value`` pairs applied to the config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="weights file (.pkl/.pth/.bin/.safetensors) or Hugging Face model folder")
    parser.add_argument("output", help="converted checkpoint to write (.pth)")
    parser.add_argument("--config", default=None,
                        help="YAML config or model-zoo name the weights must fit (optional)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)


def describe(facts: dict) -> list[str]:
    """Readable lines for the facts found in the weights."""
    backbone = facts["backbone"]
    lines = [f"backbone:          {backbone['label']}" + (f" [{backbone['name']}]" if backbone.get("name") else "")]
    if backbone.get("family") == "swin":
        lines.append(f"                   embed_dim {backbone['embed_dim']}, depths {backbone['depths']}, "
                     f"heads {backbone['num_heads']}, window {backbone['window_size']}")
    elif backbone.get("family") == "resnet":
        lines.append(f"                   {backbone['block']} blocks {backbone['depths']}, "
                     f"channels {backbone['channels']}{', deep stem' if backbone['deep_stem'] else ''}")
    if "num_classes" in facts:
        enc = facts["pixel_decoder_enc_layers"]
        lines += [
            f"classes:           {facts['num_classes']} (+1 no-object)",
            f"pixel decoder:     {facts['pixel_decoder']}" + (f" ({enc} encoder layers)" if enc else ""),
            f"predictor input:   {facts['transformer_in_feature']}",
            f"queries/decoder:   {facts['num_queries']} queries, {facts['dec_layers']} layers, hidden "
            f"{facts['hidden_dim']}, FFN {facts['dim_feedforward']}"
            + (f", {facts['nheads']} heads" if facts.get("nheads") else ""),
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from maskformer.checkpoint import CheckpointError
    from maskformer.config import ConfigError, load_config
    from maskformer.interop.convert import convert, save_converted
    from maskformer.zoo import UnknownModelError, is_model_name, resolve_model

    config = None
    if args.config is not None:
        try:
            path, overrides = args.config, list(args.overrides)
            if is_model_name(path):
                path, overrides, _ = resolve_model(path, None, overrides)
            config = load_config(path, overrides)
        except (ConfigError, UnknownModelError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.overrides:
        print("error: overrides need --config", file=sys.stderr)
        return 2

    try:
        converted, checked = convert(args.source, config)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"source:            {args.source} ({converted.source_layout})")
    for line in describe(converted.facts):
        print(line)
    if config is not None:
        print(f"fits config:       {config.source or args.config}")
    save_converted(converted, args.output, checked)
    kind = "backbone weights (use as model.backbone.pretrained)" if converted.kind == "backbone" else "model weights"
    print(f"wrote:             {args.output} ({len(converted.state_dict)} tensors, {kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
