"""The original MaskFormer training/test augmentations on ``torchvision.transforms.v2`` kernels.

A *sample* here is a dict with ``"image"``: ``tv_tensors.Image`` uint8 ``[3,H,W]`` and optionally
``"sem_seg"`` / ``"pan_seg"``: ``tv_tensors.Mask`` int64 ``[H,W]`` (class ids / panoptic segment ids).
Geometric transforms move all of them together; masks are always resized with nearest neighbour.

Every random transform draws from an explicit ``numpy.random.Generator`` passed to ``__call__``
instead of a global RNG: the loader seeds one generator per (pass, sample position), which makes
the augmentation of a sample independent of which worker process maps it (see ``loader.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "Sample",
    "resize_shortest_edge_shape",
    "ResizeShortestEdge",
    "RandomCropCategoryAreaConstraint",
    "RandomCropAbsoluteRange",
    "ColorAugSSD",
    "RandomHorizontalFlip",
    "PadTo",
    "Compose",
    "DetrPanopticAugmentation",
    "rgb_to_hsv",
    "hsv_to_rgb",
]

Sample = dict  # {"image": tv_tensors.Image, "sem_seg"?: tv_tensors.Mask, "pan_seg"?: tv_tensors.Mask}
_GEOMETRIC_KEYS = ("image", "sem_seg", "pan_seg")


def _apply(sample: Sample, fn) -> Sample:
    out = dict(sample)
    for key in _GEOMETRIC_KEYS:
        if key in out:
            out[key] = fn(out[key])
    return out


def _hw(sample: Sample) -> tuple[int, int]:
    h, w = sample["image"].shape[-2:]
    return int(h), int(w)


def resize_shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: short side -> ``short``, long side capped."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return int(new_h + 0.5), int(new_w + 0.5)


def _resize(sample: Sample, size: tuple[int, int]) -> Sample:
    if size == _hw(sample):
        return sample
    # Image: bilinear with antialiasing (as PIL's bilinear used by detectron2); Mask: nearest (dispatch).
    return _apply(sample, lambda t: F.resize(t, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True))


class ResizeShortestEdge:
    """Resize so the short side is one of ``min_sizes`` (drawn uniformly), capping the long side at ``max_size``."""

    def __init__(self, min_sizes: list[int] | tuple[int, ...] | int, max_size: int = 10**9):
        self.min_sizes = [min_sizes] if isinstance(min_sizes, int) else list(min_sizes)
        self.max_size = max_size

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        short = self.min_sizes[0] if len(self.min_sizes) == 1 else self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        h, w = _hw(sample)
        return _resize(sample, resize_shortest_edge_shape(h, w, short, self.max_size))


def _crop(sample: Sample, y0: int, x0: int, ch: int, cw: int) -> Sample:
    return _apply(sample, lambda t: F.crop(t, y0, x0, ch, cw))


class RandomCropCategoryAreaConstraint:
    """Random ``crop_size`` crop; with ``single_category_max_area < 1`` retry (up to 10 times, like
    detectron2's ``RandomCrop_CategoryAreaConstraint``) until no single class covers more than that
    fraction of the labeled (non-ignore) pixels of the crop. 1.0 is a plain random crop."""

    def __init__(self, crop_size: tuple[int, int], single_category_max_area: float = 1.0, ignore_label: int = 255):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.single_category_max_area = single_category_max_area
        self.ignore_label = ignore_label

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = _hw(sample)
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        sem_seg = sample.get("sem_seg")
        if self.single_category_max_area < 1.0 and sem_seg is not None:
            for _ in range(10):
                crop = sem_seg[y0 : y0 + ch, x0 : x0 + cw]
                labels, counts = torch.unique(crop, return_counts=True)
                counts = counts[labels != self.ignore_label]
                if len(counts) > 1 and counts.max() < counts.sum() * self.single_category_max_area:
                    break
                y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        return _crop(sample, y0, x0, ch, cw)


class RandomCropAbsoluteRange:
    """detectron2 ``RandomCrop("absolute_range", (lo, hi))``: crop height and width each drawn from [lo, hi]."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h, w = _hw(sample)
        ch = int(rng.integers(min(h, self.min_size), min(h, self.max_size) + 1))
        cw = int(rng.integers(min(w, self.min_size), min(w, self.max_size) + 1))
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        return _crop(sample, y0, x0, ch, cw)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """float ``[3,H,W]`` in [0,1] -> HSV ``[3,H,W]`` with hue in [0,1)."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(0)
    minc, _ = rgb.min(0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(0)
    h6 = (h % 1.0) * 6
    i = torch.floor(h6)
    f = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack(
        [torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    )  # [6, 3, H, W]
    return table.gather(0, i[None, None].expand(1, 3, *i.shape)).squeeze(0)


class ColorAugSSD:
    """SSD-style photometric distortion as detectron2's ``ColorAugSSDTransform`` (used by MaskFormer).

    Brightness +U(-32, 32) (p=.5); then, in random order, either contrast -> saturation -> hue or
    saturation -> hue -> contrast, each with p=.5: contrast x U(.5, 1.5), HSV saturation x U(.5, 1.5),
    hue + randint(-18, 18) in OpenCV units (180 per turn). Values are clipped to [0, 255] and
    truncated to integers after every step, as the original's uint8 round trips do.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return torch.floor((x * alpha + beta).clamp(0, 255))

    def _contrast(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.integers(2):
            x = self._convert(x, alpha=float(rng.uniform(*self.contrast_range)))
        return x

    def _saturation_hue(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        do_sat, do_hue = bool(rng.integers(2)), False
        sat_alpha = float(rng.uniform(*self.saturation_range)) if do_sat else 1.0
        do_hue = bool(rng.integers(2))
        hue_shift = int(rng.integers(-self.hue_delta, self.hue_delta + 1)) if do_hue else 0
        if not (do_sat or do_hue):
            return x
        hsv = rgb_to_hsv(x / 255.0)
        if do_sat:
            hsv[1] = (hsv[1] * sat_alpha).clamp(0, 1)
        if do_hue:
            hsv[0] = (hsv[0] + hue_shift / 180.0) % 1.0
        return self._convert(hsv_to_rgb(hsv) * 255.0)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        x = sample["image"].float()
        if rng.integers(2):
            x = self._convert(x, beta=float(rng.uniform(-self.brightness_delta, self.brightness_delta)))
        if rng.integers(2):
            x = self._saturation_hue(self._contrast(x, rng), rng)
        else:
            x = self._contrast(self._saturation_hue(x, rng), rng)
        out = dict(sample)
        out["image"] = tv_tensors.Image(x.to(torch.uint8))
        return out


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() < self.p:
            return _apply(sample, F.horizontal_flip)
        return sample


class PadTo:
    """Pad right/bottom to exactly ``size`` (no-op where already larger): image with ``image_fill``,
    each mask with its fill value (ignore for ``sem_seg``, 0 = VOID for ``pan_seg``)."""

    def __init__(self, size: tuple[int, int], image_fill: int, mask_fills: dict[str, int]):
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = image_fill
        self.mask_fills = mask_fills

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        h, w = _hw(sample)
        pad_h, pad_w = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if pad_h == 0 and pad_w == 0:
            return sample
        out = dict(sample)
        for key in _GEOMETRIC_KEYS:
            if key in out:
                fill = self.image_fill if key == "image" else self.mask_fills[key]
                out[key] = F.pad(out[key], [0, 0, pad_w, pad_h], fill=fill)
        return out


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]})"


class DetrPanopticAugmentation:
    """The DETR COCO recipe used by MaskFormer's ``DETRPanopticDatasetMapper``: horizontal flip, then
    with p=.5 ``ResizeShortestEdge(min_sizes, max_size)``, else ``ResizeShortestEdge([400,500,600])``
    -> random crop with sides in [384, 600] -> ``ResizeShortestEdge(min_sizes, max_size)``."""

    def __init__(self, min_sizes: list[int], max_size: int, crop_resize_sizes=(400, 500, 600), crop_range=(384, 600)):
        self.flip = RandomHorizontalFlip()
        self.plain = ResizeShortestEdge(min_sizes, max_size)
        self.with_crop = Compose(
            [ResizeShortestEdge(list(crop_resize_sizes)), RandomCropAbsoluteRange(*crop_range), ResizeShortestEdge(min_sizes, max_size)]
        )

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample = self.flip(sample, rng)
        return self.plain(sample, rng) if rng.random() < 0.5 else self.with_crop(sample, rng)
