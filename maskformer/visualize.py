"""Coloured overlays of semantic, panoptic and instance results, with a legend of the classes shown.

Masks are blended with torchvision's ``draw_segmentation_masks``; the legend is a white strip below
(or right of) the image listing each class present with its colour swatch, drawn with PIL.
Every ``draw_*`` function takes and returns a uint8 ``[3,H,W]`` tensor (anything
:func:`maskformer.predict.load_image` reads is accepted as input); :func:`to_pil` converts.

Colours: semantic classes use the dataset's colours (``DatasetMetadata.colors``); datasets without
colours get :func:`~maskformer.data.metadata.default_colors`. Panoptic *thing* segments and instances
get a deterministic jitter of their class colour, so neighbouring objects of one class stay apart;
*stuff* segments keep the class colour (as detectron2's visualizer does).

    pred = model.predict("street.jpg", panoptic=True)
    vis = visualize_prediction("street.jpg", pred, task="panoptic", class_names=names, colors=colors)
    to_pil(vis).save("street_overlay.png")
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from maskformer.data.metadata import default_colors
from maskformer.predict import load_image

__all__ = [
    "class_palette",
    "jitter_color",
    "paint_instances",
    "draw_semantic",
    "draw_panoptic",
    "draw_instances",
    "draw_legend",
    "visualize_prediction",
    "to_pil",
]

Color = tuple[int, int, int]


def class_palette(num_classes: int, colors: Sequence[Sequence[int]] | None = None) -> list[Color]:
    """``num_classes`` RGB colours: ``colors`` if given (checked), else a well-spread generated palette."""
    if not colors:
        return default_colors(num_classes)
    if len(colors) < num_classes:
        raise ValueError(f"the palette has {len(colors)} colours for {num_classes} classes")
    palette = []
    for i, c in enumerate(colors[:num_classes]):
        if len(c) != 3 or not all(0 <= int(v) <= 255 for v in c):
            raise ValueError(f"colour {i} must be three values in [0, 255], got {c!r}")
        palette.append(tuple(int(v) for v in c))
    return palette


def jitter_color(color: Sequence[int], key: int, amount: int = 60) -> Color:
    """A deterministic variation of ``color`` for object ``key``: each channel moves by at most ``amount``."""
    offset = np.random.default_rng([int(key) & 0xFFFFFFFF, 7]).uniform(-1.0, 1.0, 3)
    offset = offset / max(np.abs(offset).max(), 1e-6) * amount  # at least one channel moves by ``amount``
    return tuple(int(v) for v in np.clip(np.asarray(color, float) + offset, 0, 255).round())


def _label_map(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.dim() != 2 or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer [H, W] map, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


def _check_size(image: torch.Tensor, label: torch.Tensor, what: str) -> None:
    if tuple(label.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"{what} is {tuple(label.shape[-2:])} (HxW) but the image is {tuple(image.shape[-2:])}")


def _blend(image: torch.Tensor, masks: torch.Tensor, colors: list[Color], alpha: float) -> torch.Tensor:
    if masks.shape[0] == 0:
        return image.clone()
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=colors)


def _outline(image: torch.Tensor, ids: torch.Tensor, color: Color = (255, 255, 255)) -> torch.Tensor:
    """Paint the pixels where the segment id changes to a neighbour (right or below); 0 = no segment."""
    edge = torch.zeros_like(ids, dtype=torch.bool)
    dx = ids[:, 1:] != ids[:, :-1]
    dy = ids[1:, :] != ids[:-1, :]
    edge[:, 1:] |= dx
    edge[1:, :] |= dy
    edge &= ids > 0
    out = image.clone()
    out[:, edge] = torch.tensor(color, dtype=torch.uint8)[:, None]
    return out


def draw_semantic(image: Any, sem_seg: Any, colors: Sequence[Sequence[int]] | None = None, *, alpha: float = 0.6,
                  num_classes: int | None = None) -> torch.Tensor:
    """Blend one colour per class present over ``image``.

    Args:
        image: uint8 [3,H,W] (or a path / PIL image / HxWx3 array).
        sem_seg: [H,W] class ids; ids outside [0, num_classes) (the ignore label) stay uncoloured.
        colors: the dataset's K colours (default: a generated palette).
        num_classes: K; default ``len(colors)``, or ``max id + 1`` without colours.
    Returns:
        uint8 [3,H,W].
    """
    image = load_image(image)
    sem = _label_map(sem_seg, "sem_seg")
    _check_size(image, sem, "sem_seg")
    k = num_classes or (len(colors) if colors else int(sem.max()) + 1 if sem.numel() else 1)
    palette = class_palette(k, colors)
    present = [c for c in torch.unique(sem).tolist() if 0 <= c < k]
    masks = sem[None] == torch.tensor(present, dtype=torch.int64).view(-1, 1, 1)
    return _blend(image, masks, [palette[c] for c in present], alpha)


def draw_panoptic(image: Any, panoptic_seg: Any, segments_info: Sequence[dict],
                  colors: Sequence[Sequence[int]] | None = None, *, alpha: float = 0.6, num_classes: int | None = None,
                  outline: bool = True) -> torch.Tensor:
    """Blend each panoptic segment: stuff in its class colour, things in a jitter of it.

    Args:
        panoptic_seg: [H,W] segment ids (0 = void, left uncoloured).
        segments_info: ``[{"id", "category_id" (contiguous), "isthing"}]``.
        outline: draw a white line along segment borders.
    Returns:
        uint8 [3,H,W].
    """
    image = load_image(image)
    ids = _label_map(panoptic_seg, "panoptic_seg")
    _check_size(image, ids, "panoptic_seg")
    k = num_classes or (len(colors) if colors else 1 + max((int(s["category_id"]) for s in segments_info), default=0))
    palette = class_palette(k, colors)
    masks, seg_colors = [], []
    for s in segments_info:
        base = palette[int(s["category_id"])]
        seg_colors.append(jitter_color(base, int(s["id"])) if s.get("isthing", False) else base)
        masks.append(ids == int(s["id"]))
    stacked = torch.stack(masks) if masks else torch.zeros((0, *ids.shape), dtype=torch.bool)
    out = _blend(image, stacked, seg_colors, alpha)
    return _outline(out, ids) if outline else out


def paint_instances(masks: Any, scores: Any | None = None) -> torch.Tensor:
    """Overlapping instance masks -> one int64 [H,W] map: 0 = none, i+1 = instance i (higher score on top)."""
    masks = torch.as_tensor(masks).detach().cpu().bool()
    if masks.dim() != 3:
        raise ValueError(f"masks must be [N,H,W], got {tuple(masks.shape)}")
    n = masks.shape[0]
    order = torch.arange(n) if scores is None else torch.as_tensor(scores).detach().cpu().float().argsort(stable=True)
    if scores is None:
        order = order.flip(0)  # without scores, earlier instances win (results come sorted by score)
    ids = torch.zeros(masks.shape[-2:], dtype=torch.int64)
    for i in order.tolist():  # lowest priority first, the winner paints last
        ids[masks[i]] = i + 1
    return ids


def draw_instances(image: Any, masks: Any, labels: Any, colors: Sequence[Sequence[int]] | None = None, *,
                   scores: Any | None = None, score_threshold: float = 0.0, alpha: float = 0.6,
                   num_classes: int | None = None, outline: bool = True) -> torch.Tensor:
    """Blend instances (score >= ``score_threshold``) in jitters of their class colour; overlaps go to the
    higher score.

    Args:
        masks: bool [N,H,W]; labels: [N] class ids; scores: [N] or None.
    Returns:
        uint8 [3,H,W].
    """
    image = load_image(image)
    masks = torch.as_tensor(masks).detach().cpu().bool()
    labels = torch.as_tensor(labels).detach().cpu().long().view(-1)
    if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(f"expected masks [N,H,W] and labels [N], got {tuple(masks.shape)} and {tuple(labels.shape)}")
    _check_size(image, masks, "instance masks")
    if scores is not None:
        scores = torch.as_tensor(scores).detach().cpu().float().view(-1)
        keep = scores >= score_threshold
        masks, labels, scores = masks[keep], labels[keep], scores[keep]
    k = num_classes or (len(colors) if colors else int(labels.max()) + 1 if labels.numel() else 1)
    palette = class_palette(k, colors)
    ids = paint_instances(masks, scores)
    present = [i for i in torch.unique(ids).tolist() if i > 0]
    stacked = ids[None] == torch.tensor(present, dtype=torch.int64).view(-1, 1, 1)
    inst_colors = [jitter_color(palette[int(labels[i - 1])], i) for i in present]
    out = _blend(image, stacked, inst_colors, alpha)
    return _outline(out, ids) if outline else out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def draw_legend(image: Any, entries: Sequence[tuple[str, Sequence[int]]], *, position: str = "bottom",
                font_size: int | None = None) -> torch.Tensor:
    """Append a white legend strip listing ``entries`` as (name, colour) with a colour swatch each.

    Args:
        position: ``bottom`` (entries flow left to right in rows as wide as the image) or ``right``
            (entries flow top to bottom in columns as tall as the image).
        font_size: default scales with the image (10-24 px).
    Returns:
        uint8 [3, H + strip, W] (bottom) or [3, H, W + strip] (right); ``image`` unchanged without entries.
    """
    if position not in ("bottom", "right"):
        raise ValueError(f"position must be 'bottom' or 'right', got {position!r}")
    image = load_image(image)
    if not entries:
        return image.clone()
    h, w = image.shape[-2:]
    size = font_size or int(min(24, max(10, round(min(h, w) / 32))))
    font = _font(size)
    pad = max(3, size // 2)
    swatch = size
    row_h = swatch + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(str(name), font=font) for name, _ in entries)
    item_w = int(math.ceil(swatch + pad + text_w + 2 * pad))
    n = len(entries)
    if position == "bottom":
        cols = max(1, (w - pad) // item_w)
        rows = math.ceil(n / cols)
        canvas_w, canvas_h = max(w, cols * item_w + pad), h + rows * row_h + pad
        origin = (0, h)
    else:
        rows = max(1, (h - pad) // row_h)
        cols = math.ceil(n / rows)
        canvas_w, canvas_h = w + cols * item_w + pad, max(h, min(n, rows) * row_h + pad)
        origin = (w, 0)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(to_pil(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, color) in enumerate(entries):
        r, c = (i // cols, i % cols) if position == "bottom" else (i % rows, i // rows)
        x = origin[0] + pad + c * item_w
        y = origin[1] + pad + r * row_h
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        top, bottom = draw.textbbox((0, 0), str(name), font=font)[1::2]
        draw.text((x + swatch + pad, y + (swatch - (bottom - top)) / 2 - top), str(name), fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def _legend_entries(class_ids: Sequence[int], class_names: Sequence[str] | None, palette: list[Color]):
    names = class_names or [str(i) for i in range(len(palette))]
    return [(names[c] if c < len(names) else str(c), palette[c]) for c in sorted(set(class_ids))]


def visualize_prediction(image: Any, prediction, *, task: str = "semantic", class_names: Sequence[str] | None = None,
                         colors: Sequence[Sequence[int]] | None = None, alpha: float = 0.6,
                         score_threshold: float = 0.5, legend: str | None = "bottom") -> torch.Tensor:
    """The overlay of a :class:`~maskformer.predict.Prediction` for ``task`` (semantic / panoptic / instance),
    with a legend of the classes shown (``legend=None`` for none, else its position).

    Returns:
        uint8 [3,H',W'] (the image's size plus the legend strip).
    """
    image = load_image(image)
    k = len(class_names) if class_names else prediction.sem_seg_scores.shape[0]
    palette = class_palette(k, colors)
    if task == "semantic":
        sem = _label_map(prediction.sem_seg, "sem_seg")
        out = draw_semantic(image, sem, palette, alpha=alpha, num_classes=k)
        shown = [c for c in torch.unique(sem).tolist() if 0 <= c < k]
    elif task == "panoptic":
        if prediction.panoptic_seg is None:
            raise ValueError("the prediction has no panoptic result; predict with panoptic=True")
        out = draw_panoptic(image, prediction.panoptic_seg, prediction.segments_info, palette, alpha=alpha,
                            num_classes=k)
        shown = [int(s["category_id"]) for s in prediction.segments_info]
    elif task == "instance":
        if prediction.instances is None:
            raise ValueError("the prediction has no instances; predict with instance=True")
        inst = prediction.instances
        out = draw_instances(image, inst["masks"], inst["labels"], palette, scores=inst["scores"],
                             score_threshold=score_threshold, alpha=alpha, num_classes=k)
        keep = inst["scores"].detach().cpu() >= score_threshold
        labels = inst["labels"].detach().cpu()[keep]
        scores = inst["scores"].detach().cpu()
        visible = paint_instances(inst["masks"].detach().cpu()[keep], scores[keep]).unique()
        shown = [int(labels[i - 1]) for i in visible.tolist() if i > 0]
    else:
        raise ValueError(f"task must be 'semantic', 'panoptic' or 'instance', got {task!r}")
    if legend is None:
        return out
    return draw_legend(out, _legend_entries(shown, class_names, palette), position=legend)


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [3,H,W] tensor -> RGB PIL image."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3,H,W] tensor, got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image.detach().cpu().permute(1, 2, 0).numpy())
