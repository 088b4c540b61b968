"""Shapes dataset determinism, seeded/resumable/sharded loaders and the collator."""

import numpy as np
import pytest
import torch

from maskformer.config import config_from_dict
from maskformer.data import (
    InferenceSampler,
    SegmentationCollator,
    TrainingSampler,
    build_dataset,
    build_test_loader,
    build_train_loader,
    load_records,
)
from maskformer.data.shapes import SHAPES_THINGS, generate_shapes_image, shapes_records, shapes_root


def _cfg(tmp_path, workers=0, **extra):
    data = {
        "train": {"name": "shapes", "root": str(tmp_path), "options": {"num_images": 12, "image_size": 64}},
        "test": {"name": "shapes", "root": str(tmp_path), "split": "val", "options": {"num_images": 5, "image_size": 64}},
        "min_size_train": [48, 64, 80],
        "max_size_train": 200,
        "crop_size": [56, 56],
        "num_workers": workers,
        "min_size_test": 64,
        "max_size_test": 200,
    }
    data.update(extra)
    return config_from_dict({"model": {"num_classes": 7}, "data": data, "solver": {"ims_per_batch": 4}, "train": {"seed": 3}})


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return (
        torch.equal(a["images"], b["images"])
        and torch.equal(a["sem_seg"], b["sem_seg"])
        and [s["file_name"] for s in a["samples"]] == [s["file_name"] for s in b["samples"]]
        and all(torch.equal(x["masks"], y["masks"]) for x, y in zip(a["targets"], b["targets"]))
    )


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------


def test_shapes_generation_is_deterministic_per_index():
    a = generate_shapes_image(0, "train", 3)
    b = generate_shapes_image(0, "train", 3)
    c = generate_shapes_image(0, "train", 4)
    d = generate_shapes_image(0, "val", 3)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def test_shapes_content():
    sizes, thing_colors = [], {c: [] for c in range(3, 7)}
    for i in range(40):
        image, sem, pan, segs = generate_shapes_image(1, "train", i, image_size=128)
        assert pan.min() >= 1 and sorted(np.unique(pan).tolist()) == [s["id"] for s in segs]
        things = [s for s in segs if s["isthing"]]
        assert 2 <= len(things) <= 5 and any(not s["isthing"] for s in segs)
        for s in segs:
            region = pan == s["id"]
            assert (sem[region] == s["category_id"]).all() and s["area"] == region.sum()
            assert bool(s["isthing"]) == SHAPES_THINGS[s["category_id"]]
            if s["isthing"]:
                sizes.append(s["area"])
                thing_colors[s["category_id"]].append(image[region].mean(0))
    assert min(sizes) >= 140  # no pathological slivers (>= ~12x12 px at 128x128)
    for c, colors in thing_colors.items():  # classes are not told apart by a fixed colour
        assert np.std(np.array(colors), axis=0).mean() > 30, c


def test_shapes_subset_of_thing_shapes(tmp_path):
    from maskformer.data import build_dataset, get_metadata

    options = {"num_images": 6, "image_size": 64, "things": ["circle", "cross"]}
    cfg = config_from_dict({"model": {"num_classes": 5}, "data": {
        "train": {"name": "shapes", "root": str(tmp_path), "options": options},
        "test": {"name": "shapes", "root": str(tmp_path), "split": "val", "options": options}}})
    meta = get_metadata(cfg, "train")
    assert meta.class_names == ["sky", "grass", "floor", "circle", "cross"]
    assert meta.is_thing == [False, False, False, True, True]
    sample = build_dataset(cfg, "test")[0]
    assert {s["category_id"] for s in sample["segments_info"]} <= set(range(5))
    labels = set()
    for index in range(6):
        _, semantic, _, segments = generate_shapes_image(0, "val", index, 64, (2, 5), ("circle", "cross"))
        labels |= {s["category_id"] for s in segments if s["isthing"]}
        assert semantic.max() <= 4
    assert labels == {3, 4}
    with pytest.raises(ValueError, match="things must be distinct names"):
        shapes_records(str(tmp_path), "val", things=["circle", "hexagon"])


