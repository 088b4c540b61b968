"""The paper's ADE20K ablation configs (configs/ablations/) and tools/compare_baselines.py."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from maskformer.config import config_to_dict, load_config
from maskformer.models.build import build_criterion, build_maskformer
from maskformer.models.matcher import FixedMatcher, HungarianMatcher
from maskformer.models.per_pixel import PerPixelBaseline, PerPixelBaselinePlus, PerPixelCriterion
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = REPO / "configs" / "ablations"
MAIN = REPO / "configs" / "ade20k-150" / "maskformer_R50_bs16_160k.yaml"
NO_DOWNLOAD = ["model.backbone.pretrained=false"]

# Parameters of the original's modules for ADE20K R50 (K = 150), computed from its definitions:
# backbone 23,454,912 (convs; FrozenBN has none) + FPN pixel decoder 7,540,480 + the head:
# 1x1 conv 256*150+150 = 38,550 (PerPixelBaseline); TransformerPredictor 10,259,351 with 100 queries,
# +256 per extra query, -38,807 without its class head (PerPixelBaseline+).
R50_MASKFORMER = 41_254_743

# file -> (the keys that differ from the main R50 config, model class, parameters, matcher, mask loss)
EXPECTED = {
    "per_pixel_baseline_R50_bs16_160k.yaml":
        ({"model.architecture", "model.size_divisibility"}, PerPixelBaseline, 31_033_942, None, None),
    "per_pixel_baseline_plus_R50_bs16_160k.yaml":
        ({"model.architecture", "model.num_queries", "model.size_divisibility"}, PerPixelBaselinePlus,
         41_228_736, None, None),
    "matching_fixed_q150_R50_bs16_160k.yaml":
        ({"model.num_queries", "loss.matcher"}, "MaskFormer", R50_MASKFORMER + 50 * 256, FixedMatcher, "focal"),
    "matching_bipartite_q150_R50_bs16_160k.yaml":
        ({"model.num_queries"}, "MaskFormer", R50_MASKFORMER + 50 * 256, HungarianMatcher, "focal"),
    "queries_20_R50_bs16_160k.yaml":
        ({"model.num_queries"}, "MaskFormer", R50_MASKFORMER - 80 * 256, HungarianMatcher, "focal"),
    "queries_50_R50_bs16_160k.yaml":
        ({"model.num_queries"}, "MaskFormer", R50_MASKFORMER - 50 * 256, HungarianMatcher, "focal"),
    "queries_100_R50_bs16_160k.yaml": (set(), "MaskFormer", R50_MASKFORMER, HungarianMatcher, "focal"),
    "queries_150_R50_bs16_160k.yaml":
        ({"model.num_queries"}, "MaskFormer", R50_MASKFORMER + 50 * 256, HungarianMatcher, "focal"),
    "loss_focal_dice_R50_bs16_160k.yaml": (set(), "MaskFormer", R50_MASKFORMER, HungarianMatcher, "focal"),
    "loss_bce_dice_R50_bs16_160k.yaml":
        ({"loss.mask_loss"}, "MaskFormer", R50_MASKFORMER, HungarianMatcher, "bce"),
}
# Paper / model-zoo numbers the reference gives (ADE20K-150 val, single scale).
ZOO_MIOU = {"per_pixel_baseline_R50": "39.2", "per_pixel_baseline_plus_R50": "41.9", "queries_100": "44.5",
            "loss_focal_dice": "44.5"}


def _flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("options", "kwargs"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_ablation_config_is_covered():
    assert sorted(p.name for p in ABLATIONS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_config_is_a_small_override_that_builds(name):
    changed, model_class, n_params, matcher, mask_loss = EXPECTED[name]
    path = ABLATIONS / name
    text = path.read_text()
    assert text.startswith("# Ablation"), "each file starts with a comment saying what it ablates"
    assert yaml.safe_load(text)["_base_"] == "../ade20k-150/maskformer_R50_bs16_160k.yaml"
    zoo = [v for k, v in ZOO_MIOU.items() if name.startswith(k)]
    if zoo:
        assert f"{zoo[0]} mIoU" in text
    else:  # no number invented where the reference has none
        assert "not in the project's reference" in text.replace("NOT", "not")

    cfg = load_config(path, NO_DOWNLOAD)
    main = load_config(MAIN, NO_DOWNLOAD)
    ours, theirs = _flat(config_to_dict(cfg)), _flat(config_to_dict(main))
    assert {k for k in ours if ours[k] != theirs[k]} == changed

    with torch.device("meta"):  # R50-sized: the structure is what matters, not the values
        model = build_maskformer(cfg)
    if isinstance(model_class, str):
        assert type(model).__name__ == model_class
    else:
        assert type(model) is model_class
    assert sum(p.numel() for p in model.parameters()) == n_params
    criterion = build_criterion(cfg)
    if matcher is None:
        assert isinstance(criterion, PerPixelCriterion) and criterion.ignore_label == 255
        assert not cfg.test.panoptic_on and not cfg.test.instance_on
    else:
        assert isinstance(criterion.matcher, matcher) and criterion.mask_loss == mask_loss
        if matcher is HungarianMatcher:
            assert criterion.matcher.mask_cost == mask_loss


# ------------------------------------------------------------------------------------------------
# tools/compare_baselines.py
# ------------------------------------------------------------------------------------------------

sys.path.insert(0, str(REPO / "tools"))
import compare_baselines  # noqa: E402

TINY_RUN = TINY_OVERRIDES + [
    "model.num_classes=7",
    "data.train.options={num_images: 8}",
    "data.test.options={num_images: 2}",
    "data.min_size_train=[64]",
    "data.max_size_train=64",
    "data.crop_size=[64,64]",
    "data.min_size_test=64",
    "data.max_size_test=64",
    "solver.ims_per_batch=2",
    "train.device=cpu",
]


def _write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_summary_row_from_a_finished_run(tmp_path):
    config = _write_config(tmp_path / "fixed.yaml", {"loss": {"matcher": "fixed"}})
    overrides = TINY_OVERRIDES + ["model.num_queries=4"] + compare_baselines.budget_overrides(40, 1)
    run = tmp_path / "runs" / "fixed"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "iter_0000040.json").write_text(json.dumps(
        {"sem_seg": {"mIoU": 61.5}, "panoptic_seg": {"PQ": 40.0, "PQ_th": 30.0, "PQ_st": 55.0}}))
    rows = [{"iteration": 1, "kind": "train", "time": 9.0, "data_time": 1.0, "total_loss": 5.0, "elapsed": 9},
            {"iteration": 20, "kind": "train", "time": 0.2, "data_time": 0.01, "total_loss": 3.0, "elapsed": 13},
            {"iteration": 40, "kind": "train", "time": 0.4, "data_time": 0.03, "total_loss": 2.5, "elapsed": 21},
            {"iteration": 40, "kind": "eval", "mIoU": 61.5, "elapsed": 22}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    row = compare_baselines.summarize_run(config, run, 40, overrides)
    assert row["status"] == "ok" and row["matcher"] == "fixed" and row["queries"] == 4
    assert (row["mIoU"], row["PQ"], row["PQ_th"], row["PQ_st"]) == (61.5, 40.0, 30.0, 55.0)
    assert row["seconds_per_iter"] == pytest.approx(0.3)  # median of the logged averages, start-up excluded
    assert row["final_loss"] == 2.5 and row["train_minutes"] == pytest.approx(21 / 60)
    assert row["parameters"] == sum(p.numel() for p in build_maskformer(load_config(config, overrides)).parameters())
    missing = compare_baselines.summarize_run(config, tmp_path / "runs" / "none", 40, overrides)
    assert missing["status"].startswith("no finished run")
    table = compare_baselines.markdown_table([row, missing])
    assert "| fixed | maskformer | fixed | 4 |" in table and "| 61.5 | 40.0 |" in table and "no finished run" in table


def test_compare_trains_each_config_with_the_same_budget(tmp_path, capsys):
    pixel = _write_config(tmp_path / "pixel.yaml", {"model": {"architecture": "per_pixel_baseline"}})
    fixed = _write_config(tmp_path / "fixed.yaml", {"loss": {"matcher": "fixed"}, "test": {"panoptic_on": True}})
    out = tmp_path / "out"
    code = compare_baselines.main(["--configs", str(pixel), str(fixed), "--max-iter", "2", "--output-dir", str(out),
                                   *TINY_RUN, "model.num_queries=7"])  # overrides apply to every run
    assert code == 0, capsys.readouterr()
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["pixel"]["status"] == rows["fixed"]["status"] == "ok"
    assert rows["pixel"]["PQ"] is None and rows["fixed"]["PQ"] is not None  # PQ only for mask classification
    assert rows["pixel"]["architecture"] == "per_pixel_baseline" and rows["fixed"]["matcher"] == "fixed"
    for name in ("pixel", "fixed"):  # the same budget for both
        saved = load_config(out / name / "config.yaml")
        assert (saved.solver.max_iter, saved.train.num_threads, saved.data.num_workers) == (2, 1, 0)
    assert "solver.max_iter=2" in report["budget_overrides"] and report["load_average"]["samples"] >= 1
    assert "| pixel | per_pixel_baseline |" in (out / "comparison.md").read_text()
    # A bad override is refused before anything runs.
    assert compare_baselines.main(["--configs", str(pixel), "--output-dir", str(out), "solver.max_itr=3"]) == 2
    assert "did you mean 'solver.max_iter'" in capsys.readouterr().err
