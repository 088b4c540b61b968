"""Single-image prediction for notebooks and scripts: load, resize, normalise, pad, run, post-process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maskformer.data.transforms import resize_shortest_edge_shape
from maskformer.inference import postprocess


@dataclass
class Prediction:
    """The result of ``MaskFormer.predict`` at the input image's own size.

    sem_seg: int64 [H, W] class ids; sem_seg_scores: [K, H, W] per-class scores;
    panoptic_seg: int32 [H, W] segment ids (0 = void) with segments_info
    [{"id", "category_id", "isthing", "score"}]; instances: {"masks" bool [N,H,W], "scores", "labels"}.
    """

    sem_seg: torch.Tensor
    sem_seg_scores: torch.Tensor
    panoptic_seg: torch.Tensor | None = None
    segments_info: list[dict] = field(default_factory=list)
    instances: dict[str, torch.Tensor] | None = None


def load_image(image: Any) -> torch.Tensor:
    """A path, PIL image, HxWx3 (or HxW) uint8 array or uint8 tensor ([3,H,W] or [H,W,3]) -> uint8 [3,H,W] RGB."""
    if isinstance(image, (str, Path, os.PathLike)):
        from PIL import Image, ImageOps, UnidentifiedImageError

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                image = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        try:
            image = np.array(image.convert("RGB"))  # PIL.Image
        except AttributeError:
            raise TypeError(f"cannot read an image from a {type(image).__name__}") from None
    tensor = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0-255), got {tensor.dtype}")
    if tensor.dim() == 2:
        tensor = tensor[None].expand(3, -1, -1)
    elif tensor.dim() == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(2, 0, 1)
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an RGB image [3,H,W] or [H,W,3], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The test mapper's resize of a uint8 [..., 3, H, W] image: bilinear with antialiasing (no-op at the same size)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad [B,C,H,W] at bottom/right so H and W are multiples of ``divisor`` (no-op for 0 or 1)."""
    if divisor <= 1:
        return images
    h, w = images.shape[-2:]
    return F.pad(images, (0, (-w) % divisor, 0, (-h) % divisor))


@torch.no_grad()
def predict(model, image: Any, *, panoptic: bool = False, instance: bool = False) -> Prediction:
    """Run ``model`` (a :class:`MaskFormer`) on one image; see :meth:`MaskFormer.predict`."""
    settings = model.inference
    rgb = load_image(image)
    orig_size = tuple(rgb.shape[-2:])
    # Exactly what evaluation does: the test mapper's resize, the collator's normalisation and padding.
    size = resize_shortest_edge_shape(*orig_size, settings.min_size_test, settings.max_size_test)
    device = model.pixel_mean.device
    x = resize_image(rgb, size).to(device)[None].float()
    x = pad_to_multiple((x - model.pixel_mean) / model.pixel_std, model.size_divisibility)
    was_training = model.training
    model.eval()
    try:
        outputs = model(x)
    finally:
        model.train(was_training)
    is_thing = settings.is_thing or [False] * model.num_classes
    result = postprocess(outputs, [size], [orig_size], semantic=True, panoptic=panoptic, instance=instance,
                         is_thing=is_thing, object_mask_threshold=settings.object_mask_threshold,
                         overlap_threshold=settings.overlap_threshold, top_k=settings.detections_per_image,
                         padded_size=tuple(x.shape[-2:]))[0]
    scores = result["sem_seg"]
    pred = Prediction(sem_seg=scores.argmax(0), sem_seg_scores=scores)
    if panoptic:
        pred.panoptic_seg, pred.segments_info = result["panoptic_seg"]
    if instance:
        pred.instances = result["instances"]
    return pred
