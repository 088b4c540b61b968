"""Reading images, label maps and panoptic PNGs, with errors that name the file and the problem.

Every reader raises :class:`DatasetError` (never a bare ``OSError``/``IndexError`` from deep inside
PIL or numpy), so a broken sample is reported at the first touch with its path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DatasetError",
    "read_image",
    "read_label",
    "read_panoptic",
    "read_json",
    "rgb2id",
    "id2rgb",
    "check_label_values",
    "image_size_of",
]


class DatasetError(RuntimeError):
    """A dataset file or annotation that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    if not os.path.exists(path):
        raise DatasetError(path, f"{what} file not found")
    try:
        img = Image.open(path)
        img.load()  # decode now: truncated or corrupt files fail here, not later
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise DatasetError(path, f"cannot read {what}: {type(err).__name__}: {err}") from None
    return img


def image_size_of(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file header, EXIF orientation applied, without decoding pixels."""
    if not os.path.exists(path):
        raise DatasetError(path, "image file not found")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception as err:
        raise DatasetError(path, f"cannot read image header: {type(err).__name__}: {err}") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as uint8 ``[H, W, 3]``, EXIF orientation applied (as detectron2's ``read_image``)."""
    img = _open(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
    except Exception as err:
        raise DatasetError(path, f"cannot convert image to RGB: {type(err).__name__}: {err}") from None
    return np.asarray(img, dtype=np.uint8).copy()


def read_label(path: str | os.PathLike) -> np.ndarray:
    """A single-channel label map as int64 ``[H, W]``.

    Grayscale (``L``), palette (``P``: the palette *indices* are the labels), 16-bit (``I;16``, e.g.
    ADE20K-full TIFFs) and 32-bit integer images are accepted. Colour images are refused: a colour
    visualisation saved instead of a label map is a common mistake, and guessing would corrupt labels.
    """
    img = _open(path, "label")
    mode = img.mode
    if mode in ("L", "P", "I", "1") or mode.startswith("I;16"):
        arr = np.asarray(img)
    elif mode == "F":
        arr = np.asarray(img)
        if not np.all(arr == np.round(arr)):
            raise DatasetError(path, "label map has non-integer (float) values")
    else:
        raise DatasetError(
            path,
            f"label map must be a single-channel image (L, P, I;16 or I), got mode {mode!r}; "
            "a colour PNG is a visualisation, not a label map",
        )
    return arr.astype(np.int64)


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: segment id = R + 256 G + 256^2 B. ``[H,W,3]`` uint8 -> int64 ``[H,W]``."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb2id`: int ``[H,W]`` -> uint8 ``[H,W,3]``."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)


def read_panoptic(path: str | os.PathLike) -> np.ndarray:
    """A panoptic segment-id map as int64 ``[H, W]`` (0 = void).

    RGB PNGs use the COCO encoding (:func:`rgb2id`); single-channel PNGs hold the ids directly.
    """
    img = _open(path, "panoptic PNG")
    if img.mode in ("RGB", "RGBA"):
        return rgb2id(np.asarray(img.convert("RGB")))
    if img.mode in ("L", "P", "I") or img.mode.startswith("I;16"):
        return np.asarray(img).astype(np.int64)
    raise DatasetError(path, f"panoptic PNG must be RGB (COCO id encoding) or single-channel, got mode {img.mode!r}")


def read_json(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise DatasetError(path, "annotation JSON not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DatasetError(path, f"cannot parse JSON: {err}") from None


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: int, path: str | os.PathLike) -> None:
    """Raise if ``label`` holds a value outside ``[0, num_classes)`` other than ``ignore_label``."""
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_label)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise DatasetError(
            path,
            f"label values {shown} are outside [0, {num_classes}) and are not the ignore label {ignore_label} "
            f"({int(bad.sum())} pixels); check num_classes/ignore_label, or whether the labels need preparation "
            "(e.g. reduce_zero_label for 1-based labels)",
        )
