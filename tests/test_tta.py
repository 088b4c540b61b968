"""Test-time augmentation and sliding-window inference: equal to the default where they must be,
flip-equivariant, count-normalised, at the original size."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from maskformer.config import TestConfig as EvalConfig
from maskformer.data import SegmentationCollator, build_test_loader, get_metadata
from maskformer.data.metadata import DatasetMetadata
from maskformer.data.transforms import resize_shortest_edge_shape
from maskformer.engine.evaluate import default_inference, evaluate
from maskformer.engine.tta import (
    build_inference,
    sliding_window_inference,
    tta_inference,
    window_starts,
)
from maskformer.models.build import build_maskformer
from maskformer.predict import resize_image
from tests.conftest import tiny_config

META = DatasetMetadata(name="toy", class_names=["a", "b", "c", "d"], is_thing=[False, False, True, True])


def _image(h, w, seed=0):
    """A smooth random uint8 [3,h,w] image (random blobs, so features are not all alike)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].round().to(torch.uint8)


def _batch(images, min_size, max_size=10_000, divisibility=32, with_original=True):
    """The batch the test loader would build from ``images`` (uint8 [3,H0,W0]) resized as the test mapper does."""
    samples = []
    for i, img in enumerate(images):
        orig = tuple(img.shape[-2:])
        size = resize_shortest_edge_shape(*orig, min_size, max_size)
        resized = resize_image(img, size)
        s = {"image": resized, "image_size": size, "orig_size": orig, "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, *size, dtype=torch.bool), "image_id": i}
        if with_original:
            s["orig_image"] = img
        samples.append(s)
    collate = SegmentationCollator([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], divisibility, 255)
    return collate(samples)


def _test_cfg(**aug):
    t = EvalConfig()
    t.aug = dataclasses.replace(t.aug, enabled=True, **aug)
    return t


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_maskformer(tiny_config()).eval()


CPU = torch.device("cpu")


def test_tta_with_one_size_and_no_flip_equals_default_inference(model):
    img = _image(60, 84)
    batch = _batch([img], min_size=48)
    test = _test_cfg(min_sizes=[48], max_size=10_000, flip=False)
    expected = default_inference(model, batch, test, META, CPU)[0]["sem_seg"]
    got = tta_inference(model, batch, test, META, CPU)[0]["sem_seg"]
    assert got.shape == (4, 60, 84) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # ... and a different size is really a different pass, computed from the original pixels
    other = tta_inference(model, batch, _test_cfg(min_sizes=[60], flip=False), META, CPU)[0]["sem_seg"]
    assert other.shape == (4, 60, 84)
    assert (other - expected).abs().max() > 1e-3


def test_tta_is_flip_equivariant_and_averages_all_passes(model):
    img = _image(56, 72, seed=3)
    test = _test_cfg(min_sizes=[40, 56], max_size=10_000, flip=True)
    out = tta_inference(model, _batch([img], 40), test, META, CPU)[0]["sem_seg"]
    out_flipped = tta_inference(model, _batch([img.flip(-1)], 40), test, META, CPU)[0]["sem_seg"]
    torch.testing.assert_close(out_flipped, out.flip(-1), rtol=0, atol=1e-5)
    # without flip the tiny random network is far from equivariant, so the check above means something
    no_flip = _test_cfg(min_sizes=[40, 56], max_size=10_000, flip=False)
    a = tta_inference(model, _batch([img], 40), no_flip, META, CPU)[0]["sem_seg"]
    b = tta_inference(model, _batch([img.flip(-1)], 40), no_flip, META, CPU)[0]["sem_seg"]
    assert (b - a.flip(-1)).abs().max() > 1e-3
    # the average of the four passes: each single pass, computed on its own, averaged by hand
    singles = []
    for size in (40, 56):
        singles.append(tta_inference(model, _batch([img], 40), _test_cfg(min_sizes=[size], flip=False), META,
                                     CPU)[0]["sem_seg"])
        flipped = tta_inference(model, _batch([img.flip(-1)], 40), _test_cfg(min_sizes=[size], flip=False), META,
                                CPU)[0]["sem_seg"]
        singles.append(flipped.flip(-1))
    torch.testing.assert_close(out, torch.stack(singles).mean(0), rtol=0, atol=1e-5)


def test_tta_max_size_caps_the_long_side(model):
    img = _image(32, 128)
    calls = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.pixel_mean, self.pixel_std = inner.pixel_mean, inner.pixel_std
            self.size_divisibility = inner.size_divisibility

        def forward(self, x):
            calls.append(tuple(x.shape))
            return self.inner(x)

    out = tta_inference(Spy(model), _batch([img], 32), _test_cfg(min_sizes=[64], max_size=160, flip=True), META,
                        CPU)[0]["sem_seg"]
    # 64 x 256 capped to 40 x 160 -> padded to 64 x 160; the flipped view shares the pass
    assert calls == [(2, 3, 64, 160)]
    assert out.shape == (4, 32, 128)


def test_tta_rereads_the_original_image_from_file_name(tmp_path, model):
    img = _image(50, 70, seed=5)
    path = tmp_path / "x.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
    with_orig = _batch([img], 40)
    from_file = _batch([img], 40, with_original=False)
    from_file["samples"][0]["file_name"] = str(path)
    test = _test_cfg(min_sizes=[40, 50], flip=True)
    torch.testing.assert_close(tta_inference(model, from_file, test, META, CPU)[0]["sem_seg"],
                               tta_inference(model, with_orig, test, META, CPU)[0]["sem_seg"], rtol=0, atol=0)
    # no way to get the original image -> a clear error
    bare = _batch([img], 40, with_original=False)
    with pytest.raises(ValueError, match="original image"):
        tta_inference(model, bare, test, META, CPU)
    # an image whose size disagrees with orig_size is refused, naming the file
    Image.fromarray(_image(30, 30).permute(1, 2, 0).numpy()).save(path)
    with pytest.raises(ValueError, match="x.png"):
        tta_inference(model, from_file, test, META, CPU)


def test_tta_panoptic_and_instances_come_from_the_unaugmented_pass(model):
    batch = _batch([_image(40, 56, seed=1), _image(48, 40, seed=2)], 32)
    test = _test_cfg(min_sizes=[24, 40], flip=True)
    test.panoptic_on = test.instance_on = True
    plain = default_inference(model, batch, test, META, CPU)
    tta = tta_inference(model, batch, test, META, CPU)
    for p, t, orig in zip(plain, tta, batch["orig_sizes"]):
        assert torch.equal(p["panoptic_seg"][0], t["panoptic_seg"][0])
        assert p["panoptic_seg"][1] == t["panoptic_seg"][1]
        assert torch.equal(p["instances"]["masks"], t["instances"]["masks"])
        assert t["sem_seg"].shape == (4, *orig)
        assert not torch.allclose(p["sem_seg"], t["sem_seg"])


# ------------------------------------------------------------------------------------------------
# Sliding window
# ------------------------------------------------------------------------------------------------


def _window_cfg(crop, stride):
    t = EvalConfig()
    t.sliding_window = dataclasses.replace(t.sliding_window, enabled=True, crop_size=list(crop), stride=list(stride))
    return t


def test_window_starts_cover_the_extent_and_end_at_the_edge():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(12, 4, 4) == [0, 4, 8]
    assert window_starts(4, 8, 2) == [0]
    for length, crop, stride in [(97, 32, 17), (64, 64, 10), (65, 64, 64)]:
        starts = window_starts(length, crop, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + crop] = True
        assert covered.all() and starts[-1] + crop == length and max(np.diff(starts), default=0) <= stride


def test_sliding_window_covering_the_whole_image_equals_default_inference(model):
    # The single window is the whole resized image, padded exactly as the collator pads it: the same
    # input tensor and the same post-processing, so the result is equal (not only close).
    batch = _batch([_image(60, 84, seed=7)], 48)
    h, w = batch["image_sizes"][0]
    expected = default_inference(model, batch, EvalConfig(), META, CPU)[0]["sem_seg"]
    for crop in ([h, w], [512, 1024]):
        got = sliding_window_inference(model, batch, _window_cfg(crop, crop), META, CPU)[0]["sem_seg"]
        assert got.shape == (4, 60, 84) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


class ToyModel(nn.Module):
    """3 queries (class 0, class 1, no object) whose mask logits are a 4x4 average of an input channel:
    every output pixel depends only on its own 4x4 input block (spatially local)."""

    def __init__(self, constant: bool = False):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))
        self.size_divisibility = 32
        self.constant = constant
        self.logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]).log_softmax(-1)

    def forward(self, images):
        b = images.shape[0]
        masks = F.avg_pool2d(images, 4) / 40.0 - 3.0
        if self.constant:
            masks = torch.zeros_like(masks) + torch.tensor([1.0, -0.5, 0.2]).view(1, 3, 1, 1)
        return {"pred_logits": self.logits.expand(b, -1, -1), "pred_masks": masks}


