#!/usr/bin/env python3
"""ADE20K-150: write annotations_detectron2/ (labels shifted by -1, 0 = other -> 255 ignore) from annotations/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_ade20k_sem_seg, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="ADEChallengeData2016", fn=prepare_ade20k_sem_seg)


if __name__ == "__main__":
    sys.exit(main())
