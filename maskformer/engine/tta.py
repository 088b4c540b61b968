"""Test-time augmentation (multi-scale + flip) and sliding-window inference for ``evaluate``.

Both are drop-in replacements for :func:`~maskformer.engine.evaluate.default_inference`
(same signature, same per-image result dicts), chosen from the config by :func:`build_inference`::

    metrics = evaluate(model, loader, metadata, cfg.test, device, inference=build_inference(cfg.test))

**TTA** (the original's ``TEST.AUG``): for every size in ``test.aug.min_sizes`` (shortest edge, long
side capped at ``test.aug.max_size``) and every flip (none, plus horizontal if ``test.aug.flip``) the
*original* image is resized, normalised, padded and run through the model; each pass gives the
semantic score map ``[K,H0,W0]`` at the original size (upsample to the padded size, semantic
inference, crop, resize: the original's order), flipped passes are flipped back, and all passes
are averaged. The loader's images are already resized to ``data.min_size_test``, so the original
image is taken from the sample's ``"orig_image"`` (uint8 ``[3,H0,W0]``) when a dataset provides one,
and otherwise re-read from its ``"file_name"`` with the dataset's own reader (EXIF orientation
applied). Resizing uses the test mapper's exact operation (torchvision bilinear + antialias on uint8,
detectron2's output-size rule), so one size equal to ``min_size_test`` without flip reproduces the
default inference.

**Sliding window** (Cityscapes-style large inputs): the loader's (resized, normalised) image is tiled
with ``test.sliding_window.crop_size`` windows every ``stride`` pixels, the last window in each
direction aligned to the image's far edge; the model runs on every window (padded to the size
divisibility), the per-class scores of each window (computed as in the default inference, at the
window's size) are summed into a ``[K,h,w]`` map with a count map, divided, and resized to the
original size.

Both are semantic-only, as in the original. With ``test.panoptic_on`` / ``test.instance_on`` the
panoptic and instance results come from the un-augmented pass, i.e. exactly what
``default_inference`` gives for the batch (one more forward pass per batch).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maskformer.config import TestConfig
from maskformer.data.metadata import DatasetMetadata
from maskformer.data.transforms import resize_shortest_edge_shape
from maskformer.engine.evaluate import autocast_context, default_inference
from maskformer.inference import postprocess, resize_to_original
from maskformer.predict import pad_to_multiple, resize_image

__all__ = [
    "InferenceFn",
    "build_inference",
    "tta_inference",
    "sliding_window_inference",
    "original_image",
    "window_starts",
]

InferenceFn = Callable[..., list[dict]]


def build_inference(test: TestConfig) -> InferenceFn:
    """The inference function ``test`` asks for: default, TTA (``test.aug``) or sliding window.

    Raises ValueError for combinations the original does not have (both at once) or that would do
    nothing (TTA or sliding window without ``test.semantic_on``).
    """
    aug, window = test.aug.enabled, test.sliding_window.enabled
    if aug and window:
        raise ValueError("test.aug.enabled and test.sliding_window.enabled are both true; enable at most one")
    if (aug or window) and not test.semantic_on:
        key = "test.aug.enabled" if aug else "test.sliding_window.enabled"
        raise ValueError(f"{key} averages semantic scores, but test.semantic_on is false")
    if window:
        _check_window(test.sliding_window.crop_size, test.sliding_window.stride)
        return sliding_window_inference
    if aug:
        return tta_inference
    return default_inference


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _network(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the normalisation buffers (unwraps DistributedDataParallel)."""
    return getattr(model, "module", model)


