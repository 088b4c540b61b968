#!/usr/bin/env python3
"""COCO-Stuff-10K v1.0: write images_detectron2/ and annotations_detectron2/ PNGs (S - 2, 255 ignore) from the .mat annotations (scipy; h5py for v7.3 files)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_coco_stuff_10k, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="coco/coco_stuff_10k", fn=prepare_coco_stuff_10k)


if __name__ == "__main__":
    sys.exit(main())
