"""Datasets, the original's augmentations, batching and loaders.

Entry points: :func:`build_dataset`, :func:`get_metadata`, :func:`build_train_loader`,
:func:`build_test_loader`, :class:`SegmentationCollator`, and :func:`register_dataset` for new datasets.
Formats and layouts are documented in ``docs/datasets.md``.
"""

from maskformer.data.catalog import load_metadata, load_records, register_dataset, registered_datasets
from maskformer.data.collate import SegmentationCollator
from maskformer.data.dataset import SegmentationDataset, TestMapper, TrainMapper, build_dataset, get_metadata, read_sample
from maskformer.data.io import DatasetError
from maskformer.data.loader import InferenceSampler, TrainingSampler, build_test_loader, build_train_loader
from maskformer.data.metadata import DatasetMetadata

__all__ = [
    "DatasetError",
    "DatasetMetadata",
    "InferenceSampler",
    "SegmentationCollator",
    "SegmentationDataset",
    "TestMapper",
    "TrainMapper",
    "TrainingSampler",
    "build_dataset",
    "build_test_loader",
    "build_train_loader",
    "get_metadata",
    "load_metadata",
    "load_records",
    "read_sample",
    "register_dataset",
    "registered_datasets",
]