def _normalize(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 or float [B,3,H,W] on the 0-255 scale -> normalised float32, as the collator does."""
    net = _network(model)
    mean = net.pixel_mean.to(images.device, torch.float32)
    std = net.pixel_std.to(images.device, torch.float32)
    return (images.float() - mean) / std


def _divisibility(model: torch.nn.Module) -> int:
    return int(getattr(_network(model), "size_divisibility", 32))


def _forward(model, images: torch.Tensor, device: torch.device, amp: str, channels_last: bool) -> dict:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(device, amp):
        return model(images)


def _panoptic_and_instances(model, batch, test, metadata, device, amp, channels_last) -> list[dict] | None:
    """Panoptic/instance results of the un-augmented pass (None when neither is on)."""
    if not (test.panoptic_on or test.instance_on):
        return None
    plain = dataclasses.replace(test, semantic_on=False)
    return default_inference(model, batch, plain, metadata, device, amp=amp, channels_last=channels_last)


def original_image(sample: dict, orig_size: tuple[int, int]) -> torch.Tensor:
    """The full-resolution uint8 ``[3,H0,W0]`` image of a test sample.

    Uses ``sample["orig_image"]`` if the dataset provides it, else re-reads ``sample["file_name"]``.
    Raises ValueError if neither is there or the image does not have the sample's ``orig_size``.
    """
    if "orig_image" in sample:
        image = torch.as_tensor(sample["orig_image"])
        where = f"sample {sample.get('image_id', sample.get('file_name', '?'))!r}: orig_image"
    elif "file_name" in sample:
        from maskformer.data.io import read_image

        image = torch.from_numpy(read_image(sample["file_name"])).permute(2, 0, 1)
        where = str(sample["file_name"])
    else:
        raise ValueError(
            "test-time augmentation needs the original image: the test samples have neither "
            "'orig_image' (uint8 [3,H0,W0]) nor 'file_name'")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: expected a uint8 [3,H,W] image, got {image.dtype} {tuple(image.shape)}")
    if tuple(image.shape[-2:]) != tuple(orig_size):
        raise ValueError(f"{where}: image is {tuple(image.shape[-2:])} (HxW) but the sample's orig_size is "
                         f"{tuple(orig_size)}; the file changed since the dataset was read?")
    return image


# ------------------------------------------------------------------------------------------------
# Test-time augmentation
# ------------------------------------------------------------------------------------------------


def _tta_scores(model, image: torch.Tensor, *, min_sizes, max_size: int, flip: bool, device: torch.device,
                amp: str, channels_last: bool) -> torch.Tensor:
    """Average semantic scores [K,H0,W0] over sizes x flips for one uint8 [3,H0,W0] image."""
    orig_size = tuple(image.shape[-2:])
    total, passes = None, 0
    for short in min_sizes:
        size = resize_shortest_edge_shape(*orig_size, short, max_size)
        resized = resize_image(image, size)
        # The flipped copy has the same size: one forward pass for both.
        views = torch.stack([resized, resized.flip(-1)]) if flip else resized[None]
        # uint8 to the device (4x less to copy than float); the arithmetic is the collator's, exactly
        x = pad_to_multiple(_normalize(model, views.to(device, non_blocking=True)), _divisibility(model))
        outputs = _forward(model, x, device, amp, channels_last)
        results = postprocess(outputs, [size] * len(views), [orig_size] * len(views), semantic=True,
                              padded_size=tuple(x.shape[-2:]))
        for i, result in enumerate(results):
            scores = result["sem_seg"]
            if i == 1:
                scores = scores.flip(-1)
            total = scores.clone() if total is None else total.add_(scores)
            passes += 1
    return total / passes


@torch.no_grad()
def tta_inference(model: torch.nn.Module, batch: dict, test: TestConfig, metadata: DatasetMetadata,
                  device: torch.device, amp: str = "off", channels_last: bool = False) -> list[dict]:
    """Multi-scale (+ flip) semantic inference on each image's original pixels; see the module docstring.

    ``model`` is a :class:`~maskformer.models.MaskFormer` (or any module with ``pixel_mean``/``pixel_std``
    ``[3,1,1]`` buffers on the 0-255 scale, a ``size_divisibility`` and the same forward outputs).

    Returns:
        per image ``{"sem_seg": float32 [K,H0,W0]}`` (averaged scores), plus ``"panoptic_seg"`` /
        ``"instances"`` from the un-augmented pass when those tasks are on.
    """
    aug = test.aug
    extra = _panoptic_and_instances(model, batch, test, metadata, device, amp, channels_last)
    results = []
    for i, (sample, orig_size) in enumerate(zip(batch["samples"], batch["orig_sizes"])):
        result = dict(extra[i]) if extra is not None else {}
        if test.semantic_on:
            image = original_image(sample, orig_size)
            result["sem_seg"] = _tta_scores(model, image, min_sizes=aug.min_sizes, max_size=aug.max_size,
                                            flip=aug.flip, device=device, amp=amp, channels_last=channels_last)
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------
# Sliding window
# ------------------------------------------------------------------------------------------------


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``crop`` every ``stride`` along ``length``; the last window ends at
    ``length`` (so the whole extent is covered) and a ``crop >= length`` gives the single start 0."""
    if crop >= length:
        return [0]
    count = -(-(length - crop) // stride) + 1  # ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def _check_window(crop_size, stride) -> None:
    if any(s > c for s, c in zip(stride, crop_size)):
        raise ValueError(f"test.sliding_window.stride {list(stride)} must not exceed crop_size {list(crop_size)}: "
                         "the windows would leave pixels uncovered")


def _sliding_scores(model, image: torch.Tensor, *, crop_size, stride, device: torch.device, amp: str,
                    channels_last: bool, windows_per_batch: int) -> torch.Tensor:
    """Averaged semantic scores [K,h,w] of one normalised [3,h,w] image from overlapping windows."""
    _check_window(crop_size, stride)
    h, w = image.shape[-2:]
    ch, cw = min(crop_size[0], h), min(crop_size[1], w)
    boxes = [(y, x) for y in window_starts(h, ch, stride[0]) for x in window_starts(w, cw, stride[1])]
    scores = counts = None
    for start in range(0, len(boxes), windows_per_batch):
        chunk = boxes[start:start + windows_per_batch]
        crops = torch.stack([image[:, y:y + ch, x:x + cw] for y, x in chunk])
        x_in = pad_to_multiple(crops, _divisibility(model))
        outputs = _forward(model, x_in, device, amp, channels_last)
        window_results = postprocess(outputs, [(ch, cw)] * len(chunk), [(ch, cw)] * len(chunk), semantic=True,
                                     padded_size=tuple(x_in.shape[-2:]))
        for (y, x), result in zip(chunk, window_results):
            window = result["sem_seg"]
            if scores is None:
                scores = window.new_zeros((window.shape[0], h, w))
                counts = window.new_zeros((1, h, w))
            scores[:, y:y + ch, x:x + cw] += window
            counts[:, y:y + ch, x:x + cw] += 1
    return scores / counts


@torch.no_grad()
def sliding_window_inference(model: torch.nn.Module, batch: dict, test: TestConfig, metadata: DatasetMetadata,
                             device: torch.device, amp: str = "off", channels_last: bool = False,
                             windows_per_batch: int = 4) -> list[dict]:
    """Semantic inference from overlapping ``test.sliding_window`` windows; see the module docstring.

    Windows of one image go through the model ``windows_per_batch`` at a time.

    Returns:
        per image ``{"sem_seg": float32 [K,H0,W0]}``, plus ``"panoptic_seg"`` / ``"instances"`` from the
        un-augmented (whole-image) pass when those tasks are on.
    """
    window = test.sliding_window
    extra = _panoptic_and_instances(model, batch, test, metadata, device, amp, channels_last)
    results = []
    for i, (image_size, orig_size) in enumerate(zip(batch["image_sizes"], batch["orig_sizes"])):
        result = dict(extra[i]) if extra is not None else {}
        if test.semantic_on:
            h, w = image_size
            image = batch["images"][i, :, :h, :w].to(device, non_blocking=True)
            scores = _sliding_scores(model, image, crop_size=window.crop_size, stride=window.stride, device=device,
                                     amp=amp, channels_last=channels_last, windows_per_batch=windows_per_batch)
            result["sem_seg"] = resize_to_original(scores, (h, w), orig_size)
        results.append(result)
    return results
