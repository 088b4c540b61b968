"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic rules, from files or in memory.

The rules are those of the official ``panopticapi.evaluation.pq_compute``:

* a ground-truth and a predicted segment of the same category match when their IoU is strictly above 0.5,
  where the predicted pixels lying on VOID (ground-truth id 0) are left out of the union;
* crowd ground-truth segments (``iscrowd=1``) are never matched and never counted as false negatives;
* an unmatched prediction is not a false positive when more than half of its area lies on VOID plus the crowd
  region of its own category (as in the official code, the *last* crowd segment of that category in
  ``segments_info`` order);
* per category ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``,
  averaged over the categories with ``TP + FP + FN > 0``, separately for all, things and stuff.

Segment areas are counted in the PNGs / id maps (a JSON ``area`` field is not read), and every id in a PNG must be
listed in its ``segments_info`` and vice versa, for the ground truth as well as the predictions.

Per image the matching is vectorised: both id maps are compacted to segment indices and a single ``bincount``
over ``gt_index * (P + 1) + pred_index`` gives every intersection, so no Python loop runs over pixels or pairs.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image

from maskformer.distributed import all_gather_objects, is_main_process
from maskformer.evaluation.semantic import sum_across_ranks

logger = logging.getLogger(__name__)

VOID = 0
MAX_SEGMENT_ID = 256**3 - 1  # what an RGB PNG can store
# Per-category statistic columns.
_IOU, _TP, _FP, _FN = range(4)
# Id maps whose largest id is below this are compacted with a lookup table, larger ones with a binary search.
_LOOKUP_TABLE_LIMIT = 1 << 20

ArrayLike = Union[torch.Tensor, np.ndarray]


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours ``[..., 3]`` (uint8) -> segment ids ``[...]`` (int64): ``R + 256 G + 256² B``."""
    color = np.asarray(color)
    if color.ndim < 1 or color.shape[-1] != 3:
        raise ValueError(f"rgb2id expects an array [..., 3], got shape {color.shape}")
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[...]`` (integers in ``[0, 256³)``) -> COCO panoptic PNG colours ``[..., 3]`` (uint8)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"id2rgb expects integer segment ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(
            f"segment ids must lie in [0, {MAX_SEGMENT_ID}] to fit an RGB PNG, got range [{ids.min()}, {ids.max()}]"
        )
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = ids % 256
        ids = ids // 256
    return rgb


def _as_id_map(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be an integer id map [H, W], got shape {x.shape} and dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def _compact(id_map: np.ndarray, segment_ids: np.ndarray, what: str) -> np.ndarray:
    """Map segment id ``segment_ids[i]`` -> ``i + 1`` and VOID -> 0; any other id in the map is an error."""
    n = len(segment_ids)
    max_id = int(id_map.max()) if id_map.size else 0
    if id_map.size and id_map.min() < 0:
        raise ValueError(f"{what}: negative segment id {int(id_map.min())} in the id map")
    if max(max_id, int(segment_ids.max(initial=0))) < _LOOKUP_TABLE_LIMIT:
        table = np.full(max(max_id, int(segment_ids.max(initial=0))) + 1, -1, dtype=np.int64)
        table[VOID] = 0
        table[segment_ids] = np.arange(1, n + 1)
        index = table[id_map]
        unknown = index < 0
    else:
        order = np.argsort(segment_ids)
        known = np.concatenate([[VOID], segment_ids[order]])
        position = np.minimum(np.searchsorted(known, id_map), n)
        unknown = known[position] != id_map
        index = np.concatenate([[0], order + 1])[position]
    if unknown.any():
        missing = sorted(int(i) for i in np.unique(id_map[unknown])[:10])
        raise ValueError(f"{what}: segment ids {missing} are in the PNG/id map but not in segments_info")
    return index


def _segment_table(
    segments: Sequence[Mapping[str, Any]], category_index: Mapping[int, int], what: str, with_crowd: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``segments_info`` -> (ids [S], category indices [S], iscrowd [S] bool), validated."""
    ids = np.empty(len(segments), dtype=np.int64)
    categories = np.empty(len(segments), dtype=np.int64)
    crowd = np.zeros(len(segments), dtype=bool)
    for i, segment in enumerate(segments):
        try:
            segment_id, category_id = int(segment["id"]), int(segment["category_id"])
        except KeyError as e:
            raise ValueError(f"{what}: segments_info entry {i} has no {e.args[0]!r} key: {segment}") from None
        if not 0 < segment_id <= MAX_SEGMENT_ID:
            raise ValueError(f"{what}: segment id {segment_id} must lie in [1, {MAX_SEGMENT_ID}] (0 is VOID)")
        if category_id not in category_index:
            raise ValueError(f"{what}: segment {segment_id} has unknown category_id {category_id}")
        ids[i] = segment_id
        categories[i] = category_index[category_id]
        crowd[i] = with_crowd and bool(segment.get("iscrowd", 0))
    if len(np.unique(ids)) != len(ids):
        duplicated = sorted({int(x) for x in ids if (ids == x).sum() > 1})
        raise ValueError(f"{what}: segment ids {duplicated} appear more than once in segments_info")
    return ids, categories, crowd


