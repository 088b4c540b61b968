"""pq_compute and PanopticEvaluator against the official panopticapi on COCO-format files, plus hand-built cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import panopticapi.evaluation
import panopticapi.utils
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from maskformer.evaluation import PanopticEvaluator, PanopticPredictionWriter, id2rgb, pq_compute, rgb2id

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 7, "name": "dog", "isthing": 1},
    {"id": 20, "name": "sky", "isthing": 0},
    {"id": 21, "name": "grass", "isthing": 0},
    {"id": 25, "name": "wall", "isthing": 0},  # never used: must be left out of the averages
]
THINGS = [1, 3, 7]
STUFF = [20, 21]
H, W = 36, 48


def save_png(path: Path, ids: np.ndarray) -> None:
    """Written with plain numpy so that the test data does not depend on the code under test."""
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def present_segments(ids: np.ndarray, info: dict[int, dict]) -> list[dict]:
    """segments_info restricted to the ids left in the map, with COCO's area field."""
    segments = []
    for segment_id, area in zip(*np.unique(ids, return_counts=True)):
        if segment_id != 0:
            segments.append({**info[int(segment_id)], "id": int(segment_id), "area": int(area)})
    return segments


def random_box(rng, min_size=4, max_size=20):
    h, w = rng.integers(min_size, max_size, size=2)
    y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
    return slice(y, y + h), slice(x, x + w)


