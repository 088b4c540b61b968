"""What a model and an evaluator need to know about a dataset's classes: :class:`DatasetMetadata`.

Class ids are contiguous ``0..K-1`` everywhere inside the package; ``dataset_ids`` maps them back to
the dataset's own category ids for writing COCO-format results. Builtin metadata is packaged data
(``maskformer/data/metadata/*.json``: names, colours, thing flags and original ids transcribed from
the datasets' official releases and the original MaskFormer/detectron2 registrations).
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["DatasetMetadata", "EVALUATORS", "load_packaged_metadata", "default_colors"]

EVALUATORS = ("sem_seg", "panoptic", "sem_seg+panoptic")
_METADATA_DIR = Path(__file__).with_name("metadata")


@dataclass
class DatasetMetadata:
    """Classes of one dataset.

    Attributes:
        name: the registered dataset name.
        class_names: K names; position = contiguous class id.
        colors: K RGB colours for visualisation.
        is_thing: K flags; True for countable "thing" classes (panoptic instances).
        ignore_label: the label value that marks unlabeled pixels (255, 65535 for ADE20K-full, 65 for Mapillary).
        dataset_ids: K original category ids (contiguous -> dataset id); None means identity and is
            filled in as ``list(range(K))``, so consumers can always index it.
        evaluator: ``sem_seg``, ``panoptic`` or ``sem_seg+panoptic``.
    """

    name: str
    class_names: list[str]
    colors: list[tuple[int, int, int]] = field(default_factory=list)
    is_thing: list[bool] = field(default_factory=list)
    ignore_label: int = 255
    dataset_ids: list[int] | None = None
    evaluator: str = "sem_seg"

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if k == 0:
            raise ValueError(f"dataset {self.name!r}: metadata needs at least one class")
        if not self.colors:
            self.colors = default_colors(k)
        if not self.is_thing:
            self.is_thing = [False] * k
        if self.dataset_ids is None:
            self.dataset_ids = list(range(k))
        self.dataset_ids = [int(i) for i in self.dataset_ids]
        self.colors = [tuple(int(v) for v in c) for c in self.colors]
        self.is_thing = [bool(t) for t in self.is_thing]
        for attr in ("colors", "is_thing", "dataset_ids"):
            value = getattr(self, attr)
            if len(value) != k:
                raise ValueError(f"dataset {self.name!r}: {attr} has {len(value)} entries for {k} classes")
        if self.evaluator not in EVALUATORS:
            raise ValueError(f"dataset {self.name!r}: evaluator must be one of {EVALUATORS}, got {self.evaluator!r}")
        if 0 <= self.ignore_label < k:
            raise ValueError(
                f"dataset {self.name!r}: ignore_label {self.ignore_label} collides with a class id (0..{k - 1})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def thing_ids(self) -> list[int]:
        """Contiguous ids of thing classes."""
        return [i for i, t in enumerate(self.is_thing) if t]

    @property
    def stuff_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.is_thing) if not t]

    def contiguous_id(self, dataset_id: int) -> int:
        """Contiguous class id of an original category id (KeyError if unknown)."""
        return self._from_dataset_id()[int(dataset_id)]

    def _from_dataset_id(self) -> dict[int, int]:
        return {d: i for i, d in enumerate(self.dataset_ids)}


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-spread, deterministic colours (golden-ratio hue walk)."""
    out = []
    for i in range(n):
        h = (0.13 + i * 0.618033988749895) % 1.0
        s = 0.65 + 0.35 * ((i * 7) % 5) / 4
        v = 0.75 + 0.25 * ((i * 3) % 4) / 3
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


@lru_cache(maxsize=None)
def _read_packaged(file_name: str) -> dict:
    path = _METADATA_DIR / file_name
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_packaged_metadata(file_name: str, *, name: str, evaluator: str) -> DatasetMetadata:
    """Metadata from one of the packaged JSON files (``{"ignore_label", "categories": [{id,name,color,isthing}]}``)."""
    data = _read_packaged(file_name)
    cats = data["categories"]
    ids = [int(c["id"]) for c in cats]
    return DatasetMetadata(
        name=name,
        class_names=[c["name"] for c in cats],
        colors=[tuple(c["color"]) for c in cats],
        is_thing=[bool(c["isthing"]) for c in cats],
        ignore_label=int(data["ignore_label"]),
        dataset_ids=ids,
        evaluator=evaluator,
    )
