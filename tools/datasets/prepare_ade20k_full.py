#!/usr/bin/env python3
"""ADE20K-Full (847 classes): write images_detectron2/ and uint16 TIFF annotations_detectron2/ (65535 ignore) from ADE20K_2021_17_01."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_ade20k_full, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="ADE20K_2021_17_01", fn=prepare_ade20k_full)


if __name__ == "__main__":
    sys.exit(main())
