"""The official MaskFormer model zoo: names, configs, download links and published results.

Each :class:`ZooEntry` pairs one published checkpoint of the original (detectron2) MaskFormer with
this package's config of the same model, so that ::

    model = build_model("maskformer_swin_tiny_ade20k", weights="model_final_8657a5.pkl")
    model = build_model("maskformer_swin_tiny_ade20k", weights="download")   # cached download, converted

work by name. ``weights`` may be a converted checkpoint (``tools/convert_checkpoint.py``) or the
original ``.pkl``, which is converted on the fly. The links, model ids and numbers are transcribed
from the original repository's ``MODEL_ZOO.md``. The files are released under CC BY-NC 4.0.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

__all__ = ["ZooEntry", "UnknownModelError", "list_models", "get_entry", "resolve_model", "download_weights",
           "is_model_name", "file_md5", "CONFIG_ROOT", "DOWNLOAD_ROOT"]

DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/maskformer"
# The configs live next to the package in a source checkout (they are not installed with it).
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


class UnknownModelError(KeyError):
    """A model-zoo name that does not exist; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class ZooEntry:
    """One official checkpoint.

    Attributes:
        name: this package's name for it, ``maskformer_<backbone>_<dataset>``.
        config: config file, relative to ``configs/``.
        url: the original's download link (a detectron2 ``.pkl``).
        dataset: the evaluation dataset as the table names it.
        metric: ``"mIoU"`` or ``"PQ"``.
        value: the published single-scale result.
        value_ms: the published multi-scale + flip result (None where none was published).
        backbone: as the original's table names it (``"R50"``, ``"Swin-T (IN-1k)"``, ...).
        crop: training crop (``"512x512"``) or ``None`` (COCO panoptic trains without crops).
        overrides: ``section.key=value`` pairs applied on top of ``config`` (for models whose config
            differs from one in ``configs/`` only in the backbone).
    """

    name: str
    config: str
    url: str
    dataset: str
    metric: str
    value: float
    value_ms: float | None
    backbone: str
    crop: str | None
    overrides: tuple[str, ...] = ()

    @property
    def config_path(self) -> Path:
        return CONFIG_ROOT / self.config

    @property
    def filename(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    @property
    def md5_prefix(self) -> str | None:
        """The md5 prefix the original puts in its file names (``model_final_<md5 prefix>.pkl``)."""
        stem = Path(self.filename).stem
        return stem.rsplit("_", 1)[-1] if stem.startswith("model_final_") else None


def _url(task_dataset: str, config_name: str | None, model_id: str) -> str:
    folder = f"{task_dataset}/{config_name}" if config_name else task_dataset
    return f"{DOWNLOAD_ROOT}/{folder}/model_final_{model_id}.pkl"


_R101 = "model.backbone.name=resnet101.tv_in1k"
_R101C = ("model.backbone.name=resnet101c", "model.backbone.pretrained=false")

_ENTRIES: tuple[ZooEntry, ...] = (
    # ADE20K-150 semantic (crop 512, Swin-B/L 640)
    ZooEntry("maskformer_r50_ade20k", "ade20k-150/maskformer_R50_bs16_160k.yaml",
             _url("semantic-ade20k", "maskformer_R50_bs16_160k", "d8dbeb"), "ADE20K-150", "mIoU", 44.5, 46.7,
             "R50", "512x512"),
    ZooEntry("maskformer_r101_ade20k", "ade20k-150/maskformer_R101_bs16_160k.yaml",
             _url("semantic-ade20k", "maskformer_R101_bs16_160k", "1aeb94"), "ADE20K-150", "mIoU", 45.5, 47.2,
             "R101", "512x512"),
    ZooEntry("maskformer_r101c_ade20k", "ade20k-150/maskformer_R101c_bs16_160k.yaml",
             _url("semantic-ade20k", "maskformer_R101c_bs16_160k", "b432ea"), "ADE20K-150", "mIoU", 46.0, 48.1,
             "R101c", "512x512"),
    ZooEntry("maskformer_swin_tiny_ade20k", "ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml",
             _url("semantic-ade20k", "maskformer_swin_tiny_bs16_160k", "8657a5"), "ADE20K-150", "mIoU", 46.7,
             48.8, "Swin-T (IN-1k)", "512x512"),
    ZooEntry("maskformer_swin_small_ade20k", "ade20k-150/swin/maskformer_swin_small_bs16_160k.yaml",
             _url("semantic-ade20k", "maskformer_swin_small_bs16_160k", "528157"), "ADE20K-150", "mIoU", 49.8,
             51.0, "Swin-S (IN-1k)", "512x512"),
    ZooEntry("maskformer_swin_base_ade20k", "ade20k-150/swin/maskformer_swin_base_IN21k_384_bs16_160k_res640.yaml",
             _url("semantic-ade20k", "maskformer_swin_base_IN21k_384_bs16_160k_res640", "45388b"), "ADE20K-150",
             "mIoU", 52.7, 53.9, "Swin-B (IN-21k)", "640x640"),
    ZooEntry("maskformer_swin_large_ade20k",
             "ade20k-150/swin/maskformer_swin_large_IN21k_384_bs16_160k_res640.yaml",
             _url("semantic-ade20k", "maskformer_swin_large_IN21k_384_bs16_160k_res640", "aefa3b"), "ADE20K-150",
             "mIoU", 54.1, 55.6, "Swin-L (IN-21k)", "640x640"),
    # COCO-Stuff-10K semantic (crop 640)
    ZooEntry("maskformer_r50_coco_stuff", "coco-stuff-10k-171/maskformer_R50_bs32_60k.yaml",
             _url("semantic-coco-stuff-10k", "maskformer_R50_bs32_60k", "cb03eb"), "COCO-Stuff-10K", "mIoU",
             37.1, 38.9, "R50", "640x640"),
    ZooEntry("maskformer_r101_coco_stuff", "coco-stuff-10k-171/maskformer_R50_bs32_60k.yaml",
             _url("semantic-coco-stuff-10k", "maskformer_R101_bs32_60k", "eb19bb"), "COCO-Stuff-10K", "mIoU",
             38.1, 39.8, "R101", "640x640", (_R101,)),
    ZooEntry("maskformer_r101c_coco_stuff", "coco-stuff-10k-171/maskformer_R50_bs32_60k.yaml",
             _url("semantic-coco-stuff-10k", "maskformer_R101c_bs32_60k", "bffd25"), "COCO-Stuff-10K", "mIoU",
             38.0, 39.3, "R101c", "640x640", _R101C),
    # ADE20K-Full-847 semantic (single scale only)
    ZooEntry("maskformer_r50_ade20k_full", "ade20k-full-847/maskformer_R50_bs16_200k.yaml",
             _url("semantic-ade20k-full", "maskformer_R50_bs16_200k", "f4e3f6"), "ADE20K-Full-847", "mIoU", 16.0,
             None, "R50", "512x512"),
    ZooEntry("maskformer_r101_ade20k_full", "ade20k-full-847/maskformer_R50_bs16_200k.yaml",
             _url("semantic-ade20k-full", "maskformer_R101_bs16_200k", "88df33"), "ADE20K-Full-847", "mIoU", 16.8,
             None, "R101", "512x512", (_R101,)),
    ZooEntry("maskformer_r101c_ade20k_full", "ade20k-full-847/maskformer_R50_bs16_200k.yaml",
             _url("semantic-ade20k-full", "maskformer_R101c_bs16_200k", "75d34e"), "ADE20K-Full-847", "mIoU",
             17.4, None, "R101c", "512x512", _R101C),
    # Cityscapes semantic (crop 512x1024)
    ZooEntry("maskformer_r101_cityscapes", "cityscapes-19/maskformer_R101_bs16_90k.yaml",
             _url("semantic-cityscapes", "maskformer_R101_bs16_90k", "38c00c"), "Cityscapes", "mIoU", 78.5, 80.3,
             "R101", "512x1024"),
    ZooEntry("maskformer_r101c_cityscapes", "cityscapes-19/maskformer_R101c_bs16_90k.yaml",
             _url("semantic-cityscapes", "maskformer_R101c_bs16_90k", "4f8ff9"), "Cityscapes", "mIoU", 79.7, 81.4,
             "R101c", "512x1024"),
    # Mapillary Vistas semantic (crop 1280)
    ZooEntry("maskformer_r50_mapillary", "mapillary-vistas-65/maskformer_R50_bs16_300k.yaml",
             _url("semantic-mapillary-vistas", "maskformer_R50_bs16_300k", "f3fc73"), "Mapillary Vistas", "mIoU",
             53.1, 55.4, "R50", "1280x1280"),
    # COCO panoptic (no crop). The Swin rows of MODEL_ZOO.md link files directly under panoptic-coco/.
    ZooEntry("maskformer_r50_coco_panoptic", "coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml",
             _url("panoptic-coco", "maskformer_panoptic_R50_bs64_554k", "6f60dc"), "COCO panoptic", "PQ", 46.5,
             None, "R50 + 6 Enc", None),
    ZooEntry("maskformer_r101_coco_panoptic", "coco-panoptic/maskformer_panoptic_R101_bs64_554k.yaml",
             _url("panoptic-coco", "maskformer_panoptic_R101_bs64_554k", "57b049"), "COCO panoptic", "PQ", 47.6,
             None, "R101 + 6 Enc", None),
    ZooEntry("maskformer_swin_tiny_coco_panoptic", "coco-panoptic/swin/maskformer_panoptic_swin_tiny_bs64_554k.yaml",
             _url("panoptic-coco", None, "539394"), "COCO panoptic", "PQ", 47.7, None, "Swin-T (IN-1k)", None),
    ZooEntry("maskformer_swin_small_coco_panoptic",
             "coco-panoptic/swin/maskformer_panoptic_swin_small_bs64_554k.yaml",
             _url("panoptic-coco", None, "5bf6b1"), "COCO panoptic", "PQ", 49.7, None, "Swin-S (IN-1k)", None),
    ZooEntry("maskformer_swin_base_coco_panoptic",
             "coco-panoptic/swin/maskformer_panoptic_swin_base_IN21k_384_bs64_554k.yaml",
             _url("panoptic-coco", None, "4b7f49"), "COCO panoptic", "PQ", 51.8, None, "Swin-B (IN-21k)", None),
    ZooEntry("maskformer_swin_large_coco_panoptic",
             "coco-panoptic/swin/maskformer_panoptic_swin_large_IN21k_384_bs64_554k.yaml",
             _url("panoptic-coco", None, "7505c4"), "COCO panoptic", "PQ", 52.7, None, "Swin-L (IN-21k)", None),
    # ADE20K panoptic (crop 640)
    ZooEntry("maskformer_r50_ade20k_panoptic", "ade20k-150-panoptic/maskformer_panoptic_R50_bs16_720k.yaml",
             _url("panoptic-ade20k", "maskformer_panoptic_R50_bs16_720k", "7aa977"), "ADE20K panoptic", "PQ", 34.7,
             None, "R50 + 6 Enc", "640x640"),
    ZooEntry("maskformer_r101_ade20k_panoptic", "ade20k-150-panoptic/maskformer_panoptic_R101_bs16_720k.yaml",
             _url("panoptic-ade20k", "maskformer_panoptic_R101_bs16_720k", "0b3cc8"), "ADE20K panoptic", "PQ",
             35.7, None, "R101 + 6 Enc", "640x640"),
)

_BY_NAME = {entry.name: entry for entry in _ENTRIES}


def list_models(pattern: str | None = None) -> list[str]:
    """The zoo's model names (those containing ``pattern``, if given), in table order."""
    return [e.name for e in _ENTRIES if pattern is None or pattern in e.name]


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name raises :class:`UnknownModelError` (a ``KeyError``)
    suggesting the closest names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_BY_NAME), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownModelError(f"unknown model-zoo name {name!r}{hint}; maskformer.zoo.list_models() lists "
                       f"{len(_BY_NAME)} models") from None