def make_image(rng: np.random.Generator, large_ids: bool):
    """One ground-truth / prediction pair: id maps and segments_info lists."""
    # Large ids use all three PNG channels, as COCO's do.
    new_id = iter(np.unique(rng.integers(1, 2**24, size=200)) if large_ids else range(1, 200))
    gt = np.zeros((H, W), dtype=np.int64)
    gt_info: dict[int, dict] = {}
    split = rng.integers(8, H - 8)
    for rows, category in ((slice(0, split), STUFF[0]), (slice(split, H), STUFF[1])):
        segment_id = int(next(new_id))
        gt[rows] = segment_id
        gt_info[segment_id] = {"category_id": category, "iscrowd": 0}
    for _ in range(rng.integers(3, 7)):
        segment_id = int(next(new_id))
        gt[random_box(rng)] = segment_id
        gt_info[segment_id] = {"category_id": int(rng.choice(THINGS)), "iscrowd": int(rng.random() < 0.3)}
    gt[random_box(rng, 3, 10)] = 0  # VOID block
    gt[rng.random((H, W)) < 0.03] = 0  # scattered VOID pixels

    # Prediction: the ground truth relabelled, shifted, partly recategorised, merged and overpainted.
    pred = np.zeros((H, W), dtype=np.int64)
    pred_info: dict[int, dict] = {}
    source = np.roll(gt, shift=tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    for gt_id, info in gt_info.items():
        segment_id = int(next(new_id))
        category = info["category_id"]
        if rng.random() < 0.15:
            category = int(rng.choice(THINGS + STUFF))
        pred[source == gt_id] = segment_id
        pred_info[segment_id] = {"category_id": category}
    for _ in range(rng.integers(1, 5)):
        segment_id = int(next(new_id))
        pred[random_box(rng, 3, 16)] = segment_id
        pred_info[segment_id] = {"category_id": int(rng.choice(THINGS + STUFF))}
    crowd = [i for i, info in gt_info.items() if info["iscrowd"] and (gt == i).any()]
    if crowd:  # a prediction mostly inside a crowd region of the same category
        region = np.argwhere(gt == crowd[0])
        segment_id = int(next(new_id))
        pred[tuple(region[: max(1, len(region) // 2)].T)] = segment_id
        pred_info[segment_id] = {"category_id": gt_info[crowd[0]]["category_id"]}
    pred[random_box(rng, 2, 6)] = 0
    # segments_info order is arbitrary in COCO files, so do not hand it over sorted by id.
    gt_segments, pred_segments = present_segments(gt, gt_info), present_segments(pred, pred_info)
    gt_segments = [gt_segments[i] for i in rng.permutation(len(gt_segments))]
    pred_segments = [pred_segments[i] for i in rng.permutation(len(pred_segments))]
    return gt, gt_segments, pred, pred_segments


def write_dataset(root: Path, images: list, annotate_pred=True) -> tuple[Path, Path]:
    """COCO panoptic layout: gt.json + gt/*.png and pred.json + pred/*.png."""
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    gt_annotations, pred_annotations = [], []
    for image_id, (gt, gt_segments, pred, pred_segments) in enumerate(images, start=100):
        name = f"{image_id:012d}.png"
        save_png(root / "gt" / name, gt)
        save_png(root / "pred" / name, pred)
        gt_annotations.append({"image_id": image_id, "file_name": name, "segments_info": gt_segments})
        pred_annotations.append({"image_id": image_id, "file_name": name, "segments_info": pred_segments})
    gt_json = {"images": [{"id": a["image_id"]} for a in gt_annotations], "categories": CATEGORIES,
               "annotations": gt_annotations}
    (root / "gt.json").write_text(json.dumps(gt_json))
    (root / "pred.json").write_text(json.dumps({"annotations": pred_annotations}))
    return root / "gt.json", root / "pred.json"


def assert_same_results(ours: dict, official: dict) -> None:
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == official[group]["n"]
        for metric in ("pq", "sq", "rq"):
            assert ours[group][metric] == pytest.approx(official[group][metric], abs=1e-9, rel=0)
    assert set(ours["per_class"]) == set(official["per_class"])
    for category_id, values in official["per_class"].items():
        for metric in ("pq", "sq", "rq"):
            assert ours["per_class"][category_id][metric] == pytest.approx(values[metric], abs=1e-9, rel=0)


def two_crowds_of_one_category():
    """Two car crowd regions: the official code only looks at the last one when excusing predictions."""
    gt = np.full((H, W), 1, dtype=np.int64)
    gt[:10, :10] = 2
    gt[20:30, 20:30] = 3
    gt_segments = present_segments(gt, {1: {"category_id": 20, "iscrowd": 0}, 2: {"category_id": 3, "iscrowd": 1},
                                        3: {"category_id": 3, "iscrowd": 1}})
    pred = np.full((H, W), 4, dtype=np.int64)
    pred[:8, :8] = 5  # inside the first crowd only: a false positive for the official code
    pred_segments = present_segments(pred, {4: {"category_id": 20}, 5: {"category_id": 3}})
    return gt, gt_segments, pred, pred_segments


@pytest.fixture(scope="module")
def random_images():
    rng = np.random.default_rng(0)
    return [make_image(rng, large_ids=i % 2 == 0) for i in range(8)] + [two_crowds_of_one_category()]


def test_pq_compute_equals_official_panopticapi(tmp_path, random_images):
    gt_json, pred_json = write_dataset(tmp_path, random_images)
    ours = pq_compute(str(gt_json), str(pred_json))  # default folders: the JSON paths without ".json"
    official = panopticapi.evaluation.pq_compute(str(gt_json), str(pred_json))
    assert_same_results(ours, official)
    assert ours["Things"]["n"] == 3 and ours["Stuff"]["n"] >= 2  # both groups exercised
    assert 0.05 < ours["All"]["pq"] < 0.95  # neither trivial nor hopeless
    # The crowd rule matters on this data: without iscrowd flags the official numbers move.
    no_crowd = [(g, [{**s, "iscrowd": 0} for s in gs], p, ps) for g, gs, p, ps in random_images]
    gt_json2, pred_json2 = write_dataset(tmp_path / "no_crowd", no_crowd)
    official_no_crowd = panopticapi.evaluation.pq_compute(str(gt_json2), str(pred_json2))
    assert official_no_crowd["All"]["pq"] != pytest.approx(official["All"]["pq"], abs=1e-6)
    assert_same_results(pq_compute(gt_json2, pred_json2, num_workers=2), official_no_crowd)


def test_panoptic_evaluator_equals_pq_compute(tmp_path, random_images):
    gt_json, pred_json = write_dataset(tmp_path, random_images)
    reference = pq_compute(gt_json, pred_json)
    evaluator = PanopticEvaluator(CATEGORIES)
    for gt, gt_segments, pred, pred_segments in random_images:
        evaluator.update(torch.from_numpy(pred), pred_segments, gt, gt_segments)
    results = evaluator.compute()
    for key, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for metric in ("pq", "sq", "rq"):
            assert results[metric.upper() + key] == pytest.approx(100 * reference[group][metric], abs=1e-7)
    for category in CATEGORIES:
        values = reference["per_class"][category["id"]]
        if category["id"] == 25:
            assert math.isnan(results["PQ-wall"])
        else:
            assert results[f"PQ-{category['name']}"] == pytest.approx(100 * values["pq"], abs=1e-7)
            assert results[f"SQ-{category['name']}"] == pytest.approx(100 * values["sq"], abs=1e-7)
    evaluator.reset()
    assert math.isnan(evaluator.compute()["PQ"])


def test_writer_output_is_read_by_official_and_ours(tmp_path, random_images):
    gt_json, _ = write_dataset(tmp_path / "data", random_images)
    # The model speaks contiguous ids 0..5; the writer maps them back to the dataset ids.
    to_contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    writer = PanopticPredictionWriter(tmp_path / "out", category_map={i: c for c, i in to_contiguous.items()})
    for image_id, (_, _, pred, pred_segments) in enumerate(random_images, start=100):
        model_segments = [{"id": s["id"], "category_id": to_contiguous[s["category_id"]], "isthing": True}
                          for s in pred_segments]
        writer.add(image_id, torch.from_numpy(pred).int(), model_segments, file_name=f"{image_id:012d}.png")
    pred_json = writer.write_json()
    assert pred_json == tmp_path / "out" / "panoptic_predictions.json"
    official = panopticapi.evaluation.pq_compute(str(gt_json), str(pred_json))
    assert_same_results(pq_compute(gt_json, pred_json), official)
    assert_same_results(pq_compute(gt_json, tmp_path / "data" / "pred.json", pred_folder=tmp_path / "data" / "pred"),
                        official)

    with pytest.raises(ValueError, match="category_map"):
        writer.add(1, np.ones((2, 2), dtype=np.int32), [{"id": 1, "category_id": 99}])
    with pytest.raises(ValueError, match="only in segments_info"):
        writer.add(2, np.ones((2, 2), dtype=np.int32), [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 0}])
    with pytest.raises(ValueError, match="already added"):
        writer.add(100, np.ones((2, 2), dtype=np.int32), [{"id": 1, "category_id": 0}])


def test_rgb_id_helpers_agree_with_panopticapi():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 2**24, size=(7, 9))
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
    assert np.array_equal(rgb, panopticapi.utils.id2rgb(ids))
    assert np.array_equal(rgb2id(rgb), ids)
    assert np.array_equal(rgb2id(rgb), panopticapi.utils.rgb2id(rgb))
    with pytest.raises(ValueError, match="RGB PNG"):
        id2rgb(np.array([2**24]))


def hand_case(pred_segments: list[dict], pred: np.ndarray) -> dict:
    """4x4 image: thing 1 (cat 1) = top-left 2x2, crowd 2 (cat 3) = top-right 2x2, stuff 3 (cat 20) = row 2,
    VOID = row 3."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3], [0, 0, 0, 0]])
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 3, "iscrowd": 1},
                   {"id": 3, "category_id": 20, "iscrowd": 0}]
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update(pred, pred_segments, gt, gt_segments)
    return evaluator.compute()


def test_iou_of_exactly_one_half_is_not_a_match():
    # Prediction covers 2 of the 4 person pixels (IoU 2/4) and exactly the stuff row (IoU 1).
    pred = np.array([[5, 5, 0, 0], [0, 0, 0, 0], [6, 6, 6, 6], [0, 0, 0, 0]])
    results = hand_case([{"id": 5, "category_id": 1}, {"id": 6, "category_id": 20}], pred)
    assert results["PQ-person"] == 0.0 and results["RQ-person"] == 0.0  # one FN and one FP
    assert results["PQ-sky"] == 100.0
    # 3 of 4 pixels: IoU 0.75 matches.
    pred[1, 0] = 5
    results = hand_case([{"id": 5, "category_id": 1}, {"id": 6, "category_id": 20}], pred)
    assert results["PQ-person"] == pytest.approx(75.0) and results["SQ-person"] == pytest.approx(75.0)


def test_predicted_pixels_on_void_leave_the_union():
    # 3 person pixels + 2 VOID pixels: IoU 3 / (4 + 5 - 3 - 2) = 0.75, a match; were the VOID pixels in the
    # union it would be 3 / 6, not a match.
    pred = np.array([[5, 5, 0, 0], [5, 0, 0, 0], [6, 6, 6, 6], [5, 5, 0, 0]])
    results = hand_case([{"id": 5, "category_id": 1}, {"id": 6, "category_id": 20}], pred)
    assert results["PQ-person"] == pytest.approx(75.0)


def test_prediction_inside_crowd_or_void_is_not_a_false_positive():
    segments = [{"id": 6, "category_id": 20}, {"id": 7, "category_id": 3}, {"id": 8, "category_id": 7}]
    # Segment 7 (car): 3 px on the car crowd + 1 px on sky -> ignored.
    # Segment 8 (dog): 3 px on VOID + 1 px on the car crowd -> ignored.
    pred = np.array([[0, 0, 7, 7], [0, 0, 7, 8], [6, 6, 6, 7], [8, 8, 8, 6]])
    results = hand_case(segments, pred)
    assert math.isnan(results["PQ-car"]) and math.isnan(results["PQ-dog"])  # no TP, FP or FN at all
    # The same pixels called "dog" are not covered by a dog crowd: now a false positive for dog.
    segments[1] = {"id": 7, "category_id": 7}
    results = hand_case(segments, pred)
    assert results["RQ-dog"] == 0.0
    assert results["PQ_th"] == 0.0  # person FN and dog FP, no true positive among things


def test_bad_inputs_raise_clear_errors(tmp_path, random_images):
    gt_json, pred_json = write_dataset(tmp_path, random_images[:2])
    pred_data = json.loads(pred_json.read_text())

    def run_with(data):
        pred_json.write_text(json.dumps(data))
        return pq_compute(gt_json, pred_json)

    segments = pred_data["annotations"][0]["segments_info"]
    with pytest.raises(ValueError, match="in the PNG/id map but not in segments_info"):
        run_with({"annotations": [{**pred_data["annotations"][0], "segments_info": segments[1:]},
                                  pred_data["annotations"][1]]})
    with pytest.raises(ValueError, match=r"\[12345\] are in segments_info but not in the PNG"):
        run_with({"annotations": [{**pred_data["annotations"][0],
                                   "segments_info": segments + [{"id": 12345, "category_id": 1}]},
                                  pred_data["annotations"][1]]})
    with pytest.raises(ValueError, match="unknown category_id 99"):
        run_with({"annotations": [{**pred_data["annotations"][0],
                                   "segments_info": [{**segments[0], "category_id": 99}] + segments[1:]},
                                  pred_data["annotations"][1]]})
    with pytest.raises(ValueError, match="no prediction for image_id 101"):
        run_with({"annotations": pred_data["annotations"][:1]})
    (tmp_path / "pred" / pred_data["annotations"][1]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_with(pred_data)
    with pytest.raises(ValueError, match="ground truth is"):
        PanopticEvaluator(CATEGORIES).update(np.zeros((2, 3), dtype=int), [], np.zeros((3, 2), dtype=int), [])


def _distributed_worker(rank: int, init_file: str, images: list, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        evaluator = PanopticEvaluator(CATEGORIES)
        for gt, gt_segments, pred, pred_segments in images[rank::2]:
            evaluator.update(pred, pred_segments, gt, gt_segments)
        out[rank] = evaluator.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_panoptic_evaluator_sums_statistics_over_ranks(tmp_path, random_images):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), random_images, out), nprocs=2)
        per_rank = dict(out)
    single = PanopticEvaluator(CATEGORIES)
    for gt, gt_segments, pred, pred_segments in random_images:
        single.update(pred, pred_segments, gt, gt_segments)
    expected = single.compute()
    for rank in (0, 1):
        assert per_rank[rank] == pytest.approx(expected, nan_ok=True, abs=1e-9)
