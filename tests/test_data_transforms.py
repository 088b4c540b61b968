"""Augmentation invariants: label alignment, ignore/padding values, crop constraint, colour distortion."""

import colorsys

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from maskformer.data.dataset import TestMapper, TrainMapper, build_train_augmentation
from maskformer.data.targets import panoptic_targets, semantic_from_panoptic, semantic_targets
from maskformer.data.transforms import (
    ColorAugSSD,
    DetrPanopticAugmentation,
    PadTo,
    RandomCropCategoryAreaConstraint,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    hsv_to_rgb,
    resize_shortest_edge_shape,
    rgb_to_hsv,
)

PALETTE = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200], [200, 200, 10], [10, 200, 200]], dtype=np.uint8)


def _pattern(h=96, w=128, block=16, seed=0):
    """Label blocks whose image colour encodes the label (PALETTE[label])."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, len(PALETTE), size=(h // block + 1, w // block + 1))
    label = np.kron(small, np.ones((block, block), dtype=np.int64))[:h, :w]
    label[:block, :block] = 255  # an ignored corner
    image = np.where((label == 255)[..., None], 0, PALETTE[np.clip(label, 0, 4)])
    return {"image": image.astype(np.uint8), "sem_seg": label}


def _check_alignment(image: torch.Tensor, sem_seg: torch.Tensor, valid_hw):
    """Away from label edges, every labeled pixel has its label's colour."""
    h, w = valid_hw
    lab = sem_seg[:h, :w]
    img = image[:, :h, :w].permute(1, 2, 0).to(torch.int64)
    pad = torch.nn.functional.pad(lab[None, None].float(), (2, 2, 2, 2), mode="replicate")[0, 0]
    uniform = torch.ones_like(lab, dtype=torch.bool)
    for dy in range(5):
        for dx in range(5):
            uniform &= pad[dy : dy + h, dx : dx + w] == lab
    interior = uniform & (lab != 255)
    assert interior.sum() > 100
    expected = torch.from_numpy(PALETTE.astype(np.int64))[lab[interior]]
    assert (img[interior] - expected).abs().max() <= 3


@pytest.mark.parametrize("seed", range(6))
def test_resize_crop_flip_pad_keep_labels_aligned(seed):
    aug = build_train_augmentation(
        mapper="semantic", min_sizes=[64, 96, 160], max_size=400, crop_size=(80, 80), single_category_max_area=1.0,
        color_aug_ssd=False, random_flip=True, ignore_label=255,
    )
    mapper = TrainMapper(augmentation=aug, task="semantic", ignore_label=255, pad_size=(80, 80), image_pad_value=128)
    out = mapper(_pattern(seed=seed), np.random.default_rng(seed))
    h, w = out["image_size"]
    assert out["image"].shape == (3, 80, 80) and out["sem_seg"].shape == (80, 80)
    _check_alignment(out["image"], out["sem_seg"], (h, w))
    # Padding: image 128, label ignore; targets are exactly the classes present, ignore excluded.
    assert (out["image"][:, h:, :] == 128).all() and (out["image"][:, :, w:] == 128).all()
    assert (out["sem_seg"][h:, :] == 255).all() and (out["sem_seg"][:, w:] == 255).all()
    present = sorted(set(out["sem_seg"].unique().tolist()) - {255})
    assert out["labels"].tolist() == present
    for label, mask in zip(out["labels"], out["masks"]):
        assert torch.equal(mask, out["sem_seg"] == label)


def test_flip_mirrors_image_and_labels():
    data = _pattern()
    sample = {"image": tv_tensors.Image(torch.from_numpy(data["image"]).permute(2, 0, 1)),
              "sem_seg": tv_tensors.Mask(torch.from_numpy(data["sem_seg"]))}

    class Always:
        def random(self):
            return 0.0

    out = RandomHorizontalFlip()(sample, Always())
    assert torch.equal(out["sem_seg"], sample["sem_seg"].flip(-1)) and torch.equal(out["image"], sample["image"].flip(-1))


def test_resize_shortest_edge_matches_detectron2_rule():
    assert resize_shortest_edge_shape(480, 640, 512, 2048) == (512, 683)
    assert resize_shortest_edge_shape(640, 480, 512, 2048) == (683, 512)
    assert resize_shortest_edge_shape(100, 1000, 512, 2048) == (205, 2048)  # long side capped
    sample = {"image": tv_tensors.Image(torch.zeros(3, 30, 40, dtype=torch.uint8)),
              "pan_seg": tv_tensors.Mask(torch.arange(1200).view(30, 40))}
    out = ResizeShortestEdge([60], 1000)(sample)
    assert out["image"].shape[-2:] == (60, 80)
    assert set(out["pan_seg"].unique().tolist()) <= set(range(1200))  # nearest: no blended ids


def test_crop_category_area_constraint_is_honoured():
    label = np.zeros((40, 100), dtype=np.int64)
    label[:, 40:60] = 1
    label[:, 60:] = 2
    label[:2, :] = 255  # ignore is left out of the count
    sample = {"image": tv_tensors.Image(torch.zeros(3, 40, 100, dtype=torch.uint8)),
              "sem_seg": tv_tensors.Mask(torch.from_numpy(label))}

    def violations(max_area):
        bad = 0
        for seed in range(40):
            crop = RandomCropCategoryAreaConstraint((40, 40), max_area, 255)(sample, np.random.default_rng(seed))["sem_seg"]
            counts = torch.bincount(crop[crop != 255].flatten(), minlength=3)
            bad += int(counts.max() >= 0.6 * counts.sum())
        return bad

    # About half of all 40-wide crops break the 0.6 rule; with up to 10 retries (almost) none do.
    assert violations(1.0) >= 12
    assert violations(0.6) <= 1