def test_sliding_window_divides_by_the_overlap_count():
    # Image-independent scores: every window gives the same value everywhere, so the average must
    # equal it wherever 1, 2 or 4 windows overlap (a wrong count map shows up as 2x or 0.5x).
    toy = ToyModel(constant=True)
    batch = _batch([_image(100, 140)], 100, divisibility=0)
    t = _window_cfg([64, 64], [24, 40])
    out = sliding_window_inference(toy, batch, t, META, CPU)[0]["sem_seg"]
    expected = default_inference(toy, batch, t, META, CPU)[0]["sem_seg"]
    assert out.shape == (2, 100, 140)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, out[:, :1, :1].expand_as(out), rtol=0, atol=1e-6)


def test_sliding_window_with_a_local_model_gives_a_consistent_map():
    # With a spatially local model, windows starting on multiples of 4 produce exactly the global
    # low-resolution masks; only bilinear upsampling differs, within 2 px of a window's edge (where it
    # clamps at the window instead of reading the neighbour). Away from window edges the map is exact.
    toy = ToyModel()
    img = _image(96, 128, seed=11)
    batch = _batch([img], 96, divisibility=0)
    crop, stride = (64, 64), (32, 32)
    t = _window_cfg(crop, stride)
    out = sliding_window_inference(toy, batch, t, META, CPU, windows_per_batch=3)[0]["sem_seg"]
    whole = default_inference(toy, batch, t, META, CPU)[0]["sem_seg"]
    near_edge = torch.zeros(96, 128, dtype=torch.bool)
    # window edges inside the image (at the image border the whole-image pass clamps the same way)
    for y in window_starts(96, crop[0], stride[0]):
        for e in {y, y + crop[0]} - {0, 96}:
            near_edge[e - 2:e + 2] = True
    for x in window_starts(128, crop[1], stride[1]):
        for e in {x, x + crop[1]} - {0, 128}:
            near_edge[:, e - 2:e + 2] = True
    assert (~near_edge).float().mean() > 0.5
    torch.testing.assert_close(out[:, ~near_edge], whole[:, ~near_edge], rtol=0, atol=1e-6)
    assert (out - whole).abs().max() < 0.05  # near window edges: interpolation only
    assert (out.argmax(0) == whole.argmax(0)).float().mean() > 0.99


