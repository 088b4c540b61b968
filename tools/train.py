#!/usr/bin/env python
"""Train a MaskFormer model.

    python tools/train.py --config configs/demo/shapes_tiny.yaml
    python tools/train.py --config CONFIG --output-dir outputs/run1 solver.base_lr=2e-4 data.num_workers=2
    python tools/train.py --config CONFIG --output-dir outputs/run1 --resume
    torchrun --nproc_per_node=8 tools/train.py --config CONFIG            # one machine, 8 GPUs
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
             --nproc_per_node=8 tools/train.py --config CONFIG            # first of two machines

Overrides are ``section.key=value`` pairs after the options; values are YAML
(``solver.max_iter=1000``, ``data.crop_size=[256,256]``, ``model.backbone.pretrained=null``).
``solver.ims_per_batch`` is the total batch over all processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskformer.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output-dir", default=None,
                        help="where logs, metrics and checkpoints go (default: output.dir or outputs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <output-dir>/checkpoints/last.pth (same weights as an uninterrupted run)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. solver.base_lr=2e-4 train.amp=bf16")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        from maskformer.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    from maskformer.data import DatasetError
    from maskformer.engine.trainer import NonFiniteLossError, train

    try:
        result = train(cfg, args.output_dir, resume=args.resume)
    except (DatasetError, FileNotFoundError, PermissionError, NonFiniteLossError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
