"""Datasets of samples ready for the model: reading + the original's training/test mappers.

``build_dataset(cfg, "train" | "test")`` returns a :class:`SegmentationDataset`. A training sample is::

    {"image": uint8 [3,H,W] (augmented, padded to the crop size when data.pad_to_crop),
     "image_size": (h, w)       # valid region before padding
     "orig_size": (H0, W0)      # the file on disk
     "labels": int64 [N], "masks": bool [N,H,W],
     "sem_seg": int64 [H,W]     # ignore_label where unlabeled / padded / crowd
     "file_name": str, "image_id": str | int}

A test sample is resized (shortest edge ``min_size_test``, long side <= ``max_size_test``), never
padded nor augmented, and adds ``"gt_sem_seg"`` int64 ``[H0,W0]`` and, for panoptic data,
``"gt_pan_seg"`` int64 ``[H0,W0]`` (segment ids, 0 = void) and ``"segments_info"``.

Semantic targets are one mask per class present; panoptic targets one mask per non-crowd segment
still visible after augmentation. For panoptic records the semantic map is always derived from the
segments (crowd and void -> ignore).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from maskformer.data.catalog import load_metadata, load_records
from maskformer.data.formats import load_panoptic
from maskformer.data.io import DatasetError, check_label_values, read_image, read_label
from maskformer.data.metadata import DatasetMetadata
from maskformer.data.targets import panoptic_targets, semantic_from_panoptic, semantic_targets
from maskformer.data.transforms import (
    ColorAugSSD,
    Compose,
    DetrPanopticAugmentation,
    PadTo,
    RandomCropCategoryAreaConstraint,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    resize_shortest_edge_shape,
)

__all__ = [
    "SegmentationDataset",
    "TrainMapper",
    "TestMapper",
    "read_sample",
    "build_dataset",
    "get_metadata",
    "build_train_augmentation",
]


def read_sample(record: dict, metadata: DatasetMetadata) -> dict:
    """Read and validate one record: ``{"image": uint8 [H,W,3], "sem_seg": int64 [H,W], "pan_seg"?: int64 [H,W],
    "segments_info"?: list}``. Raises :class:`DatasetError` naming the file at fault."""
    image = read_image(record["file_name"])
    h, w = image.shape[:2]
    out: dict[str, Any] = {"image": image}
    if "pan_seg_file_name" in record:
        pan, segments = load_panoptic(record, metadata)
        if pan.shape != (h, w):
            raise DatasetError(
                record["pan_seg_file_name"],
                f"panoptic PNG is {pan.shape[1]}x{pan.shape[0]} but its image {record['file_name']} is {w}x{h} (WxH)",
            )
        bad = [s["category_id"] for s in segments if not 0 <= s["category_id"] < metadata.num_classes]
        if bad:
            raise DatasetError(record["pan_seg_file_name"], f"category ids {bad} outside [0, {metadata.num_classes})")
        out["pan_seg"] = pan
        out["segments_info"] = segments
        out["sem_seg"] = semantic_from_panoptic(torch.from_numpy(pan), segments, metadata.ignore_label).numpy()
    elif "sem_seg_file_name" in record:
        path = record["sem_seg_file_name"]
        label = read_label(path)
        if label.shape != (h, w):
            raise DatasetError(
                path, f"label map is {label.shape[1]}x{label.shape[0]} but its image {record['file_name']} is {w}x{h} (WxH)"
            )
        if record.get("reduce_zero_label"):
            # 1-based labels with 0 = unlabeled (raw ADE20K): 0 -> ignore, k -> k-1.
            unlabeled = (label == 0) | (label == metadata.ignore_label)
            label = np.where(unlabeled, metadata.ignore_label, label - 1)
        check_label_values(label, metadata.num_classes, metadata.ignore_label, path)
        out["sem_seg"] = label
    else:
        raise DatasetError(record["file_name"], "record has neither 'sem_seg_file_name' nor 'pan_seg_file_name'")
    return out


def _to_tv(data: dict, with_pan: bool) -> dict:
    sample = {
        "image": tv_tensors.Image(torch.from_numpy(data["image"]).permute(2, 0, 1).contiguous()),
        "sem_seg": tv_tensors.Mask(torch.from_numpy(data["sem_seg"])),
    }
    if with_pan:
        sample["pan_seg"] = tv_tensors.Mask(torch.from_numpy(data["pan_seg"]))
    return sample


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


class TrainMapper:
    """Augment one read sample and build its targets (``MaskFormerSemanticDatasetMapper`` /
    ``MaskFormerPanopticDatasetMapper`` / ``DETRPanopticDatasetMapper``, depending on the augmentation).

    Args:
        augmentation: callable ``(sample, rng) -> sample`` (see ``transforms.py``).
        task: ``semantic`` (one target per class) or ``panoptic`` (one per non-crowd segment).
        ignore_label: label of unlabeled pixels.
        pad_size: (h, w) to pad to after augmentation, or None.
        image_pad_value: image fill for the padding (the original uses 128, before normalisation).
    """

    def __init__(self, *, augmentation, task: str, ignore_label: int, pad_size: tuple[int, int] | None = None, image_pad_value: int = 128):
        self.augmentation = augmentation
        self.task = task
        self.ignore_label = ignore_label
        self.pad = None if pad_size is None else PadTo(pad_size, image_pad_value, {"sem_seg": ignore_label, "pan_seg": 0})

    def __call__(self, data: dict, rng: np.random.Generator) -> dict:
        panoptic = self.task == "panoptic"
        sample = self.augmentation(_to_tv(data, with_pan=panoptic), rng)
        image_size = tuple(int(v) for v in sample["image"].shape[-2:])
        if self.pad is not None:
            sample = self.pad(sample)
        sem_seg = _plain(sample["sem_seg"]).to(torch.int64)
        if panoptic:
            labels, masks = panoptic_targets(_plain(sample["pan_seg"]), data["segments_info"])
        else:
            labels, masks = semantic_targets(sem_seg, self.ignore_label)
        return {
            "image": _plain(sample["image"]),
            "image_size": image_size,
            "orig_size": tuple(int(v) for v in data["image"].shape[:2]),
            "labels": labels,
            "masks": masks,
            "sem_seg": sem_seg,
        }


class TestMapper:
    """Shortest-edge resize only; keeps full-resolution ground truth for evaluation."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, *, min_size: int, max_size: int, task: str, ignore_label: int):
        self.resize = ResizeShortestEdge(min_size, max_size)
        self.task = task
        self.ignore_label = ignore_label

    def __call__(self, data: dict, rng: np.random.Generator | None = None) -> dict:
        has_pan = "pan_seg" in data
        sample = self.resize(_to_tv(data, with_pan=has_pan))
        sem_seg = _plain(sample["sem_seg"]).to(torch.int64)
        if self.task == "panoptic":
            labels, masks = panoptic_targets(_plain(sample["pan_seg"]), data["segments_info"])
        else:
            labels, masks = semantic_targets(sem_seg, self.ignore_label)
        out = {
            "image": _plain(sample["image"]),
            "image_size": tuple(int(v) for v in sample["image"].shape[-2:]),
            "orig_size": tuple(int(v) for v in data["image"].shape[:2]),
            "labels": labels,
            "masks": masks,
            "sem_seg": sem_seg,
            "gt_sem_seg": torch.from_numpy(data["sem_seg"]).to(torch.int64),
        }
        if has_pan:
            out["gt_pan_seg"] = torch.from_numpy(data["pan_seg"]).to(torch.int64)
            out["segments_info"] = [dict(s) for s in data["segments_info"]]
        return out

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return resize_shortest_edge_shape(h, w, self.resize.min_sizes[0], self.resize.max_size)


