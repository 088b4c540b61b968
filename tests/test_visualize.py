"""Overlays and legends: exact blending, one colour per class, jittered objects, legend swatches."""

import numpy as np
import pytest
import torch

from maskformer.data.metadata import default_colors
from maskformer.predict import Prediction
from maskformer.visualize import (
    class_palette,
    draw_instances,
    draw_legend,
    draw_panoptic,
    draw_semantic,
    jitter_color,
    paint_instances,
    to_pil,
    visualize_prediction,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 200, 0)]
NAMES = ["road", "grass", "car", "person"]


def _gray(h=20, w=30, value=100):
    return torch.full((3, h, w), value, dtype=torch.uint8)


def _blended(base, color, alpha):
    # draw_segmentation_masks: base*(1-alpha) + color*alpha, truncated to uint8
    return [int(base * (1 - alpha) + c * alpha) for c in color]


def _has_color(img, color, tol=0):
    diff = (img.to(torch.int64) - torch.tensor(color).view(3, 1, 1)).abs().amax(0)
    return bool((diff <= tol).any())


def test_semantic_overlay_blends_each_class_in_its_colour_and_leaves_ignore_alone():
    sem = torch.full((20, 30), 255, dtype=torch.int64)
    sem[:10, :10] = 0
    sem[10:, 15:] = 2
    out = draw_semantic(_gray(), sem, COLORS, alpha=0.5)
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 30)
    assert out[:, 2, 2].tolist() == pytest.approx(_blended(100, COLORS[0], 0.5), abs=1)
    assert out[:, 15, 20].tolist() == pytest.approx(_blended(100, COLORS[2], 0.5), abs=1)
    assert (out[:, sem == 255] == 100).all()  # ignore pixels unchanged
    assert not _has_color(out, _blended(100, COLORS[1], 0.5), tol=1)  # absent class not drawn
    # alpha = 1 paints the pure colour
    assert out.shape == draw_semantic(_gray(), sem, COLORS, alpha=1.0).shape
    assert draw_semantic(_gray(), sem, COLORS, alpha=1.0)[:, 0, 0].tolist() == list(COLORS[0])


def test_palette_falls_back_for_datasets_without_colours():
    sem = torch.arange(6).repeat_interleave(5).view(1, 30).expand(20, 30)
    out = draw_semantic(_gray(), sem, None, alpha=1.0)
    palette = default_colors(6)
    assert [tuple(out[:, 0, 5 * c].tolist()) for c in range(6)] == palette
    assert len(set(palette)) == 6
    assert class_palette(3, None) == default_colors(3)
    with pytest.raises(ValueError, match="3 colours for 4 classes"):
        class_palette(4, COLORS[:3])
    with pytest.raises(ValueError, match="colour 1"):
        class_palette(2, [(0, 0, 0), (0, 300, 0)])


def test_panoptic_things_get_distinct_jitters_of_the_class_colour_and_stuff_keeps_it():
    pan = torch.zeros(20, 30, dtype=torch.int32)
    pan[:, :10] = 1  # stuff: road
    pan[:, 10:20] = 2  # car
    pan[:, 20:] = 3  # another car
    info = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 2, "isthing": True},
            {"id": 3, "category_id": 2, "isthing": True}]
    out = draw_panoptic(_gray(), pan, info, COLORS, alpha=1.0, outline=False)
    road, car1, car2 = (tuple(out[:, 5, x].tolist()) for x in (5, 15, 25))
    assert road == COLORS[0]
    assert car1 != car2 and car1 != COLORS[2]
    for car in (car1, car2):
        assert max(abs(a - b) for a, b in zip(car, COLORS[2])) <= 60
    assert car1 == jitter_color(COLORS[2], 2) and car2 == jitter_color(COLORS[2], 3)  # deterministic
    # outlines mark the borders between segments
    lined = draw_panoptic(_gray(), pan, info, COLORS, alpha=1.0)
    assert lined[:, 5, 10].tolist() == [255, 255, 255] and tuple(lined[:, 5, 5].tolist()) == road