def is_model_name(text: object) -> bool:
    """True for strings shaped like a zoo name rather than a config path (no folder, no YAML suffix,
    not an existing file); an unknown name then fails in :func:`get_entry` with suggestions."""
    if not isinstance(text, str) or not text:
        return False
    if os.sep in text or "/" in text or text.endswith((".yaml", ".yml")) or os.path.exists(text):
        return False
    return True


def download_weights(entry: ZooEntry | str, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> Path:
    """The entry's original ``.pkl``, downloaded once into ``cache_dir`` and reused afterwards.

    ``cache_dir`` defaults to ``<torch hub dir>/checkpoints/maskformer`` (``$TORCH_HOME``), as
    ``torch.hub.load_state_dict_from_url`` caches. A fresh download is checked against the md5 prefix
    in its file name and removed if it does not match.
    """
    import torch.hub

    if isinstance(entry, str):
        entry = get_entry(entry)
    cache = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints" / "maskformer"
    target = cache / entry.filename
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    torch.hub.download_url_to_file(entry.url, str(partial), progress=progress)
    if entry.md5_prefix and not file_md5(partial).startswith(entry.md5_prefix):
        partial.unlink()
        raise OSError(f"download of {entry.url} is corrupt: its md5 does not start with {entry.md5_prefix}")
    os.replace(partial, target)
    return target


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(name: str, weights=None, overrides: Sequence[str] = ()) -> tuple[Path, list[str], object]:
    """For ``build_model(name, ...)``: (config path, overrides, weights path or None).

    ``weights``: None, a local file (converted or original), or ``"download"``/``True`` for the cached
    download of the entry's original file.
    """
    entry = get_entry(name)
    if not entry.config_path.is_file():
        raise FileNotFoundError(f"model {name!r} needs the config {entry.config_path}, which is missing "
                                "(the zoo reads configs/ from a source checkout)")
    if weights is True or weights == "download":
        weights = download_weights(entry)
    elif weights is False:
        weights = None
    return entry.config_path, list(entry.overrides) + list(overrides), weights