def test_shapes_cache_written_once_and_reused(tmp_path):
    records = load_records("shapes", str(tmp_path), "val", {"num_images": 3, "image_size": 48})
    root = shapes_root(tmp_path, "val", 48, 3, 0, (2, 5))
    assert root.is_dir() and len(records) == 3 and records[0]["file_name"].startswith(str(root))
    stamp = (root / "panoptic" / "val.json").stat().st_mtime_ns
    again = load_records("shapes", str(tmp_path), "val", {"num_images": 3, "image_size": 48})
    assert again == records and (root / "panoptic" / "val.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    other = load_records("shapes", str(tmp_path), "val", {"num_images": 3, "image_size": 48, "seed": 1})
    assert other[0]["file_name"] != records[0]["file_name"]


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def test_train_loader_deterministic_across_worker_counts(tmp_path):
    ref = _batches(build_train_loader(_cfg(tmp_path, workers=0)), 4)
    again = _batches(build_train_loader(_cfg(tmp_path, workers=0)), 4)
    with_workers = _batches(build_train_loader(_cfg(tmp_path, workers=2)), 4)
    assert all(_same(a, b) for a, b in zip(ref, again))
    assert all(_same(a, b) for a, b in zip(ref, with_workers))
    assert not _same(ref[0], ref[1])
    other = _cfg(tmp_path)
    other.train.seed = 4
    other_seed = _batches(build_train_loader(other), 1)
    assert not _same(ref[0], other_seed[0])


def test_train_loader_resume_is_exact(tmp_path):
    cfg = _cfg(tmp_path)
    full = _batches(build_train_loader(cfg), 6)  # 24 samples: crosses two passes over 12 images
    resumed = _batches(build_train_loader(cfg, start_iter=4), 2)
    assert _same(full[4], resumed[0]) and _same(full[5], resumed[1])
    # Each pass visits every image once.
    names = [s["file_name"] for b in full[:3] for s in b["samples"]]
    assert len(set(names)) == 12


def test_ddp_shards_are_disjoint_and_cover_the_stream(tmp_path):
    cfg = _cfg(tmp_path)
    rank0 = _batches(build_train_loader(cfg, rank=0, world_size=2), 3)
    rank1 = _batches(build_train_loader(cfg, rank=1, world_size=2), 3)
    assert rank0[0]["images"].shape[0] == 2  # per-rank batch = 4 // 2
    names0 = [s["file_name"] for b in rank0 for s in b["samples"]]
    names1 = [s["file_name"] for b in rank1 for s in b["samples"]]
    assert len(set(names0) | set(names1)) == 12 and not set(names0) & set(names1)
    # Same keys as the single-process stream, interleaved.
    single = list(_take(TrainingSampler(12, seed=3), 12))
    r0 = list(_take(TrainingSampler(12, seed=3, rank=0, world_size=2), 6))
    r1 = list(_take(TrainingSampler(12, seed=3, rank=1, world_size=2), 6))
    assert single[0::2] == r0 and single[1::2] == r1
    with pytest.raises(ValueError, match="must be divisible"):
        build_train_loader(cfg, rank=0, world_size=3)


def _take(it, n):
    it = iter(it)
    return [next(it) for _ in range(n)]


def test_training_sampler_reshuffles_every_pass():
    keys = _take(TrainingSampler(10, seed=0), 30)
    passes = [[k[0] for k in keys[i : i + 10]] for i in (0, 10, 20)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    assert len({k[1] for k in keys}) == 30  # every position has its own augmentation seed


def test_inference_sampler_splits_without_duplicates():
    shards = [list(InferenceSampler(7, r, 3)) for r in range(3)]
    assert sum(shards, []) == list(range(7)) and [len(s) for s in shards] == [2, 2, 3]


def test_test_loader_batches_and_max_images(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.test.max_images = 3
    cfg.test.ims_per_batch = 2
    batches = list(build_test_loader(cfg))
    assert [len(b["samples"]) for b in batches] == [2, 1]
    s = batches[0]["samples"][0]
    assert s["gt_sem_seg"].shape == (64, 64) and s["gt_pan_seg"].shape == (64, 64) and s["segments_info"]
    assert batches[0]["images"].shape == (2, 3, 64, 64)
    shard = list(build_test_loader(cfg, rank=1, world_size=2))
    assert [b["samples"][0]["image_id"] for b in shard] == ["val_000001"]


def test_dataset_getitem_shapes(tmp_path):
    ds = build_dataset(_cfg(tmp_path, mapper="panoptic"), "train")
    s = ds[0]
    assert s["image"].shape == (3, 56, 56) and s["image"].dtype == torch.uint8
    assert s["masks"].dtype == torch.bool and s["masks"].shape[1:] == (56, 56)
    assert s["labels"].dtype == torch.int64 and s["orig_size"] == (64, 64)
    assert torch.equal(ds[0]["image"], s["image"])  # dataset[i] is reproducible on its own


# ------------------------------------------------------------------------------------------------
# Collator
# ------------------------------------------------------------------------------------------------


def _sample(h, w, value, n):
    return {
        "image": torch.full((3, h, w), value, dtype=torch.uint8),
        "image_size": (h, w),
        "orig_size": (h * 2, w * 2),
        "labels": torch.arange(n),
        "masks": torch.ones(n, h, w, dtype=torch.bool),
        "sem_seg": torch.zeros(h, w, dtype=torch.int64),
        "file_name": f"{h}.png",
        "image_id": h,
    }


def test_collator_normalises_then_zero_pads():
    collate = SegmentationCollator([100.0, 50.0, 0.0], [2.0, 5.0, 10.0], size_divisibility=32, ignore_label=255)
    batch = collate([_sample(20, 40, 110, 2), _sample(33, 10, 0, 0)])
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert torch.allclose(batch["images"][0, :, 0, 0], torch.tensor([5.0, 12.0, 11.0]))
    assert (batch["images"][0, :, 20:, :] == 0).all() and (batch["images"][0, :, :, 40:] == 0).all()
    assert torch.allclose(batch["images"][1, :, 32, 9], torch.tensor([-50.0, -10.0, 0.0]))
    t0, t1 = batch["targets"]
    assert t0["masks"].shape == (2, 64, 64) and t0["masks"].dtype == torch.float32
    assert t0["masks"][:, :20, :40].eq(1).all() and t0["masks"].sum() == 2 * 20 * 40
    assert t1["labels"].shape == (0,) and t1["masks"].shape == (0, 64, 64)
    assert (batch["sem_seg"][0, :20, :40] == 0).all() and (batch["sem_seg"][0, 20:] == 255).all()
    assert batch["image_sizes"] == [(20, 40), (33, 10)] and batch["orig_sizes"] == [(40, 80), (66, 20)]
    assert batch["samples"] == [{"file_name": "20.png", "image_id": 20}, {"file_name": "33.png", "image_id": 33}]
    assert batch["num_skipped"] == 0


def test_collator_without_divisibility_pads_to_batch_max():
    collate = SegmentationCollator([0.0] * 3, [1.0] * 3, size_divisibility=0, ignore_label=7)
    batch = collate([_sample(5, 9, 1, 1), _sample(6, 4, 1, 1)])
    assert batch["images"].shape == (2, 3, 6, 9) and batch["sem_seg"][1, :, 4:].eq(7).all()