def panoptic_image_stats(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    category_index: Mapping[int, int],
    image: str = "",
) -> np.ndarray:
    """Per-category PQ statistics of one image.

    Args:
        gt_ids, pred_ids: ``[H, W]`` integer segment-id maps (0 = VOID).
        gt_segments: ``[{"id", "category_id", "iscrowd" (optional, default 0)}]``.
        pred_segments: ``[{"id", "category_id"}]``.
        category_index: dataset category id -> row of the returned array.
        image: how to name the image in error messages.

    Returns:
        ``[C, 4]`` float64: summed IoU of matches, TP, FP, FN per category.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"image {image}: ground truth is {gt_ids.shape} but the prediction is {pred_ids.shape}")
    g_ids, g_cat, g_crowd = _segment_table(gt_segments, category_index, f"image {image} ground truth", True)
    p_ids, p_cat, _ = _segment_table(pred_segments, category_index, f"image {image} prediction", False)
    gt_index = _compact(gt_ids, g_ids, f"image {image} ground truth")
    pred_index = _compact(pred_ids, p_ids, f"image {image} prediction")
    num_gt, num_pred = len(g_ids), len(p_ids)

    # overlap[g, p]: pixels with ground-truth segment g and predicted segment p (row/column 0: VOID).
    overlap = np.bincount(
        (gt_index * (num_pred + 1) + pred_index).ravel(), minlength=(num_gt + 1) * (num_pred + 1)
    ).reshape(num_gt + 1, num_pred + 1)
    gt_area = overlap[1:].sum(1)
    pred_area = overlap[:, 1:].sum(0)
    for kind, ids, area in (("ground truth", g_ids, gt_area), ("prediction", p_ids, pred_area)):
        if (area == 0).any():
            missing = [int(i) for i in ids[area == 0][:10]]
            raise ValueError(f"image {image} {kind}: segment ids {missing} are in segments_info but not in the PNG")

    inter = overlap[1:, 1:]
    pred_on_void = overlap[0, 1:]
    union = gt_area[:, None] + pred_area[None, :] - inter - pred_on_void[None, :]
    comparable = (g_cat[:, None] == p_cat[None, :]) & ~g_crowd[:, None] & (inter > 0)
    iou = np.zeros(inter.shape, dtype=np.float64)
    np.divide(inter, union, out=iou, where=comparable)
    # IoU > 0.5 makes every match one-to-one, so no assignment step is needed.
    matched = iou > 0.5
    gt_matched = matched.any(1)
    pred_matched = matched.any(0)

    num_categories = len(category_index)
    stats = np.zeros((num_categories, 4), dtype=np.float64)
    match_g, match_p = np.nonzero(matched)
    stats[:, _IOU] = np.bincount(g_cat[match_g], weights=iou[match_g, match_p], minlength=num_categories)
    stats[:, _TP] = np.bincount(g_cat[match_g], minlength=num_categories)
    stats[:, _FN] = np.bincount(g_cat[~gt_matched & ~g_crowd], minlength=num_categories)

    crowd_of_category = np.full(num_categories, -1, dtype=np.int64)
    for row in np.nonzero(g_crowd)[0]:  # a later crowd segment of the same category wins, as in panopticapi
        crowd_of_category[g_cat[row]] = row
    crowd_row = crowd_of_category[p_cat]
    on_crowd = np.zeros(num_pred, dtype=np.int64)
    has_crowd = crowd_row >= 0
    on_crowd[has_crowd] = inter[crowd_row[has_crowd], np.nonzero(has_crowd)[0]]
    ignored = (pred_on_void + on_crowd) / np.maximum(pred_area, 1) > 0.5
    stats[:, _FP] = np.bincount(p_cat[~pred_matched & ~ignored], minlength=num_categories)
    return stats


def _average(
    stats: np.ndarray, category_ids: Sequence[int], isthing: np.ndarray, select: bool | None
) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """panopticapi's ``pq_average``: summary over present categories (fractions) plus per-category values."""
    per_class: dict[int, dict[str, float]] = {}
    pq = sq = rq = 0.0
    n = 0
    for row, category_id in enumerate(category_ids):
        if select is not None and bool(isthing[row]) != select:
            continue
        iou, tp, fp, fn = stats[row]
        if tp + fp + fn == 0:
            per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        denominator = tp + 0.5 * fp + 0.5 * fn
        values = {"pq": iou / denominator, "sq": iou / tp if tp else 0.0, "rq": tp / denominator}
        per_class[category_id] = values
        pq, sq, rq, n = pq + values["pq"], sq + values["sq"], rq + values["rq"], n + 1
    if n == 0:  # panopticapi divides by zero here; NaN says "no such category was seen"
        return {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _summarise(stats: np.ndarray, category_ids: Sequence[int], isthing: np.ndarray) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, select in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = _average(stats, category_ids, isthing, select)
        if name == "All":
            results["per_class"] = per_class
    return results


def _category_tables(categories: Sequence[Mapping[str, Any]], where: str) -> tuple[list[int], np.ndarray, dict]:
    ids, isthing = [], []
    for i, category in enumerate(categories):
        if "id" not in category or "isthing" not in category:
            raise ValueError(f"{where}: category entry {i} needs 'id' and 'isthing' keys, got {category}")
        ids.append(int(category["id"]))
        isthing.append(bool(category["isthing"]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: category ids are not unique")
    return ids, np.array(isthing, dtype=bool), {c: row for row, c in enumerate(ids)}


def _read_id_png(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: panoptic PNG {path} does not exist")
    with Image.open(path) as image:
        if image.mode != "RGB":
            raise ValueError(f"{what}: panoptic PNG {path} has mode {image.mode}, expected RGB")
        return rgb2id(np.asarray(image))


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} JSON file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} JSON file {path} is not valid JSON: {e}") from None
    if "annotations" not in data:
        raise ValueError(f"{what} JSON file {path} has no 'annotations' key")
    return data


def _check_annotation(annotation: Mapping[str, Any], path: Path) -> None:
    missing = {"image_id", "file_name", "segments_info"} - set(annotation)
    if missing:
        raise ValueError(f"{path}: annotation of image {annotation.get('image_id', '?')!r} lacks {sorted(missing)}")


def pq_compute(
    gt_json_file: str | os.PathLike,
    pred_json_file: str | os.PathLike,
    gt_folder: str | os.PathLike | None = None,
    pred_folder: str | os.PathLike | None = None,
    *,
    num_workers: int = 0,
) -> dict[str, Any]:
    """PQ of COCO-format panoptic predictions, with ``panopticapi.evaluation.pq_compute``'s signature and result.

    Args:
        gt_json_file: COCO panoptic JSON with ``categories`` (``id``, ``isthing``) and ``annotations``
            (``image_id``, ``file_name``, ``segments_info``).
        pred_json_file: JSON whose ``annotations`` cover every ground-truth ``image_id``.
        gt_folder, pred_folder: PNG folders; default: the JSON path without its extension.
        num_workers: threads reading PNGs (0: read in this thread).

    Returns:
        ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {"pq", "sq", "rq"}}}``
        as fractions; a group with ``n == 0`` has NaN values.
    """
    gt_json_file, pred_json_file = Path(gt_json_file), Path(pred_json_file)
    gt_folder = Path(gt_folder) if gt_folder is not None else gt_json_file.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder is not None else pred_json_file.with_suffix("")
    gt_json = _load_json(gt_json_file, "ground-truth")
    pred_json = _load_json(pred_json_file, "prediction")
    if "categories" not in gt_json:
        raise ValueError(f"ground-truth JSON file {gt_json_file} has no 'categories' key")
    category_ids, isthing, category_index = _category_tables(gt_json["categories"], str(gt_json_file))
    for kind, folder in (("ground-truth", gt_folder), ("prediction", pred_folder)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{kind} PNG folder {folder} does not exist")

    predictions: dict[Any, dict] = {}
    for annotation in pred_json["annotations"]:
        _check_annotation(annotation, pred_json_file)
        if annotation["image_id"] in predictions:
            raise ValueError(f"{pred_json_file}: image_id {annotation['image_id']!r} appears twice")
        predictions[annotation["image_id"]] = annotation
    pairs = []
    for gt_annotation in gt_json["annotations"]:
        _check_annotation(gt_annotation, gt_json_file)
        image_id = gt_annotation["image_id"]
        if image_id not in predictions:
            raise ValueError(f"{pred_json_file} has no prediction for image_id {image_id!r}")
        pairs.append((gt_annotation, predictions[image_id]))

    def image_stats(pair: tuple[dict, dict]) -> np.ndarray:
        gt_annotation, pred_annotation = pair
        image = repr(gt_annotation["image_id"])
        gt_ids = _read_id_png(gt_folder / gt_annotation["file_name"], f"image {image} ground truth")
        pred_ids = _read_id_png(pred_folder / pred_annotation["file_name"], f"image {image} prediction")
        return panoptic_image_stats(
            gt_ids, gt_annotation["segments_info"], pred_ids, pred_annotation["segments_info"], category_index, image
        )

    stats = np.zeros((len(category_ids), 4), dtype=np.float64)
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            for s in pool.map(image_stats, pairs):
                stats += s
    else:
        for pair in pairs:
            stats += image_stats(pair)

    results = _summarise(stats, category_ids, isthing)
    logger.info("PQ on %d images\n%s", len(pairs), format_pq_table(results))
    return results


def format_pq_table(results: Mapping[str, Any]) -> str:
    """A small text table of a :func:`pq_compute` result (percent)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)


class PanopticEvaluator:
    """In-memory PQ for evaluation during training; same rules and core as :func:`pq_compute`.

    Args:
        categories: ``[{"id", "isthing", "name" (optional)}]``; ``category_id`` values given to :meth:`update`
            refer to these ids.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        self.category_ids, self.isthing, self.category_index = _category_tables(categories, "PanopticEvaluator")
        self.names = [str(c.get("name", c["id"])) for c in categories]
        self.reset()

    def reset(self) -> None:
        self.stats = np.zeros((len(self.category_ids), 4), dtype=np.float64)
        self.num_images = 0

    def update(
        self,
        pred_seg: ArrayLike,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_seg: ArrayLike,
        gt_segments: Sequence[Mapping[str, Any]],
        image_id: Any = None,
    ) -> None:
        """Add one image.

        Args:
            pred_seg: ``[H, W]`` predicted segment ids (0 = VOID), numpy or torch.
            pred_segments: ``[{"id", "category_id"}]`` for every non-zero id in ``pred_seg``.
            gt_seg: ``[H, W]`` ground-truth segment ids (0 = VOID).
            gt_segments: ``[{"id", "category_id", "iscrowd" (optional)}]`` for every non-zero id in ``gt_seg``.
            image_id: only used to name the image in error messages.
        """
        image = repr(image_id if image_id is not None else f"#{self.num_images}")
        self.stats += panoptic_image_stats(
            _as_id_map(gt_seg, f"image {image} gt_seg"),
            gt_segments,
            _as_id_map(pred_seg, f"image {image} pred_seg"),
            pred_segments,
            self.category_index,
            image,
        )
        self.num_images += 1

    def compute(self) -> dict[str, float]:
        """``PQ, SQ, RQ`` (all), ``*_th`` (things), ``*_st`` (stuff) and ``PQ-<name>`` etc. per class, in percent.

        Statistics are summed over all ranks first. Per-class values are NaN for categories that appear in
        neither the ground truth nor the predictions.
        """
        stats = sum_across_ranks(torch.from_numpy(self.stats)).numpy()
        summary = _summarise(stats, self.category_ids, self.isthing)
        results: dict[str, float] = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("pq", "sq", "rq"):
                results[f"{metric.upper()}{suffix}"] = 100 * summary[group][metric]
        present = stats[:, _TP] + stats[:, _FP] + stats[:, _FN] > 0
        for row, (category_id, name) in enumerate(zip(self.category_ids, self.names)):
            for metric in ("pq", "sq", "rq"):
                value = summary["per_class"][category_id][metric] if present[row] else float("nan")
                results[f"{metric.upper()}-{name}"] = 100 * value
        return results


class PanopticPredictionWriter:
    """Writes panoptic predictions in COCO format, readable by :func:`pq_compute` and the official panopticapi.

    PNGs go to ``output_dir/name/`` and the JSON to ``output_dir/name.json`` (pq_compute's default folder).
    Every rank writes its own PNGs; :meth:`write_json` gathers the annotations and the main process writes them.

    Args:
        output_dir: where to write.
        name: stem of the JSON file and of the PNG folder.
        category_map: model (contiguous) category id -> dataset category id; None keeps ids as they are.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        name: str = "panoptic_predictions",
        category_map: Mapping[int, int] | None = None,
    ) -> None:
        self.json_file = Path(output_dir) / f"{name}.json"
        self.png_folder = Path(output_dir) / name
        self.png_folder.mkdir(parents=True, exist_ok=True)
        self.category_map = None if category_map is None else {int(k): int(v) for k, v in category_map.items()}
        self.annotations: list[dict[str, Any]] = []
        self._image_ids: set = set()

    def add(
        self,
        image_id: int | str,
        panoptic_seg: ArrayLike,
        segments_info: Sequence[Mapping[str, Any]],
        file_name: str | None = None,
    ) -> None:
        """Save one image's prediction.

        Args:
            image_id: the ground-truth ``image_id``.
            panoptic_seg: ``[H, W]`` segment ids (0 = VOID).
            segments_info: ``[{"id", "category_id", ...}]`` with model category ids.
            file_name: PNG name; default ``f"{image_id}.png"``.
        """
        if image_id in self._image_ids:
            raise ValueError(f"PanopticPredictionWriter: image_id {image_id!r} was already added")
        ids = _as_id_map(panoptic_seg, f"image {image_id!r} panoptic_seg")
        segments = []
        for segment in segments_info:
            category_id = int(segment["category_id"])
            if self.category_map is not None:
                if category_id not in self.category_map:
                    raise ValueError(
                        f"image {image_id!r}: segment {segment['id']} has category_id {category_id}, "
                        f"which category_map does not map to a dataset category"
                    )
                category_id = self.category_map[category_id]
            segments.append({"id": int(segment["id"]), "category_id": category_id})
        present = set(np.unique(ids).tolist()) - {VOID}
        listed = {s["id"] for s in segments}
        if present != listed:
            raise ValueError(
                f"image {image_id!r}: ids only in panoptic_seg {sorted(present - listed)[:10]}, "
                f"ids only in segments_info {sorted(listed - present)[:10]}"
            )
        file_name = file_name if file_name is not None else f"{image_id}.png"
        Image.fromarray(id2rgb(ids)).save(self.png_folder / file_name)
        self.annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
        self._image_ids.add(image_id)

    def write_json(self) -> Path:
        """Gather the annotations of every rank and write ``name.json`` on the main process; returns its path."""
        annotations = [a for rank_annotations in all_gather_objects(self.annotations) for a in rank_annotations]
        if is_main_process():
            with open(self.json_file, "w") as f:
                json.dump({"annotations": annotations}, f)
        return self.json_file
