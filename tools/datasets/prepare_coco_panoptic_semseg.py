#!/usr/bin/env python3
"""COCO panoptic: write panoptic_semseg_{train,val}2017/ semantic PNGs (contiguous ids 0..132, 255 void)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_coco_panoptic_semseg, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="coco", fn=prepare_coco_panoptic_semseg)


if __name__ == "__main__":
    sys.exit(main())