_WARNED: set[str] = set()


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    # The mapper runs many small tensor ops; with intra-op threads they are 10-30x slower on a small
    # CPU (measured: 81 ms vs 3 ms per 128x128 sample on 2 cores). DataLoader workers already use one
    # thread; this covers num_workers=0, where mapping runs in the training process between steps.
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class SegmentationDataset(Dataset):
    """Records + metadata + a mapper.

    ``dataset[i]`` maps record ``i``; training randomness comes from ``numpy.random.default_rng(seed_words)``
    where ``dataset[(i, seed_words)]`` gives the words explicitly (the training sampler does) and
    ``dataset[i]`` uses ``(seed, i)``. With ``skip_bad_samples`` (training only) a sample that fails to read is
    replaced by another index drawn from the same generator; the sample then carries ``"num_skipped"``.
    """

    def __init__(
        self,
        records: list[dict],
        metadata: DatasetMetadata,
        mapper,
        *,
        task: str = "semantic",
        train: bool = True,
        seed: int = 0,
        skip_bad_samples: bool = False,
    ):
        if task not in ("semantic", "panoptic"):
            raise ValueError(f"task must be 'semantic' or 'panoptic', got {task!r}")
        if task == "panoptic" and "pan_seg_file_name" not in records[0]:
            raise DatasetError(
                None,
                f"dataset {metadata.name!r} has only semantic labels, but a panoptic mapper was asked for "
                "(data.mapper: panoptic / detr_panoptic); use data.mapper: semantic or a panoptic dataset",
            )
        self.records = records
        self.metadata = metadata
        self.mapper = mapper
        self.task = task
        self.train = train
        self.seed = seed
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> dict:
        """The validated raw arrays of record ``index`` (see :func:`read_sample`)."""
        return read_sample(self.records[index], self.metadata)

    def __getitem__(self, key: int | tuple) -> dict:
        if isinstance(key, tuple):
            index, words = int(key[0]), [int(w) for w in key[1]]
        else:
            index, words = int(key), [self.seed, int(key)]
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.records)} samples")
        rng = np.random.default_rng(words)
        skipped = 0
        while True:
            try:
                with _single_threaded():
                    data = self.read(index)
                break
            except DatasetError as err:
                if not (self.skip_bad_samples and self.train) or skipped >= len(self.records):
                    raise
                key_text = err.path or str(err)
                if key_text not in _WARNED:
                    _WARNED.add(key_text)
                    warnings.warn(f"skipping bad sample: {err}", stacklevel=2)
                skipped += 1
                index = int(rng.integers(len(self.records)))
        record = self.records[index]
        with _single_threaded():
            sample = self.mapper(data, rng)
        sample["file_name"] = record["file_name"]
        sample["image_id"] = record["image_id"]
        if skipped:
            sample["num_skipped"] = skipped
        return sample


