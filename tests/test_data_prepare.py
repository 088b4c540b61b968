"""Preparation scripts on tiny raw fixtures, read back through the real loaders; idempotence."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from maskformer.data import load_metadata, load_records, read_sample
from maskformer.data.io import id2rgb, read_panoptic

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "datasets"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rgb(path: Path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _gray(path: Path, arr, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr).astype(dtype)).save(path)


def test_prepare_ade20k_sem_seg_and_idempotence(tmp_path, capsys):
    root = tmp_path / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train_1"), ("validation", "ADE_val_1")):
        _rgb(root / f"images/{split}/{stem}.jpg", 4, 4)
        _gray(root / f"annotations/{split}/{stem}.png", [[0, 1, 150, 2]] * 4)
    script = _script("prepare_ade20k_sem_seg")
    assert script.main(["--root", str(root), "--no-progress"]) == 0
    assert "wrote 1 file in" in capsys.readouterr().out
    out = np.asarray(Image.open(root / "annotations_detectron2/training/ADE_train_1.png"))
    np.testing.assert_array_equal(out[0], [255, 0, 149, 1])
    assert script.main(["--root", str(root), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    data = read_sample(load_records("ade20k_sem_seg", str(root), "val")[0], load_metadata("ade20k_sem_seg"))
    np.testing.assert_array_equal(data["sem_seg"][0], [255, 0, 149, 1])


def test_prepare_ade20k_full(tmp_path):
    root = tmp_path / "ADE20K_2021_17_01"
    img = root / "images/ADE/validation/urban/street/ADE_val_00000001.jpg"
    _rgb(img, 6, 4)
    seg = np.zeros((6, 4, 3), dtype=np.uint8)
    # wall (ADE id 2978 = 11*256 + 162 -> R in [110,119], G = 162) on the left, an unknown id on the right.
    seg[:, :2] = (115, 162, 0)
    seg[:, 2:] = (10, 5, 0)
    Image.fromarray(seg).save(img.with_name("ADE_val_00000001_seg.png"))
    _script("prepare_ade20k_full").main(["--root", str(root), "--no-progress"])
    meta = load_metadata("ade20k_full_sem_seg")
    data = read_sample(load_records("ade20k_full_sem_seg", str(root), "val")[0], meta)
    assert (data["sem_seg"][:, :2] == 0).all() and (data["sem_seg"][:, 2:] == 65535).all()


def test_prepare_coco_stuff_10k_from_mat(tmp_path):
    root = tmp_path / "coco_stuff_10k"
    (root / "imageLists").mkdir(parents=True)
    (root / "imageLists/train.txt").write_text("COCO_train2014_000000000009\n")
    (root / "imageLists/test.txt").write_text("COCO_train2014_000000000025\n")
    for name in ("COCO_train2014_000000000009", "COCO_train2014_000000000025"):
        _rgb(root / f"images/{name}.jpg", 3, 5)
        (root / "annotations").mkdir(exist_ok=True)
        savemat(root / f"annotations/{name}.mat", {"S": np.array([[1, 2, 3, 172, 2]] * 3, dtype=np.uint16)})
    assert _script("prepare_coco_stuff_10k").main(["--root", str(root), "--no-progress"]) == 0
    data = read_sample(load_records("coco_stuff_10k_sem_seg", str(root), "train")[0], load_metadata("coco_stuff_10k_sem_seg"))
    np.testing.assert_array_equal(data["sem_seg"][0], [255, 0, 1, 170, 0])


def test_prepare_coco_panoptic_semseg(tmp_path):
    root = tmp_path / "coco"
    pan = np.array([[1, 1, 2], [3, 3, 0]])
    (root / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(id2rgb(pan)).save(root / "panoptic_val2017/1.png")
    (root / "annotations").mkdir()
    (root / "annotations/panoptic_val2017.json").write_text(json.dumps({"annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": [
        {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 200, "iscrowd": 0}, {"id": 3, "category_id": 1, "iscrowd": 1}]}]}))
    assert _script("prepare_coco_panoptic_semseg").main(["--root", str(root), "--no-progress"]) == 0
    sem = np.asarray(Image.open(root / "panoptic_semseg_val2017/1.png"))
    np.testing.assert_array_equal(sem, [[0, 0, 132], [0, 0, 255]])


def test_prepare_cityscapes_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    _rgb(root / "leftImg8bit/train/bonn/bonn_000000_000019_leftImg8bit.png", 2, 4)
    _gray(root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png", [[7, 26, 33, 0], [1, 23, 24, 4]])
    assert _script("prepare_cityscapes").main(["--root", str(root), "--no-progress"]) == 0
    data = read_sample(load_records("cityscapes_sem_seg", str(root), "train")[0], load_metadata("cityscapes_sem_seg"))
    np.testing.assert_array_equal(data["sem_seg"], [[0, 13, 18, 255], [255, 10, 11, 255]])


def test_prepare_ade20k_panoptic(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    meta = load_metadata("ade20k_panoptic")
    bed = meta.class_names.index("bed")  # a thing (index 7)
    for split, stem in (("training", "ADE_train_1"), ("validation", "ADE_val_1")):
        _rgb(root / f"images/{split}/{stem}.jpg", 4, 4)
        _gray(root / f"annotations/{split}/{stem}.png", [[1, 1, 3, 3]] * 3 + [[0, 0, 3, 3]])  # wall, sky, other
        inst = np.zeros((4, 4, 3), dtype=np.uint8)
        inst[1:3, 1:3] = (5, 1, 0)  # instance class 5 (1-based) -> semantic 8 (1-based) = bed
        _gray(root / f"annotations_instance/{split}/{stem}.png", inst)
    mapping = tmp_path / "catid_mapping.txt"
    mapping.write_text("Instacne100 SceneParsing150 FullADE20K\n5 8 bed\n")
    assert _script("prepare_ade20k_panoptic").main(["--root", str(root), "--catid-mapping", str(mapping), "--no-progress"]) == 0
    rec = load_records("ade20k_panoptic", str(root), "val")[0]
    data = read_sample(rec, meta)
    cats = {s["id"]: s["category_id"] for s in data["segments_info"]}
    assert sorted(cats.values()) == [0, 2, bed]
    pan = read_panoptic(rec["pan_seg_file_name"])
    assert cats[pan[1, 1]] == bed and cats[pan[0, 0]] == 0 and pan[3, 0] == 0
    assert data["sem_seg"][3, 0] == 255 and data["sem_seg"][1, 2] == bed


def test_missing_raw_data_is_a_clear_error(tmp_path, capsys):
    assert _script("prepare_cityscapes").main(["--root", str(tmp_path), "--no-progress"]) == 1
    assert "gtFine: no *_gtFine_labelIds.png found" in capsys.readouterr().err


def test_check_dataset_reports_counts_and_bad_samples(tmp_path, capsys):
    root = tmp_path / "mine"
    for stem, label in (("a", [[0, 0, 1, 1]] * 2), ("b", [[0, 5, 1, 1]] * 2)):
        _rgb(root / f"images/train/{stem}.png", 2, 4)
        _gray(root / f"masks/train/{stem}.png", label)
    (root / "classes.txt").write_text("road\ncar\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{num_classes: 2}}\ndata:\n  train: {{name: folder, root: {root}}}\n")
    spec = importlib.util.spec_from_file_location("check_dataset", TOOLS.parent / "check_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(config), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 samples, 2 classes" in out and "1 bad sample(s):" in out
    assert "masks/train/b.png: label values 5 are outside [0, 2)" in out
    assert "   0  road                                50.000       1" in out  # 4 of 8 pixels of the one good image
    (root / "masks/train/b.png").unlink()
    _gray(root / "masks/train/b.png", [[0, 0, 1, 1]] * 2)
    assert tool.main([str(config), "--no-progress"]) == 0 and "no bad samples" in capsys.readouterr().out
