#!/usr/bin/env python3
"""ADE20K panoptic (150 classes: 100 things + 50 stuff): write ade20k_panoptic_{train,val}.json and PNGs from annotations/ and annotations_instance/ (the instance challenge release)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from maskformer.data.prepare import prepare_ade20k_panoptic, run_cli  # noqa: E402


def main(argv=None) -> int:
    return run_cli(argv, description=__doc__, default_dir="ADEChallengeData2016", fn=prepare_ade20k_panoptic, extra_args=[(("--catid-mapping",), {"required": True, "help": "ade20k_instance_catid_mapping.txt from the instance annotations release"})])


if __name__ == "__main__":
    sys.exit(main())
