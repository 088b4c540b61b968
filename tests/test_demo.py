"""The demo tool end to end on a few iterations: run, learning curve, overlays, summary."""

import json
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_writes_curve_overlays_and_summary(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import demo

    out = tmp_path / "demo"
    code = demo.main(["--output-dir", str(out), "solver.max_iter=4", "train.eval_period=2", "train.log_period=2",
                      "test.max_images=4", "data.num_workers=0", "data.train.options={num_images: 16}",
                      "data.test.options={num_images: 8}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "learning curve" in printed and str(out.resolve()) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [p["iteration"] for p in summary["curve"]] == [2, 4]
    assert 0 <= summary["final"]["mIoU"] <= 100 and 0 <= summary["final"]["PQ"] <= 100
    curve = Image.open(out / "learning_curve.png")
    assert curve.size[0] > 300
    overlays = sorted((out / "predictions").glob("*.png"))
    assert len(overlays) == 6
    with Image.open(overlays[0]) as im:
        # input | truth | semantic | panoptic, side by side, each 128x128 shown at 2x
        assert im.size == (4 * 128 * 2, 128 * 2)
