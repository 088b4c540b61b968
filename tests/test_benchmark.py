"""tools/benchmark.py and tools/analyze_model.py: FLOP counting against hand computations, the
benchmark's measurements, summary and CLI on tiny models, and the fp32-vs-bf16 agreement check."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from maskformer.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from maskformer.config import config_to_dict, save_config
from maskformer.data import build_test_loader, get_metadata
from maskformer.models.build import build_maskformer
from tests.conftest import tiny_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load_tool(name):
    sys.path.insert(0, str(TOOLS))  # benchmark imports analyze_model as a sibling
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


analyze_tool = _load_tool("analyze_model")
bench = _load_tool("benchmark")

# A backbone of timm's test zoo with the paper's head: builds and runs in well under a second.
TINY = dict(backbone="test_resnet", size=(64, 64), num_classes=4, num_queries=8, batch=2, num_masks=3, threads=1,
            warmup=0, runs=1)


# ------------------------------------------------------------------------------------------------
# FLOPs (fvcore convention)
# ------------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 40)

    def forward(self, x):  # x [2, 3, 10, 12]
        y = self.norm(self.conv(x))  # [2, 8, 10, 12]
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)  # [2, 8, 20, 24]
        y = F.interpolate(y, size=(30, 36), mode="nearest")  # [2, 8, 30, 36]
        z = self.fc(y.mean((2, 3))).view(2, 5, 8)  # [2, 5, 8]
        return torch.einsum("bkc,bchw->bkhw", z, y[:, :, :4, :4])  # [2, 5, 4, 4]


def test_flop_counter_equals_a_hand_computation():
    model = _Tiny().requires_grad_(False)
    total, per_module = analyze_tool.count_flops(lambda: model(torch.randn(2, 3, 10, 12)))
    conv = 2 * 8 * 10 * 12 * (3 * 3 * 3)  # one multiply-add per output element and kernel tap
    norm = 5 * (2 * 8 * 10 * 12)  # fvcore: 5 per element with an affine transform
    bilinear = 4 * (2 * 8 * 20 * 24)  # 4 per output element
    nearest = 1 * (2 * 8 * 30 * 36)
    linear = 2 * 8 * 40
    einsum = 2 * 5 * 8 * 4 * 4  # batch x k x contracted c x h x w
    assert total == conv + norm + bilinear + nearest + linear + einsum
    assert per_module["_Tiny.conv"] == conv and per_module["_Tiny.fc"] == linear


def test_flop_counter_counts_cpu_attention():
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, 4, 6, 8)
    total, _ = analyze_tool.count_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert total == 2 * (2 * 4 * 10 * 6 * 8)  # q @ k^T and attn @ v


def test_original_swin_padding_flops_by_hand():
    from maskformer.models.swin import SwinTransformer

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = SwinTransformer(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=7)

    # 64 / 4 = 16 -> padded to 21 (stage 1, C=8); 8 -> 14 (stage 2, C=16). Per padding token:
    # qkv (C x 3C) + proj (C x C) multiply-adds.
    expected = (21 * 21 - 16 * 16) * 4 * 8 * 8 + (14 * 14 - 8 * 8) * 4 * 16 * 16
    assert analyze_tool.original_swin_padding_flops(Wrapper(), torch.zeros(1, 3, 64, 64)) == expected


def test_analyze_model_on_a_tiny_config(tmp_path, capsys):
    cfg = tiny_config("data.crop_size=[64,64]")
    config_file = tmp_path / "tiny.yaml"
    save_config(cfg, config_file)
    assert analyze_tool.main([str(config_file), "model.num_queries=6", "--json", str(tmp_path / "a.json")]) == 0
    result = json.loads((tmp_path / "a.json").read_text())
    out = capsys.readouterr().out
    assert result["size"] == [64, 64] and "paper protocol" in out and "pixel_decoder" in out

    model = build_maskformer(tiny_config("model.num_queries=6"))
    params = result["parameters"]
    assert params[""] == sum(p.numel() for p in model.parameters())
    assert params["predictor.query_embed"] == 6 * 32
    assert params["backbone"] + params["pixel_decoder"] + params["predictor"] == params[""]
    flops = result["flops"]
    assert sum(flops["modules"].values()) == flops["network"]
    assert flops["original_swin_padding"] == 0 and flops["paper_protocol"] == flops["this_implementation"]
    # semantic post-processing: 4x upsampling of Q masks, the [K,H,W] einsum, the same-size resize
    q, k, hw = 6, 4, 64 * 64
    assert flops["postprocess"] == 4 * q * hw + q * k * hw + 4 * k * hw
    # the auxiliary layer's masks (dec_layers=2): its mask MLP and einsum at 16x16
    assert flops["aux_masks"] > q * 32 * 16 * 16


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------


def test_parse_variant():
    assert bench.parse_variant("fp32") == {"amp": "off", "channels_last": False, "num_points": 0,
                                           "grad_checkpointing": False, "cpu_linear": "onednn",
                                           "cpu_channels_last": True}
    assert bench.parse_variant("bf16-cl-p12544") == {"amp": "bf16", "channels_last": True, "num_points": 12544,
                                                     "grad_checkpointing": False, "cpu_linear": "onednn",
                                                     "cpu_channels_last": True}
    assert bench.parse_variant("fp32-p12544-gc")["grad_checkpointing"]
    assert bench.parse_variant("fp32-blas")["cpu_linear"] == "blas"
    assert bench.parse_variant("fp32-nchw")["cpu_channels_last"] is False
    with pytest.raises(ValueError, match="unknown part"):
        bench.parse_variant("fp32-x")
    with pytest.raises(ValueError, match="must start with"):
        bench.parse_variant("int8")


def test_linear_kernels_table(monkeypatch):
    monkeypatch.setattr(bench, "LINEAR_SIZES", [(64, 8, 12, "small"), (5, 16, 4, "tiny")])
    lines = []
    rows = bench.linear_kernels(log=lines.append, warmup=1, runs=2)
    assert [r["layer"] for r in rows] == ["small", "tiny"]
    for row in rows:
        assert all(row[f"{k}_{t}_ms"] > 0 for k in ("blas", "onednn") for t in ("forward", "train"))
    assert len(lines) == 4 and lines[2].startswith("| small | 64 x 8 -> 12 |")


def test_random_targets_are_non_overlapping_and_cover_the_image():
    targets = bench.random_targets(2, 5, 10, (16, 20), "cpu")
    for t in targets:
        assert t["masks"].shape == (5, 16, 20) and t["labels"].shape == (5,)
        assert torch.equal(t["masks"].sum(0), torch.ones(16, 20))


def test_train_job_of_this_project_measures_the_step_and_the_matcher():
    result = bench.run_job(bench.Job(side="fp32", task="train", **TINY))
    assert result["seconds"] > 0 and len(result["times"]) == 1
    assert 0 < result["matcher_s"] < result["seconds"]
    assert result["peak_mem_mib"] >= result["rss_built_mib"] > 0
    assert {"cpu_util", "others_cores", "loadavg_before"} <= set(result)


def test_infer_job_counts_flops_like_analyze_model():
    result = bench.run_job(bench.Job(side="bf16-cl", task="infer", **TINY))
    model = build_maskformer(bench.paper_config("test_resnet", 4, 8)).eval().requires_grad_(False)
    expected, _ = analyze_tool.count_flops(lambda: model(torch.zeros(1, 3, 64, 64)))
    assert result["gflops"] == pytest.approx(expected / 1e9, abs=1e-3)
    assert result["params"] == sum(p.numel() for p in model.parameters())


def test_hugging_face_jobs_use_the_same_configuration():
    pytest.importorskip("transformers")
    model = bench.hf_model("r50", num_classes=4, num_queries=8)
    assert model.model.transformer_module.queries_embedder.weight.shape == (8, 256)
    assert model.class_predictor.out_features == 5
    job = dict(TINY, backbone="r50", size=(32, 32))
    result = bench.run_job(bench.Job(side="hf", task="train", **job))
    assert 0 < result["matcher_s"] < result["seconds"]
    infer = bench.run_job(bench.Job(side="hf", task="infer", **job))
    assert infer["params"] == sum(p.numel() for p in bench.hf_model("r50", 4, 8, aux=False).parameters())


def test_summary_ratios_and_table():
    def run(side, task, times, peak, matcher=None):
        r = {"side": side, "task": task, "times": times, "peak_mem_mib": peak, "params": 10_000_000,
             "others_cores": 0.1, "loadavg_before": 0.5}
        if matcher is not None:
            r["matcher_times"] = matcher
        return r

    results = [run("hf", "infer", [1.0, 1.2, 0.8], 1000), run("hf", "train", [4.0, 4.0], 4000, [1.0, 1.0]),
               run("fp32", "infer", [0.5, 0.6, 0.4], 900), run("fp32", "train", [2.0, 3.0, 2.5], 2000, [0.1] * 3)]
    summary = bench.summarize(results, ["hf", "fp32"])
    ours = summary["fp32"]
    assert ours["infer_s_vs_hf"] == pytest.approx(0.5)
    assert ours["train_s_vs_hf"] == pytest.approx(2.5 / 4.0)
    assert ours["train_peak_mib_vs_hf"] == pytest.approx(0.5)
    assert ours["matcher_share"] == pytest.approx(0.1 / 2.5)
    table = bench.format_table(summary, "title")
    assert "| ours fp32 |" in table and "0.62" in table and "4.0%" in table


def test_cli_runs_each_measurement_in_a_subprocess(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--no-hf", "--backbone", "test_resnet", "--size", "64", "64", "--num-classes", "4",
                     "--num-queries", "8", "--num-masks", "3", "--threads", "1", "--warmup", "0", "--runs", "1",
                     "--train-runs", "1", "--tasks", "train", "--variants", "fp32,fp32-p64", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["side"] for r in data["runs"]] == ["fp32", "fp32-p64"]
    assert set(data["summary"]) == {"fp32", "fp32-p64"} and data["environment"]["threads"] == 1
    assert "| ours fp32-p64 |" in capsys.readouterr().out


def test_precision_agreement_of_a_checkpoint(tmp_path):
    cfg = tiny_config("model.num_classes=7", "data.test.split=val", f"data.test.root={tmp_path / 'data'}",
                      "data.test.options={num_images: 2, image_size: 64}", "data.num_workers=0",
                      "data.min_size_test=64", "data.max_size_test=64")
    model = build_maskformer(cfg)
    result = bench.precision_agreement(model, build_test_loader(cfg), get_metadata(cfg, "test"), cfg.test,
                                       torch.device("cpu"), ["fp32-cl", "bf16"])
    # channels_last alone changes only summation order: the labels agree (up to rare near-ties)
    assert result["fp32-cl"]["pixel_agreement"] > 0.99 and result["fp32-cl"]["images"] == 2
    assert 0.0 < result["bf16"]["pixel_agreement"] <= 1.0
    assert result["bf16"]["mIoU_fp32"] == result["fp32-cl"]["mIoU_fp32"]

    ckpt = tmp_path / "last.pth"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config_to_dict(cfg),
                     "iteration": 0}, ckpt)
    save_config(cfg, tmp_path / "c.yaml")
    out = tmp_path / "agree.json"
    assert bench.main(["--agreement", str(tmp_path / "c.yaml"), "--weights", str(ckpt), "--threads", "1",
                       "--json", str(out)]) == 0
    agreement = json.loads(out.read_text())["agreement"]["bf16-cl"]
    assert agreement["images"] == 2 and 0.0 < agreement["pixel_agreement"] <= 1.0


def test_disturbed_measurements_are_taken_again(monkeypatch):
    others = iter([1.5, 0.9, 0.05, 0.1])

    def fake_spawn(job, timeout):
        return {"side": job.side, "task": job.task, "seconds": 1.0, "times": [1.0], "cpu_times": [1.0],
                "peak_mem_mib": 1.0, "loadavg_before": 0.0, "cpu_util": 1.0, "others_cores": next(others)}

    monkeypatch.setattr(bench, "_spawn", fake_spawn)
    jobs = [bench.Job(side="hf", task="infer"), bench.Job(side="fp32", task="infer")]
    results = bench.compare(jobs, retries=2, noisy_above=0.25, log=lambda s: None)
    assert [r["others_cores"] for r in results] == [0.05, 0.1]  # hf: third attempt; fp32: first
    assert [r["attempts"] for r in results] == [3, 1]