def test_instances_overlap_goes_to_the_higher_score_and_threshold_drops():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, :, :20] = True
    masks[1, :, 10:] = True
    masks[2, :5, :5] = True
    scores = torch.tensor([0.6, 0.9, 0.1])
    ids = paint_instances(masks, scores)
    assert ids[0, 0] == 1 and ids[0, 15] == 2 and ids[10, 5] == 1 and ids[10, 25] == 2  # 2 hides 1 in the overlap
    out = draw_instances(_gray(), masks, torch.tensor([3, 3, 0]), COLORS, scores=scores, score_threshold=0.5,
                         alpha=1.0, outline=False)
    assert tuple(out[:, 10, 15].tolist()) == jitter_color(COLORS[3], 2)
    assert tuple(out[:, 10, 5].tolist()) == jitter_color(COLORS[3], 1)
    assert not _has_color(out, COLORS[0])  # the low-score instance is not drawn
    assert (out[:, 0, 0] != 100).any()  # ... and its pixels show instance 0 instead


def test_legend_lists_the_classes_present_with_swatches():
    img = draw_semantic(_gray(64, 96), torch.zeros(64, 96, dtype=torch.int64), COLORS, alpha=0.6)
    entries = [("road", COLORS[0]), ("person", COLORS[3])]
    bottom = draw_legend(img, entries, position="bottom")
    assert bottom.dtype == torch.uint8 and bottom.shape[0] == 3
    assert bottom.shape[2] == 96 and bottom.shape[1] > 64
    assert torch.equal(bottom[:, :64, :96], img)  # the image is untouched
    strip = bottom[:, 64:]
    assert _has_color(strip, COLORS[0]) and _has_color(strip, COLORS[3])
    assert not _has_color(strip, COLORS[1]) and not _has_color(strip, COLORS[2])
    assert (strip < 50).all(0).sum() > 20  # some black text / outlines
    right = draw_legend(img, entries, position="right")
    assert right.shape[1] == 64 and right.shape[2] > 96 and torch.equal(right[:, :, :96], img)
    assert _has_color(right[:, :, 96:], COLORS[3])
    # many entries wrap into several rows
    many = draw_legend(img, [(f"class {i}", c) for i, c in enumerate(default_colors(20))], position="bottom")
    assert many.shape[1] > bottom.shape[1]
    assert torch.equal(draw_legend(img, []), img)
    with pytest.raises(ValueError, match="position"):
        draw_legend(img, entries, position="left")


def test_visualize_prediction_semantic_panoptic_instance_and_pil():
    sem = torch.zeros(24, 32, dtype=torch.int64)
    sem[:, 16:] = 3
    scores = torch.zeros(4, 24, 32)
    pan = (sem == 3).to(torch.int32) + 1
    info = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 3, "isthing": True}]
    inst = {"masks": (sem == 3)[None], "scores": torch.tensor([0.8]), "labels": torch.tensor([3])}
    pred = Prediction(sem_seg=sem, sem_seg_scores=scores, panoptic_seg=pan, segments_info=info, instances=inst)
    image = np.full((24, 32, 3), 80, np.uint8)
    for task in ("semantic", "panoptic", "instance"):
        out = visualize_prediction(image, pred, task=task, class_names=NAMES, colors=COLORS)
        assert out.dtype == torch.uint8 and out.shape[1] > 24 and out.shape[2] >= 32
        assert not torch.equal(out[:, :24, :32], torch.from_numpy(image).permute(2, 0, 1))
        assert _has_color(out[:, 24:], COLORS[3])  # person in the legend
        assert (task == "instance") != _has_color(out[:, 24:], COLORS[0])  # road: not an instance
        pil = to_pil(out)
        assert pil.size == (out.shape[2], out.shape[1]) and pil.mode == "RGB"
    bare = visualize_prediction(image, pred, legend=None, class_names=NAMES, colors=COLORS)
    assert bare.shape == (3, 24, 32)
    with pytest.raises(ValueError, match="panoptic=True"):
        visualize_prediction(image, Prediction(sem_seg=sem, sem_seg_scores=scores), task="panoptic")
    with pytest.raises(ValueError, match="sem_seg is"):
        draw_semantic(_gray(), torch.zeros(5, 5, dtype=torch.int64), COLORS)
