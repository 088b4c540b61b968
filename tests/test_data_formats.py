"""Dataset readers on tiny fixtures written in each real on-disk format, and every bad-input error."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskformer.config import config_from_dict
from maskformer.data import DatasetError, build_dataset, load_metadata, load_records, read_sample, register_dataset
from maskformer.data.io import id2rgb, rgb2id
from maskformer.data.metadata import DatasetMetadata


def _save_rgb(path: Path, h: int, w: int, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _save_label(path: Path, label: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        img = Image.fromarray(label.astype(np.uint8), mode="P")
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    elif mode == "I;16":
        img = Image.fromarray(label.astype(np.uint16))
    else:
        img = Image.fromarray(label.astype(np.uint8))
    img.save(path)


def _cfg(**data):
    return config_from_dict({"model": {"num_classes": data.pop("num_classes")}, "data": data})


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,k,things,ignore",
    [
        ("ade20k_sem_seg", 150, 100, 255),
        ("ade20k_panoptic", 150, 100, 255),
        ("ade20k_full_sem_seg", 847, 0, 65535),
        ("coco_panoptic", 133, 80, 255),
        ("coco_stuff_10k_sem_seg", 171, 80, 255),
        ("cityscapes_sem_seg", 19, 8, 255),
        ("mapillary_vistas_sem_seg", 65, 37, 65),
        ("shapes", 7, 4, 255),
    ],
)
def test_builtin_metadata(name, k, things, ignore):
    meta = load_metadata(name)
    assert meta.num_classes == k and len(meta.colors) == k and len(meta.dataset_ids) == k
    assert len(meta.thing_ids) == things and meta.ignore_label == ignore
    assert len(set(meta.dataset_ids)) == k  # ids unique: contiguous <-> dataset id is a bijection


def test_known_category_facts():
    coco = load_metadata("coco_panoptic")
    assert coco.class_names[0] == "person" and coco.dataset_ids[0] == 1 and coco.is_thing[0]
    assert coco.dataset_ids[79] == 90 and coco.dataset_ids[80] == 92 and not coco.is_thing[80]
    assert coco.class_names[-1] == "rug-merged" and coco.dataset_ids[-1] == 200
    assert coco.contiguous_id(200) == 132
    city = load_metadata("cityscapes_sem_seg")
    assert city.class_names[13] == "car" and city.dataset_ids[13] == 26 and city.colors[0] == (128, 64, 128)
    full = load_metadata("ade20k_full_sem_seg")
    assert full.class_names[0] == "wall" and full.dataset_ids[0] == 2978 and full.dataset_ids[846] == 3148
    stuff = load_metadata("coco_stuff_10k_sem_seg")
    assert stuff.dataset_ids[80] == 92 and stuff.dataset_ids[-1] == 182 and stuff.class_names[-1] == "wood"


def test_unknown_dataset_suggests_name():
    with pytest.raises(DatasetError, match=r"unknown dataset 'ade20k_semseg'.*did you mean 'ade20k_sem_seg'"):
        load_metadata("ade20k_semseg")


def test_register_dataset_extension_point(tmp_path):
    _save_rgb(tmp_path / "a.png", 8, 8)
    _save_label(tmp_path / "a_label.png", np.ones((8, 8)))

    def builder(root, split, *, flag=False):
        return [{"file_name": f"{root}/a.png", "sem_seg_file_name": f"{root}/a_label.png", "image_id": "a"}]

    meta = DatasetMetadata(name="mine", class_names=["x", "y"])
    register_dataset("my_test_set", builder, meta, overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("my_test_set", builder, meta)
    ds = build_dataset(_cfg(num_classes=2, test={"name": "my_test_set", "root": str(tmp_path)}), "test")
    assert ds[0]["labels"].tolist() == [1]
    with pytest.raises(DatasetError, match=r"bad options \['nope'\].*accepted options: \['flag'\]"):
        load_records("my_test_set", str(tmp_path), "val", {"nope": 1})


# ------------------------------------------------------------------------------------------------
# Real formats
# ------------------------------------------------------------------------------------------------


def test_ade20k_raw_annotations_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _save_rgb(root / "images/training/ADE_train_1.jpg", 6, 8)
    raw = np.array([[0, 1, 2, 150] * 2] * 6)
    _save_label(root / "annotations/training/ADE_train_1.png", raw)
    records = load_records("ade20k_sem_seg", str(root), "train")
    data = read_sample(records[0], load_metadata("ade20k_sem_seg"))
    np.testing.assert_array_equal(data["sem_seg"][0], [255, 0, 1, 149] * 2)
    # The prepared annotations take precedence when present.
    _save_label(root / "annotations_detectron2/training/ADE_train_1.png", np.full((6, 8), 7))
    data = read_sample(load_records("ade20k_sem_seg", str(root), "train")[0], load_metadata("ade20k_sem_seg"))
    assert (data["sem_seg"] == 7).all()


def test_default_root_from_env(tmp_path, monkeypatch):
    root = tmp_path / "ADEChallengeData2016"
    _save_rgb(root / "images/validation/ADE_val_1.jpg", 4, 4)
    _save_label(root / "annotations_detectron2/validation/ADE_val_1.png", np.zeros((4, 4)))
    monkeypatch.setenv("MASKFORMER_DATASETS", str(tmp_path))
    assert load_records("ade20k_sem_seg", None, "val")[0]["image_id"] == "ADE_val_1"
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_records("ade20k_sem_seg", None, "test")


def test_ade20k_full_uint16_tiff(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    _save_rgb(root / "images_detectron2/validation/ADE_val_1.jpg", 5, 5)
    label = np.full((5, 5), 846, dtype=np.uint16)
    label[0, 0] = 65535
    (root / "annotations_detectron2/validation").mkdir(parents=True)
    Image.fromarray(label).save(root / "annotations_detectron2/validation/ADE_val_1.tif")
    meta = load_metadata("ade20k_full_sem_seg")
    data = read_sample(load_records("ade20k_full_sem_seg", str(root), "val")[0], meta)
    assert data["sem_seg"][0, 0] == 65535 and data["sem_seg"][1, 1] == 846


def test_cityscapes_semantic_and_panoptic_from_instance_ids(tmp_path):
    root = tmp_path / "cityscapes"
    _save_rgb(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", 4, 6)
    _save_label(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png", np.full((4, 6), 13))
    ids = np.array(
        [[7, 7, 26001, 26001, 26002, 0], [7, 7, 26001, 26001, 26002, 0], [24, 24, 7, 7, 7, 7], [24, 24, 7, 7, 4, 4]]
    )
    (root / "gtFine/val/aachen").mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16)).save(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_instanceIds.png")
    rec = load_records("cityscapes_sem_seg", str(root), "val")[0]
    assert rec["image_id"] == "aachen_000000_000019"
    assert (read_sample(rec, load_metadata("cityscapes_sem_seg"))["sem_seg"] == 13).all()

    ds = build_dataset(_cfg(num_classes=19, mapper="panoptic", test={"name": "cityscapes_panoptic", "root": str(root), "split": "val"}), "test")
    sample = ds[0]
    segs = {s["id"]: s for s in sample["segments_info"]}
    assert set(segs) == {7, 26001, 26002, 24}
    assert segs[26001]["category_id"] == 13 and segs[26001]["isthing"] and not segs[26001]["iscrowd"]
    assert segs[24]["iscrowd"] == 1 and segs[7]["category_id"] == 0
    # Crowd person group and unlabeled (0) / non-train label 4 are ignored in the semantic map.
    assert sample["gt_sem_seg"][2, 0] == 255 and sample["gt_sem_seg"][0, 5] == 255 and sample["gt_sem_seg"][3, 5] == 255
    assert sample["gt_pan_seg"][3, 5] == 0
    assert sorted(sample["labels"].tolist()) == [0, 13, 13]  # road + two cars; the crowd has no target


def _write_coco_panoptic(root: Path, split: str, meta: DatasetMetadata) -> dict:
    person, road = meta.dataset_ids[0], meta.dataset_ids[meta.class_names.index("road")]
    pan = np.zeros((6, 8), dtype=np.int64)
    pan[:, :4] = 1000  # road (stuff)
    pan[1:3, 5:7] = 300000  # a person (large id: exercises the RGB encoding)
    pan[4:, 5:] = 70  # a crowd of people
    (root / f"panoptic_{split}2017").mkdir(parents=True)
    Image.fromarray(id2rgb(pan)).save(root / f"panoptic_{split}2017/000000000139.png")
    _save_rgb(root / f"{split}2017/000000000139.jpg", 6, 8)
    ann = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": 6, "width": 8}],
        "annotations": [
            {
                "image_id": 139,
                "file_name": "000000000139.png",
                "segments_info": [
                    {"id": 1000, "category_id": road, "iscrowd": 0, "area": 24},
                    {"id": 300000, "category_id": person, "iscrowd": 0, "area": 4},
                    {"id": 70, "category_id": person, "iscrowd": 1, "area": 6},
                ],
            }
        ],
        "categories": [{"id": i, "name": n} for i, n in zip(meta.dataset_ids, meta.class_names)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / f"annotations/panoptic_{split}2017.json").write_text(json.dumps(ann))
    return ann


def test_coco_panoptic_reader(tmp_path):
    meta = load_metadata("coco_panoptic")
    root = tmp_path / "coco"
    _write_coco_panoptic(root, "val", meta)
    road = meta.class_names.index("road")
    cfg = _cfg(num_classes=133, mapper="detr_panoptic", test={"name": "coco_panoptic", "root": str(root), "split": "val"})
    sample = build_dataset(cfg, "test")[0]
    assert sample["image_id"] == 139 and sample["orig_size"] == (6, 8)
    segs = {s["id"]: s for s in sample["segments_info"]}
    assert segs[1000]["category_id"] == road and not segs[1000]["isthing"]
    assert segs[300000]["category_id"] == 0 and segs[300000]["isthing"] and segs[70]["iscrowd"] == 1
    gt = sample["gt_sem_seg"]
    assert gt[0, 0] == road and gt[1, 5] == 0 and gt[5, 7] == 255  # crowd -> ignore
    assert sample["gt_pan_seg"][1, 5] == 300000
    assert sorted(sample["labels"].tolist()) == [0, road] and sample["masks"].shape[0] == 2


def test_folder_dataset_palette_and_reduce_zero_label(tmp_path):
    root = tmp_path / "mine"
    _save_rgb(root / "images/train/b.jpg", 4, 4, seed=1)
    _save_rgb(root / "images/train/a.png", 4, 4, seed=2)
    _save_label(root / "masks/train/a.png", np.array([[0, 1, 2, 255]] * 4), mode="P")
    _save_label(root / "masks/train/b.png", np.array([[1, 1, 2, 2]] * 4), mode="P")
    (root / "classes.txt").write_text("bg\ncat\ndog\n")
    cfg = _cfg(num_classes=3, test={"name": "folder", "root": str(root), "split": "train"})
    ds = build_dataset(cfg, "test")
    assert [r["image_id"] for r in ds.records] == ["a", "b"]
    assert ds.metadata.class_names == ["bg", "cat", "dog"] and ds.metadata.evaluator == "sem_seg"
    np.testing.assert_array_equal(ds[0]["gt_sem_seg"][0], [0, 1, 2, 255])  # palette indices, not colours
    assert ds[0]["labels"].tolist() == [0, 1, 2]
    cfg = _cfg(num_classes=2, test={"name": "folder", "root": str(root), "split": "train",
                                    "options": {"classes": ["cat", "dog"], "reduce_zero_label": True}})
    np.testing.assert_array_equal(build_dataset(cfg, "test")[0]["gt_sem_seg"][0], [255, 0, 1, 255])


def test_folder_panoptic_variant(tmp_path):
    root = tmp_path / "pan"
    _save_rgb(root / "images/val/x.jpg", 4, 4)
    pan = np.array([[1, 1, 2, 2]] * 4)
    (root / "panoptic/val").mkdir(parents=True)
    Image.fromarray(id2rgb(pan)).save(root / "panoptic/val/x.png")
    (root / "panoptic/val.json").write_text(json.dumps({
        "annotations": [{"image_id": "x", "file_name": "x.png", "segments_info": [
            {"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0}]}],
        "categories": [{"id": 0, "name": "ground", "isthing": 0}, {"id": 1, "name": "ball", "isthing": 1}],
    }))
    cfg = _cfg(num_classes=2, mapper="panoptic", test={"name": "folder", "root": str(root), "split": "val"})
    ds = build_dataset(cfg, "test")
    assert ds.metadata.class_names == ["ground", "ball"] and ds.metadata.is_thing == [False, True]
    assert ds.metadata.evaluator == "sem_seg+panoptic"
    s = ds[0]
    assert s["labels"].tolist() == [0, 1] and s["gt_pan_seg"].tolist() == pan.tolist()


def test_mapillary_palette_with_ignore_65(tmp_path):
    root = tmp_path / "mapillary_vistas"
    _save_rgb(root / "validation/images/m.jpg", 3, 3)
    _save_label(root / "validation/labels/m.png", np.array([[0, 64, 65]] * 3), mode="P")
    cfg = _cfg(num_classes=65, test={"name": "mapillary_vistas_sem_seg", "root": str(root), "split": "val"})
    s = build_dataset(cfg, "test")[0]
    assert s["labels"].tolist() == [0, 64]


def test_coco_stuff_10k_layout(tmp_path):
    root = tmp_path / "coco_stuff_10k"
    _save_rgb(root / "images_detectron2/test/COCO_train2014_000000000077.jpg", 3, 3)
    _save_label(root / "annotations_detectron2/test/COCO_train2014_000000000077.png", np.full((3, 3), 170))
    rec = load_records("coco_stuff_10k_sem_seg", str(root), "val")  # val is the test split
    assert read_sample(rec[0], load_metadata("coco_stuff_10k_sem_seg"))["sem_seg"][0, 0] == 170


def test_num_classes_mismatch_is_clear(tmp_path):
    root = tmp_path / "f"
    _save_rgb(root / "images/train/a.png", 2, 2)
    _save_label(root / "masks/train/a.png", np.zeros((2, 2)))
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match="model.num_classes is 150 but dataset 'folder' has 2 classes"):
        build_dataset(config_from_dict({"data": {"train": {"name": "folder", "root": str(root)}}}), "train")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file, at the first touch
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def folder_root(tmp_path):
    root = tmp_path / "bad"
    for stem in ("a", "b", "c"):
        _save_rgb(root / f"images/train/{stem}.png", 6, 6)
        _save_label(root / f"masks/train/{stem}.png", np.ones((6, 6)))
    (root / "classes.txt").write_text("x\ny\n")
    return root


def _folder_ds(root, split="train", **data):
    return build_dataset(_cfg(num_classes=2, train={"name": "folder", "root": str(root)}, **data), split)


def test_missing_label_file(folder_root):
    (folder_root / "masks/train/b.png").unlink()
    ds = _folder_ds(folder_root)
    with pytest.raises(DatasetError, match=r"masks/train/b\.png: label file not found"):
        ds[1]


def test_truncated_image(folder_root):
    path = folder_root / "images/train/a.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"images/train/a\.png: cannot read image"):
        _folder_ds(folder_root)[0]


def test_label_out_of_range(folder_root):
    _save_label(folder_root / "masks/train/c.png", np.array([[0, 1, 7]] * 6 + [[0, 1, 7]] * 0).repeat(2, axis=1))
    with pytest.raises(DatasetError, match=r"masks/train/c\.png: label values 7 are outside \[0, 2\)"):
        _folder_ds(folder_root)[2]


def test_image_label_size_mismatch(folder_root):
    _save_label(folder_root / "masks/train/a.png", np.ones((5, 6)))
    with pytest.raises(DatasetError, match=r"masks/train/a\.png: label map is 6x5 but its image .*a\.png is 6x6"):
        _folder_ds(folder_root)[0]


def test_colour_label_png_refused(folder_root):
    _save_rgb(folder_root / "masks/train/a.png", 6, 6)
    with pytest.raises(DatasetError, match=r"a\.png: label map must be a single-channel image.*got mode 'RGB'"):
        _folder_ds(folder_root)[0]


def test_panoptic_json_errors(tmp_path):
    meta = load_metadata("coco_panoptic")
    root = tmp_path / "coco"
    ann = _write_coco_panoptic(root, "val", meta)
    cfg = _cfg(num_classes=133, mapper="panoptic", test={"name": "coco_panoptic", "root": str(root), "split": "val"})
    json_file = root / "annotations/panoptic_val2017.json"
    # A segment id that the PNG does not contain.
    ann["annotations"][0]["segments_info"].append({"id": 5, "category_id": 1, "iscrowd": 0})
    json_file.write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"000000000139\.png: segments \[5\] listed in the JSON are absent from the PNG"):
        build_dataset(cfg, "test")[0]
    # A segment referencing a PNG that does not exist.
    ann["annotations"][0]["segments_info"].pop()
    ann["annotations"][0]["file_name"] = "missing.png"
    json_file.write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"missing\.png: panoptic PNG file not found"):
        build_dataset(cfg, "test")[0]
    # An unknown category id fails when the JSON is read.
    ann["annotations"][0]["segments_info"][0]["category_id"] = 12345
    json_file.write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match=r"panoptic_val2017\.json: image 139: segment 1000 has category_id 12345"):
        build_dataset(cfg, "test")


def test_missing_dataset_directory_names_it(tmp_path):
    with pytest.raises(DatasetError, match=r"ADEChallengeData2016/images/training: directory not found"):
        load_records("ade20k_sem_seg", str(tmp_path / "ADEChallengeData2016"), "train")


def test_skip_bad_samples_counts_and_warns_once(folder_root):
    (folder_root / "masks/train/b.png").unlink()
    ds = _folder_ds(folder_root, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample: .*b\.png: label file not found"):
        sample = ds[(1, (3, 4))]
    assert sample["num_skipped"] >= 1 and sample["file_name"].endswith(("a.png", "c.png"))
    again = ds[(1, (3, 4))]  # deterministic replacement, no second warning for the same file
    assert again["file_name"] == sample["file_name"] and again["num_skipped"] == sample["num_skipped"]
    assert "num_skipped" not in ds[0]
    # Evaluation never skips silently.
    test_ds = build_dataset(_cfg(num_classes=2, test={"name": "folder", "root": str(folder_root), "split": "train"},
                                 skip_bad_samples=True), "test")
    with pytest.raises(DatasetError):
        test_ds[1]


def test_rgb2id_roundtrip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 300000]])
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)