def test_sliding_window_resizes_to_the_original_size():
    toy = ToyModel()
    batch = _batch([_image(45, 75), _image(80, 50)], 64, divisibility=0)
    outs = sliding_window_inference(toy, batch, _window_cfg([48, 48], [32, 32]), META, CPU)
    assert [tuple(o["sem_seg"].shape) for o in outs] == [(2, 45, 75), (2, 80, 50)]
    assert all(o["sem_seg"].dtype == torch.float32 and torch.isfinite(o["sem_seg"]).all() for o in outs)


def test_build_inference_chooses_and_refuses():
    t = EvalConfig()
    assert build_inference(t) is default_inference
    assert build_inference(_test_cfg()) is tta_inference
    assert build_inference(_window_cfg([64, 64], [32, 32])) is sliding_window_inference
    both = _test_cfg()
    both.sliding_window.enabled = True
    with pytest.raises(ValueError, match="at most one"):
        build_inference(both)
    no_sem = _test_cfg()
    no_sem.semantic_on, no_sem.panoptic_on = False, True
    with pytest.raises(ValueError, match="semantic_on"):
        build_inference(no_sem)
    with pytest.raises(ValueError, match="stride"):
        build_inference(_window_cfg([64, 64], [65, 32]))


def test_tta_through_evaluate_on_shapes_reads_the_files(tmp_path):
    # End to end with the real test loader: images resized to 48 by the mapper, TTA re-reads the
    # 64x64 originals from disk; TTA at the mapper's size without flip gives the default metrics.
    cfg = tiny_config("model.num_classes=7", "data.test.split=val", f"data.test.root={tmp_path}",
                      "data.test.options={num_images: 3, image_size: 64}",
                      "data.num_workers=0", "data.min_size_test=48", "data.max_size_test=1000")
    net = build_maskformer(cfg).eval()
    loader = build_test_loader(cfg)
    meta = get_metadata(cfg, "test")
    plain = evaluate(net, loader, meta, cfg.test, CPU, progress=False)
    cfg.test.aug = dataclasses.replace(cfg.test.aug, enabled=True, min_sizes=[48], flip=False)
    same = evaluate(net, loader, meta, cfg.test, CPU, progress=False, inference=build_inference(cfg.test))
    assert same["sem_seg"].keys() == plain["sem_seg"].keys()
    for key, value in plain["sem_seg"].items():  # NaN for classes absent from these 3 images
        assert same["sem_seg"][key] == pytest.approx(value, nan_ok=True, rel=0, abs=0)
    cfg.test.aug.min_sizes, cfg.test.aug.flip = [32, 64], True
    seen = []
    evaluate(net, loader, meta, cfg.test, CPU, progress=False, inference=build_inference(cfg.test),
             on_result=lambda s, r: seen.append(tuple(r["sem_seg"].shape)))
    assert seen == [(7, 64, 64)] * 3