def test_hsv_roundtrip_matches_colorsys():
    rgb = torch.rand(3, 7, 9)
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (3, 4), (6, 8), (2, 7)]:
        ref = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        assert torch.allclose(hsv[:, y, x], torch.tensor(ref), atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_color_aug_ssd_ranges_and_gray_invariance():
    aug = ColorAugSSD()
    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    for seed in range(10):
        out = aug({"image": tv_tensors.Image(img)}, np.random.default_rng(seed))["image"]
        assert out.dtype == torch.uint8 and out.shape == img.shape
    # A gray image has no hue/saturation: only brightness/contrast can change it, equally on all channels.
    gray = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    for seed in range(10):
        out = aug({"image": tv_tensors.Image(gray)}, np.random.default_rng(seed))["image"]
        assert (out == out[0:1]).all()
    # Determinism: the same generator state gives the same distortion.
    a = aug({"image": tv_tensors.Image(img)}, np.random.default_rng(5))["image"]
    b = aug({"image": tv_tensors.Image(img)}, np.random.default_rng(5))["image"]
    assert torch.equal(a, b)


def test_color_aug_brightness_only_step():
    class Script:  # brightness on, then the branch that skips contrast/saturation/hue
        def __init__(self):
            self.ints = iter([1, 1, 0, 0, 0, 0])

        def integers(self, *args):
            return next(self.ints)

        def uniform(self, lo, hi):
            return 10.5

    img = torch.tensor([[[0, 100, 250]]], dtype=torch.uint8).expand(3, 1, 3)
    out = ColorAugSSD()({"image": tv_tensors.Image(img)}, Script())["image"]
    assert out[0, 0].tolist() == [10, 110, 255]  # +10.5, clipped, truncated like the uint8 original


def test_panoptic_mapper_drops_crowd_and_vanished_segments():
    pan = np.zeros((40, 40), dtype=np.int64)
    pan[:, :20] = 5
    pan[:, 20:] = 9
    pan[:4, :4] = 77  # crowd
    segments = [{"id": 5, "category_id": 0, "iscrowd": 0}, {"id": 9, "category_id": 2, "iscrowd": 0},
                {"id": 77, "category_id": 2, "iscrowd": 1}, {"id": 42, "category_id": 1, "iscrowd": 0}]
    sem = semantic_from_panoptic(torch.from_numpy(pan), segments, 255).numpy()
    assert sem[0, 0] == 255 and sem[10, 10] == 0 and sem[10, 30] == 2
    labels, masks = panoptic_targets(torch.from_numpy(pan), segments)
    assert labels.tolist() == [0, 2] and masks.sum().item() == 40 * 40 - 16
    data = {"image": np.zeros((40, 40, 3), dtype=np.uint8), "sem_seg": sem, "pan_seg": pan, "segments_info": segments}
    aug = build_train_augmentation(mapper="panoptic", min_sizes=[40], max_size=100, crop_size=(20, 20),
                                   single_category_max_area=1.0, color_aug_ssd=True, random_flip=True, ignore_label=255)
    out = TrainMapper(augmentation=aug, task="panoptic", ignore_label=255, pad_size=(24, 24))(data, np.random.default_rng(0))
    assert out["masks"].shape[1:] == (24, 24) and len(out["labels"]) in (1, 2)
    for label, mask in zip(out["labels"], out["masks"]):
        assert (out["sem_seg"][mask] == label).all() and mask.any()
    assert not out["masks"][:, 20:, :].any()  # padding is VOID for every segment


def test_empty_sample_is_valid():
    labels, masks = semantic_targets(torch.full((5, 6), 255), 255)
    assert labels.shape == (0,) and masks.shape == (0, 5, 6) and masks.dtype == torch.bool
    labels, masks = panoptic_targets(torch.zeros(5, 6, dtype=torch.int64), [{"id": 3, "category_id": 1, "iscrowd": 0}])
    assert labels.shape == (0,) and masks.shape == (0, 5, 6)


def test_detr_augmentation_sizes():
    aug = DetrPanopticAugmentation([64, 80], 120)
    sample = {"image": tv_tensors.Image(torch.zeros(3, 300, 500, dtype=torch.uint8)),
              "pan_seg": tv_tensors.Mask(torch.zeros(300, 500, dtype=torch.int64))}
    for seed in range(8):
        out = aug(sample, np.random.default_rng(seed))
        h, w = out["image"].shape[-2:]
        assert out["pan_seg"].shape == (h, w)
        assert min(h, w) in (64, 80) or max(h, w) == 120


def test_pad_to_is_noop_when_large_enough():
    sample = {"image": tv_tensors.Image(torch.zeros(3, 10, 12, dtype=torch.uint8))}
    assert PadTo((8, 8), 128, {})(sample) is sample


def test_test_mapper_resizes_image_and_keeps_full_resolution_gt():
    data = _pattern(h=60, w=90)
    out = TestMapper(min_size=30, max_size=1000, task="semantic", ignore_label=255)(data)
    assert out["image"].shape == (3, 30, 45) and out["image_size"] == (30, 45) and out["orig_size"] == (60, 90)
    assert out["gt_sem_seg"].shape == (60, 90) and torch.equal(out["gt_sem_seg"], torch.from_numpy(data["sem_seg"]))
    assert out["masks"].shape[1:] == (30, 45)
