"""The dataset registry: ``register_dataset`` is the one extension point, builtins use it too.

A dataset is a *builder* ``(root, split, **options) -> list[record]`` plus its
:class:`~maskformer.data.metadata.DatasetMetadata` (or a callable with the builder's signature that
returns one, for datasets whose classes live on disk). ``DatasetConfig`` selects one by name::

    data:
      train: {name: folder, root: /data/my_set, split: train, options: {ignore_label: 255}}

``root: null`` means ``$MASKFORMER_DATASETS`` (default ``./datasets``) joined with the dataset's
usual folder name (``default_dir``).
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, Union

from maskformer.data import formats
from maskformer.data.io import DatasetError
from maskformer.data.metadata import DatasetMetadata, load_packaged_metadata
from maskformer.data.shapes import shapes_metadata, shapes_records

__all__ = [
    "DatasetEntry",
    "register_dataset",
    "registered_datasets",
    "get_dataset_entry",
    "resolve_root",
    "load_records",
    "load_metadata",
]

Builder = Callable[..., list]
MetadataSpec = Union[DatasetMetadata, Callable[..., DatasetMetadata]]


@dataclass
class DatasetEntry:
    name: str
    builder: Builder
    metadata: MetadataSpec
    # Folder under $MASKFORMER_DATASETS used when the config gives no root; None: the builder gets root=None.
    default_dir: str | None = None


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str, builder: Builder, metadata: MetadataSpec, *, default_dir: str | None = None, overwrite: bool = False
) -> None:
    """Make ``name`` usable as ``data.train.name`` / ``data.test.name``.

    Args:
        name: the dataset name.
        builder: ``(root: str | None, split: str, **options) -> list[dict]`` returning records (see ``formats.py``).
        metadata: a :class:`DatasetMetadata`, or a callable taking the builder's arguments and returning one.
        default_dir: folder under ``$MASKFORMER_DATASETS`` used when the config's root is null.
        overwrite: allow replacing an existing registration.
    """
    if not overwrite and name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered (pass overwrite=True to replace it)")
    if not callable(builder):
        raise TypeError(f"dataset {name!r}: builder must be callable, got {type(builder).__name__}")
    if not isinstance(metadata, DatasetMetadata) and not callable(metadata):
        raise TypeError(f"dataset {name!r}: metadata must be a DatasetMetadata or a callable returning one")
    _REGISTRY[name] = DatasetEntry(name, builder, metadata, default_dir)


def registered_datasets() -> list[str]:
    return sorted(_REGISTRY)


def get_dataset_entry(name: str) -> DatasetEntry:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise DatasetError(None, f"unknown dataset {name!r}{extra}; registered datasets: {', '.join(registered_datasets())}")
    return _REGISTRY[name]


def resolve_root(entry: DatasetEntry, root: str | None) -> str | None:
    if root is not None:
        return os.path.expanduser(root)
    if entry.default_dir is None:
        return None
    return os.path.join(os.environ.get("MASKFORMER_DATASETS", "datasets"), entry.default_dir)


def _call(entry: DatasetEntry, fn: Callable, what: str, root: str | None, split: str, options: dict):
    try:
        inspect.signature(fn).bind(root, split, **options)
    except TypeError as err:
        params = [p for p in list(inspect.signature(fn).parameters)[2:] if p not in ("args", "kwargs")]
        raise DatasetError(
            None, f"dataset {entry.name!r}: bad options {sorted(options)} for its {what} ({err}); accepted options: {params}"
        ) from None
    return fn(root, split, **options)


def load_records(name: str, root: str | None, split: str, options: dict | None = None) -> list[dict]:
    """The records of one split of a registered dataset."""
    entry = get_dataset_entry(name)
    records = _call(entry, entry.builder, "builder", resolve_root(entry, root), split, dict(options or {}))
    if not isinstance(records, list) or not records:
        raise DatasetError(None, f"dataset {name!r} split {split!r}: the builder returned no records")
    return records


def load_metadata(name: str, root: str | None = None, split: str = "train", options: dict | None = None) -> DatasetMetadata:
    entry = get_dataset_entry(name)
    if isinstance(entry.metadata, DatasetMetadata):
        return entry.metadata
    return _call(entry, entry.metadata, "metadata", resolve_root(entry, root), split, dict(options or {}))


# ------------------------------------------------------------------------------------------------
# Builtins
# ------------------------------------------------------------------------------------------------

_ADE150 = partial(load_packaged_metadata, "ade20k_150.json")
_COCO_PAN = load_packaged_metadata("coco_panoptic_133.json", name="coco_panoptic", evaluator="panoptic")
_CITYSCAPES_PAN = load_packaged_metadata("cityscapes_19.json", name="cityscapes_panoptic", evaluator="sem_seg+panoptic")
_ADE_PAN = _ADE150(name="ade20k_panoptic", evaluator="sem_seg+panoptic")


BUILTIN_DATASETS: dict[str, tuple[Builder, MetadataSpec, str | None]] = {
    "ade20k_sem_seg": (
        formats.ade20k_semantic,
        _ADE150(name="ade20k_sem_seg", evaluator="sem_seg"),
        "ADEChallengeData2016",
    ),
    "ade20k_full_sem_seg": (
        formats.ade20k_full,
        load_packaged_metadata("ade20k_full_847.json", name="ade20k_full_sem_seg", evaluator="sem_seg"),
        "ADE20K_2021_17_01",
    ),
    "ade20k_panoptic": (
        lambda root, split: formats.ade20k_panoptic(root, split, _ADE_PAN),
        _ADE_PAN,
        "ADEChallengeData2016",
    ),
    "coco_panoptic": (lambda root, split: formats.coco_panoptic(root, split, _COCO_PAN), _COCO_PAN, "coco"),
    "coco_stuff_10k_sem_seg": (
        formats.coco_stuff_10k,
        load_packaged_metadata("coco_stuff_171.json", name="coco_stuff_10k_sem_seg", evaluator="sem_seg"),
        os.path.join("coco", "coco_stuff_10k"),
    ),
    "cityscapes_sem_seg": (
        formats.cityscapes_semantic,
        load_packaged_metadata("cityscapes_19.json", name="cityscapes_sem_seg", evaluator="sem_seg"),
        "cityscapes",
    ),
    "cityscapes_panoptic": (
        lambda root, split: formats.cityscapes_panoptic(root, split, _CITYSCAPES_PAN),
        _CITYSCAPES_PAN,
        "cityscapes",
    ),
    "mapillary_vistas_sem_seg": (
        formats.mapillary_vistas,
        load_packaged_metadata("mapillary_vistas_65.json", name="mapillary_vistas_sem_seg", evaluator="sem_seg"),
        "mapillary_vistas",
    ),
    "folder": (formats.folder_records, formats.folder_metadata, None),
    "shapes": (shapes_records, shapes_metadata, None),
}

for _name, (_builder, _metadata, _dir) in BUILTIN_DATASETS.items():
    register_dataset(_name, _builder, _metadata, default_dir=_dir)
