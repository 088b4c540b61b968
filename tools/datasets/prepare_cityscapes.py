#!/usr/bin/env python3
"""Cityscapes: write gtFine *_gtFine_labelTrainIds.png (19 classes, 255 ignore); --panoptic also runs cityscapesscripts' createPanopticImgs when it is installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_cityscapes, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="cityscapes", fn=prepare_cityscapes, extra_args=[(("--panoptic",), {"action": "store_true", "help": "also write gtFine/cityscapes_panoptic_{split}.json (needs cityscapesscripts)"})])


if __name__ == "__main__":
    sys.exit(main())
