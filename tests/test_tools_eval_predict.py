"""tools/eval.py and tools/predict.py end to end on a tiny checkpoint and the shapes dataset."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from maskformer.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from maskformer.config import config_to_dict, save_config
from maskformer.data import build_test_loader, get_metadata
from maskformer.data.io import rgb2id
from maskformer.data.shapes import generate_shapes_image
from maskformer.engine.evaluate import evaluate
from maskformer.models.build import build_maskformer
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_tool = _load_tool("eval")
predict_tool = _load_tool("predict")


def _write_run(root: Path, *overrides: str, name="run"):
    """A config file and an (untrained) checkpoint at <root>/<name>/checkpoints/last.pth."""
    cfg = tiny_config("model.num_classes=7", "data.test.split=val", f"data.test.root={root / 'data'}",
                      "data.test.options={num_images: 5, image_size: 64}", "data.num_workers=0",
                      "data.min_size_test=64", "data.max_size_test=64", "train.device=cpu", *overrides)
    torch.manual_seed(0)
    model = build_maskformer(cfg)
    ckpt = root / name / "checkpoints" / "last.pth"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config_to_dict(cfg),
                     "iteration": 0}, ckpt)
    config_file = root / f"{name}.yaml"
    save_config(cfg, config_file)
    return cfg, model, config_file, ckpt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    cfg, model, config_file, ckpt = _write_run(root)
    return {"root": root, "cfg": cfg, "model": model, "config": str(config_file), "ckpt": str(ckpt)}


def _in_range(values):
    return all(v is None or 0.0 <= v <= 100.0 for v in values)


# ------------------------------------------------------------------------------------------------
# tools/eval.py
# ------------------------------------------------------------------------------------------------


def test_eval_writes_results_table_and_coco_panoptic_predictions(run, capsys):
    rc = eval_tool.main(["--config", run["config"], "--weights", run["ckpt"], "--save-panoptic", "--no-progress"])
    assert rc == 0
    out_dir = run["root"] / "run" / "eval"  # default: next to the run's checkpoints folder
    results = json.loads((out_dir / "results.json").read_text())
    assert results["images"] == 5 and results["inference"] == "default" and results["dataset"] == "shapes"
    for key in ("mIoU", "fwIoU", "mACC", "pACC", "PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert key in results["headline"]
    assert _in_range(results["sem_seg"].values()) and _in_range(results["panoptic_seg"].values())
    assert {f"IoU-{c}" for c in ("sky", "grass", "floor", "circle")} <= set(results["sem_seg"])
    # the tool reports what evaluate() computes on the same model and data
    cfg = run["cfg"]
    direct = evaluate(run["model"], build_test_loader(cfg), get_metadata(cfg, "test"), cfg.test,
                      torch.device("cpu"), progress=False)
    assert results["sem_seg"]["mIoU"] == pytest.approx(direct["sem_seg"]["mIoU"])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "PQ" in printed and "triangle" in printed and "results.json" in printed

    predictions = json.loads((out_dir / "panoptic_predictions.json").read_text())["annotations"]
    assert len(predictions) == 5
    for ann in predictions:
        png = out_dir / "panoptic_predictions" / ann["file_name"]
        ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
        assert ids.shape == (64, 64)
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        assert all(0 <= s["category_id"] < 7 for s in ann["segments_info"])


def test_eval_with_tta_into_an_output_dir(run, tmp_path):
    rc = eval_tool.main(["--config", run["config"], "--weights", run["ckpt"], "--tta", "--output-dir",
                         str(tmp_path / "tta"), "--no-progress", "test.aug.min_sizes=[48,64]", "test.aug.max_size=128"])
    assert rc == 0
    results = json.loads((tmp_path / "tta" / "results.json").read_text())
    assert results["inference"] == "tta" and results["images"] == 5
    assert "panoptic_seg" not in results and _in_range(results["sem_seg"].values())


def test_eval_errors_name_the_file_or_keys(run, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert eval_tool.main(["--config", run["config"], "--weights", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err

    # the config asks for 16 queries, the checkpoint has 8
    rc = eval_tool.main(["--config", run["config"], "--weights", run["ckpt"], "model.num_queries=16"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "predictor.query_embed.weight" in err and "(8, 32)" in err and "(16, 32)" in err
    assert "model.num_queries=8 (this config: 16)" in err

    nowhere = tmp_path / "no_dataset"
    no_data = tmp_path / "no_data.yaml"
    data = yaml.safe_load(Path(run["config"]).read_text())
    data["data"]["test"] = {"name": "folder", "root": str(nowhere), "split": "val"}
    no_data.write_text(yaml.safe_dump(data))
    rc = eval_tool.main(["--config", str(no_data), "--weights", run["ckpt"]])
    err = capsys.readouterr().err
    assert rc == 1 and str(nowhere) in err

    assert eval_tool.main(["--config", run["config"], "--weights", run["ckpt"], "test.num_querys=3"]) == 2
    assert "test.num_querys" in capsys.readouterr().err
    rc = eval_tool.main(["--config", run["config"], "--weights", run["ckpt"], "--tta", "--sliding-window"])
    assert rc == 2 and "at most one" in capsys.readouterr().err


def test_default_output_dir():
    assert eval_tool.default_output_dir(Path("/r/run1/checkpoints/best.pth"), "c/x.yaml") == Path("/r/run1/eval")
    assert eval_tool.default_output_dir(Path("/dl/model.pth"), "configs/a/b.yaml") == Path("outputs/eval-b")


# ------------------------------------------------------------------------------------------------
# tools/predict.py
# ------------------------------------------------------------------------------------------------


def _inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Two readable images of different, non-square sizes, a corrupt one and a non-image file."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, (h, w) in enumerate([(48, 80), (70, 52)]):
        image = generate_shapes_image(1, "val", i, 96)[0][:h, :w]
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"img{i}.png")
        sizes[f"img{i}"] = (h, w)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return sizes


def _predict(run, *args):
    return predict_tool.main(["--config", run["config"], "--weights", run["ckpt"], *args])


def test_predict_semantic_writes_overlays_and_label_pngs_and_skips_unreadable(run, tmp_path, capsys):
    sizes = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(run, "--input", str(tmp_path / "in"), "--output", str(out)) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "cannot read image" in captured.err
    assert "notes.txt" not in captured.err
    assert "wrote 2 of 3" in captured.out
    for stem, (h, w) in sizes.items():
        sem = np.asarray(Image.open(out / f"{stem}_sem.png"))
        assert sem.shape == (h, w) and sem.dtype == np.uint8 and sem.max() < 7
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png").convert("RGB"))
        assert overlay.shape[0] > h and overlay.shape[1] >= w  # legend strip below
        original = np.asarray(Image.open(tmp_path / "in" / f"{stem}.png").convert("RGB"))
        assert np.abs(overlay[:h, :w].astype(int) - original).mean() > 5
        # the label map is what model.predict gives for the file
        expected = run["model"].predict(tmp_path / "in" / f"{stem}.png").sem_seg.numpy()
        assert np.array_equal(sem, expected)
    assert not list(out.glob("broken*"))


def test_predict_panoptic_json_matches_png(run, tmp_path):
    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(run, "--input", str(tmp_path / "in" / "img*.png"), "--output", str(out), "--task", "panoptic",
                    "--legend", "right") == 0
    for stem in ("img0", "img1"):
        info = json.loads((out / f"{stem}_pan.json").read_text())
        ids = rgb2id(np.asarray(Image.open(out / info["file_name"]).convert("RGB")))
        assert ids.shape == (info["height"], info["width"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in info["segments_info"]}
        for s in info["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum()) > 0
            assert s["name"] == ["sky", "grass", "floor", "circle", "square", "triangle", "cross"][s["contiguous_id"]]
            assert s["isthing"] == (s["contiguous_id"] >= 3)


def test_predict_instance_json_matches_png(run, tmp_path):
    from pycocotools import mask as mask_utils

    _inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(run, "--input", str(tmp_path / "in" / "img0.png"), "--output", str(out), "--task", "instance",
                    "--score-threshold", "0") == 0
    info = json.loads((out / "img0_inst.json").read_text())
    ids = np.asarray(Image.open(out / "img0_inst.png")).astype(np.int64)
    assert ids.shape == (48, 80) and info["instances"]
    assert set(np.unique(ids).tolist()) - {0} == {d["id"] for d in info["instances"]}
    scores = [d["score"] for d in info["instances"]]
    assert all(0 <= s <= 1 for s in scores)
    for d in info["instances"]:
        full = mask_utils.decode({"size": d["segmentation"]["size"], "counts": d["segmentation"]["counts"].encode()})
        visible = ids == d["id"]
        assert visible.sum() == d["area"] and full[visible].all() and full.sum() >= d["area"]
        assert d["contiguous_id"] >= 3  # shapes: instances are things only


def test_predict_exit_status_when_nothing_is_processed(run, tmp_path, capsys):
    assert _predict(run, "--input", str(tmp_path / "*.nothing"), "--output", str(tmp_path / "o")) == 1
    assert "no input image matched" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert _predict(run, "--input", str(tmp_path / "bad.png"), "--output", str(tmp_path / "o")) == 1
    assert "bad.png" in capsys.readouterr().err
    assert _predict(run, "--input", str(tmp_path / "bad.png"), "--output", str(tmp_path / "o"), "--weights",
                    str(tmp_path / "missing.pth")) == 1


def test_predict_writes_uint16_labels_for_more_than_255_classes(tmp_path):
    cfg, model, config_file, ckpt = _write_run(tmp_path, "model.num_classes=300", name="big")
    with torch.no_grad():  # make the top classes win so ids above 255 really occur
        model.predictor.class_embed.bias.zero_()
        model.predictor.class_embed.bias[256:300] = 10.0
    torch.save({"model": model.state_dict()}, ckpt)
    image = tmp_path / "x.png"
    Image.fromarray(generate_shapes_image(0, "val", 0, 64)[0]).save(image)
    rc = predict_tool.main(["--config", str(config_file), "--weights", str(ckpt), "--input", str(image),
                            "--output", str(tmp_path / "o")])
    assert rc == 0
    sem = np.asarray(Image.open(tmp_path / "o" / "x_sem.png"))
    assert sem.dtype == np.uint16 and sem.shape == (64, 64) and sem.min() >= 256 and sem.max() < 300


def test_eval_under_torchrun_equals_one_process(run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--config", run["config"], "--weights", run["ckpt"], "--no-progress", "--save-panoptic",
              "test.panoptic_on=true", "train.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(REPO / "tools" / "eval.py"), *common,
                           "--output-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    assert eval_tool.main(common + ["--output-dir", str(tmp_path / "one")]) == 0
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ddp["world_size"] == 2 and ddp["images"] == one["images"] == 5
    assert ddp["sem_seg"] == one["sem_seg"] and ddp["panoptic_seg"] == one["panoptic_seg"]
    ids = [json.loads((tmp_path / d / "panoptic_predictions.json").read_text())["annotations"] for d in ("ddp", "one")]
    assert sorted(a["image_id"] for a in ids[0]) == sorted(a["image_id"] for a in ids[1])