# ------------------------------------------------------------------------------------------------
# Building from the config
# ------------------------------------------------------------------------------------------------


def build_train_augmentation(
    *,
    mapper: str,
    min_sizes: list[int],
    max_size: int,
    crop_size: tuple[int, int] | None,
    single_category_max_area: float,
    color_aug_ssd: bool,
    random_flip: bool,
    ignore_label: int,
) -> Compose | DetrPanopticAugmentation:
    """The original's augmentation list for ``mapper`` (``semantic`` / ``panoptic`` / ``detr_panoptic``)."""
    if mapper == "detr_panoptic":
        return DetrPanopticAugmentation(min_sizes, max_size)
    augs: list = [ResizeShortestEdge(min_sizes, max_size)]
    if crop_size is not None:
        augs.append(RandomCropCategoryAreaConstraint(tuple(crop_size), single_category_max_area, ignore_label))
    if color_aug_ssd:
        augs.append(ColorAugSSD())
    if random_flip:
        augs.append(RandomHorizontalFlip())
    return Compose(augs)


def _dataset_config(cfg, split: str):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return cfg.data.train if split == "train" else cfg.data.test


def get_metadata(cfg, split: str = "train") -> DatasetMetadata:
    """Metadata of the dataset that ``cfg.data.train`` (``split="train"``) or ``cfg.data.test`` selects."""
    ds = _dataset_config(cfg, split)
    return load_metadata(ds.name, ds.root, ds.split, ds.options)


def build_dataset(cfg, split: str) -> SegmentationDataset:
    """The training (augmented) or test (resized only) dataset selected by the config."""
    ds = _dataset_config(cfg, split)
    metadata = load_metadata(ds.name, ds.root, ds.split, ds.options)
    if cfg.model.num_classes != metadata.num_classes:
        raise DatasetError(
            None,
            f"model.num_classes is {cfg.model.num_classes} but dataset {ds.name!r} has {metadata.num_classes} classes; "
            f"set model.num_classes: {metadata.num_classes}",
        )
    records = load_records(ds.name, ds.root, ds.split, ds.options)
    d = cfg.data
    task = "panoptic" if d.mapper in ("panoptic", "detr_panoptic") else "semantic"
    if split == "train":
        augmentation = build_train_augmentation(
            mapper=d.mapper,
            min_sizes=d.min_size_train,
            max_size=d.max_size_train,
            crop_size=d.crop_size,
            single_category_max_area=d.crop_single_category_max_area,
            color_aug_ssd=d.color_aug_ssd,
            random_flip=d.random_flip,
            ignore_label=metadata.ignore_label,
        )
        # The DETR recipe pads nothing in the mapper (the collator pads the batch).
        pad = tuple(d.crop_size) if (d.pad_to_crop and d.crop_size is not None and d.mapper != "detr_panoptic") else None
        mapper = TrainMapper(
            augmentation=augmentation, task=task, ignore_label=metadata.ignore_label, pad_size=pad, image_pad_value=d.image_pad_value
        )
    else:
        mapper = TestMapper(min_size=d.min_size_test, max_size=d.max_size_test, task=task, ignore_label=metadata.ignore_label)
    return SegmentationDataset(
        records,
        metadata,
        mapper,
        task=task,
        train=split == "train",
        seed=cfg.train.seed,
        skip_bad_samples=d.skip_bad_samples,
    )
