"""Model zoo: entries against their configs and the docs, names in build_model, the cached download (offline)."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest
import torch

from maskformer import zoo
from maskformer.config import load_config
from maskformer.models.build import build_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "model_zoo.md"

# What each dataset's config must say.
NUM_CLASSES = {"ADE20K-150": 150, "COCO-Stuff-10K": 171, "ADE20K-Full-847": 847, "Cityscapes": 19,
               "Mapillary Vistas": 65, "COCO panoptic": 133, "ADE20K panoptic": 150}
BACKBONES = {"R50": "resnet50", "R101": "resnet101", "R101c": "resnet101c", "Swin-T": "swin_tiny_patch4_window7_224",
             "Swin-S": "swin_small_patch4_window7_224", "Swin-B": "swin_base_patch4_window12_384",
             "Swin-L": "swin_large_patch4_window12_384"}


def entry_config(entry: zoo.ZooEntry):
    return load_config(entry.config_path, list(entry.overrides))


@pytest.mark.parametrize("name", zoo.list_models())
def test_entry_fits_its_config(name):
    entry = zoo.get_entry(name)
    cfg = entry_config(entry)
    assert cfg.model.num_classes == NUM_CLASSES[entry.dataset]
    assert cfg.model.backbone.name.split(".")[0] == BACKBONES[entry.backbone.split(" ")[0]]
    six_enc = "6 Enc" in entry.backbone
    assert (cfg.model.pixel_decoder == "transformer_encoder_fpn") == six_enc
    assert (cfg.model.transformer_in_feature == "transformer_encoder") == six_enc
    assert cfg.test.panoptic_on == (entry.metric == "PQ")
    if entry.crop is not None:
        assert cfg.data.crop_size == [int(v) for v in entry.crop.split("x")]
    else:
        assert cfg.data.crop_size is None
    assert entry.url.startswith(zoo.DOWNLOAD_ROOT + "/") and re.fullmatch(r"model_final_[0-9a-f]{6}\.pkl",
                                                                        entry.filename)
    assert entry.md5_prefix == entry.filename[len("model_final_"):-len(".pkl")]
    assert entry.metric in ("mIoU", "PQ") and 0 < entry.value < 100
    assert name.startswith("maskformer_")


def test_entries_are_unique_and_complete():
    names = zoo.list_models()
    assert len(names) == len(set(names)) == 24
    assert len({zoo.get_entry(n).url for n in names}) == len(names)
    assert zoo.list_models("swin_tiny") == ["maskformer_swin_tiny_ade20k", "maskformer_swin_tiny_coco_panoptic"]
    headline = zoo.get_entry("maskformer_swin_large_ade20k")
    assert (headline.value, headline.value_ms) == (54.1, 55.6)
    assert zoo.get_entry("maskformer_swin_large_coco_panoptic").value == 52.7


def test_docs_table_lists_every_entry():
    text = DOCS.read_text(encoding="utf-8")
    for name in zoo.list_models():
        entry = zoo.get_entry(name)
        row = next((line for line in text.splitlines() if line.startswith("|") and f"`{name}`" in line), None)
        assert row is not None, name
        assert entry.url in row and entry.config in row, name
        assert f"{entry.value:.1f}" in row, name
        # The commands section converts and evaluates every entry with its own config.
        assert f"--config configs/{entry.config}" in text, name


def test_unknown_name_suggests_close_names():
    with pytest.raises(zoo.UnknownModelError, match="did you mean 'maskformer_swin_tiny_ade20k'"):
        zoo.get_entry("maskformer_swin_tiny_ade2k")
    with pytest.raises(KeyError, match="unknown model-zoo name 'resnet'"):
        build_model("resnet")
    assert zoo.is_model_name("maskformer_r50_ade20k")
    assert not zoo.is_model_name("configs/ade20k-150/maskformer_R50_bs16_160k.yaml")
    assert not zoo.is_model_name("x.yaml") and not zoo.is_model_name(Path("a"))


def test_build_model_by_name_with_local_weights(tmp_path):
    entry = zoo.get_entry("maskformer_r50_ade20k")
    cfg = entry_config(entry)
    cfg.model.backbone.pretrained = False
    from maskformer.models.build import build_maskformer

    torch.manual_seed(0)
    source = build_maskformer(cfg).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "r50_ade20k.pth")
    model = build_model(entry.name, weights=tmp_path / "r50_ade20k.pth")
    assert not model.training and model.num_classes == 150
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
    # Overrides of the entry apply (coco-stuff R101 reuses the R50 config with another backbone).
    r101 = zoo.resolve_model("maskformer_r101_coco_stuff")
    assert r101[1] == ["model.backbone.name=resnet101.tv_in1k"]
    assert load_config(r101[0], r101[1]).model.backbone.name == "resnet101.tv_in1k"
    # A checkpoint of another model is refused with the facts that differ.
    with pytest.raises(Exception, match="checkpoint has 150 classes and a ResNet-50 backbone, config says 150 "
                                        "classes and swin_tiny"):
        build_model("maskformer_swin_tiny_ade20k", weights=tmp_path / "r50_ade20k.pth")


def _fake_entry(tmp_path, payload: bytes) -> zoo.ZooEntry:
    md5 = hashlib.md5(payload).hexdigest()[:6]
    return zoo.ZooEntry("fake", "ade20k-150/maskformer_R50_bs16_160k.yaml",
                        f"https://example.invalid/fake/model_final_{md5}.pkl", "ADE20K-150", "mIoU", 1.0, None,
                        "R50", "512x512")


def test_download_is_cached_and_checked_offline(tmp_path, monkeypatch):
    payload = pickle.dumps({"model": {}, "__author__": "test"})
    entry = _fake_entry(tmp_path, payload)
    calls = []

    def fake_download(url, dst, progress=True):  # stands in for the network
        calls.append(url)
        Path(dst).write_bytes(payload)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = zoo.download_weights(entry)
    assert path == tmp_path / "hub" / "checkpoints" / "maskformer" / entry.filename
    assert path.read_bytes() == payload and calls == [entry.url]
    assert zoo.download_weights(entry) == path and len(calls) == 1  # cached: no second download

    corrupt = zoo.ZooEntry(**{**entry.__dict__, "url": entry.url.replace(entry.md5_prefix, "000000")})
    with pytest.raises(OSError, match="corrupt"):
        zoo.download_weights(corrupt)
    assert not any(p.name.endswith(".partial") for p in path.parent.iterdir())


def test_resolve_download_uses_the_cache(tmp_path, monkeypatch):
    entry = zoo.get_entry("maskformer_swin_tiny_ade20k")
    cache = tmp_path / "hub" / "checkpoints" / "maskformer"
    cache.mkdir(parents=True)
    (cache / entry.filename).write_bytes(b"cached")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no network in tests"))
    config, overrides, weights = zoo.resolve_model(entry.name, weights="download")
    assert config == entry.config_path and overrides == [] and weights == cache / entry.filename
    assert zoo.resolve_model(entry.name, weights=True)[2] == weights
