"""Per-pixel baselines (PerPixelBaseline, PerPixelBaseline+) and fixed matching: outputs, losses, inference,
training."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from maskformer.config import ConfigError, load_config
from maskformer.engine.trainer import train
from maskformer.inference import postprocess
from maskformer.models.build import build_criterion, build_maskformer
from maskformer.models.matcher import FixedMatcher, HungarianMatcher
from maskformer.models.per_pixel import (ClassQueryPredictor, PerPixelBaseline, PerPixelBaselinePlus,
                                         PerPixelCriterion, c2_msra_fill)
from tests.conftest import TINY_TRAINING, tiny_config

REPO = Path(__file__).resolve().parents[1]
K = 4  # tiny_config's num_classes
BASELINE = ("model.architecture=per_pixel_baseline",)
PLUS = ("model.architecture=per_pixel_baseline_plus", f"model.num_queries={K}")


def _label_maps(batch=2, size=(64, 64), ignore=255, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (batch, *size), generator=g)
    labels[:, :5] = ignore  # an unlabeled band
    labels[0, :, -7:] = ignore  # crop padding of the first image
    return labels


def _semantic_targets(labels, ignore=255):
    targets = []
    for sem in labels:
        classes = sem[sem != ignore].unique()
        targets.append({"labels": classes, "masks": (sem[None] == classes[:, None, None]).float(), "sem_seg": sem})
    return targets


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def test_baseline_outputs_class_logits_at_stride_4_from_a_1x1_conv():
    model = build_maskformer(tiny_config(*BASELINE)).train()
    assert isinstance(model, PerPixelBaseline) and model.num_classes == K
    conv = model.predictor
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv.in_channels == model.pixel_decoder.mask_dim and conv.out_channels == K
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"pred_sem_seg"} and out["pred_sem_seg"].shape == (2, K, 16, 24)
    # The head is exactly the 1x1 conv applied to the pixel decoder's stride-4 embeddings.
    features, _ = model.pixel_decoder(model.backbone(torch.ones(1, 3, 64, 64)))
    expected = F.conv2d(features, conv.weight, conv.bias)
    torch.testing.assert_close(model(torch.ones(1, 3, 64, 64))["pred_sem_seg"], expected)


def test_c2_msra_fill_is_kaiming_normal_fan_out_with_zero_bias():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 400, kernel_size=1)
    c2_msra_fill(conv)
    assert torch.count_nonzero(conv.bias) == 0
    # fan_out = 400 * 1 * 1, ReLU gain sqrt(2): std = sqrt(2 / 400) (fan_in would give sqrt(2 / 64)).
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.05)
    assert conv.weight.mean().abs().item() < 0.01


def test_baseline_plus_has_one_query_per_class_and_no_class_head():
    model = build_maskformer(tiny_config(*PLUS, "model.dec_layers=3")).train()
    assert isinstance(model, PerPixelBaselinePlus) and isinstance(model.predictor, ClassQueryPredictor)
    assert model.predictor.query_embed.num_embeddings == K and model.num_classes == K
    assert not hasattr(model.predictor, "class_embed")
    assert not any("class_embed" in k for k in model.state_dict())
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred_sem_seg"].shape == (2, K, 16, 16)
    assert len(out["aux_outputs"]) == 2 and all(a["pred_sem_seg"].shape == (2, K, 16, 16) for a in out["aux_outputs"])
    assert "aux_outputs" not in model.eval()(torch.randn(1, 3, 64, 64))  # evaluation skips the auxiliary maps
    with pytest.raises(ValueError, match="one query per class"):
        ClassQueryPredictor(in_channels=8, num_classes=3, num_queries=5, hidden_dim=8, nheads=2, mask_dim=8)


def test_baseline_plus_scores_are_mask_embeddings_dot_pixel_embeddings():
    model = build_maskformer(tiny_config(*PLUS)).eval()
    x = torch.randn(1, 3, 64, 64)
    features = model.backbone(x)
    mask_features, _ = model.pixel_decoder(features)
    p = model.predictor
    pos = p.pe_layer(features["res5"]).flatten(2).transpose(1, 2)
    memory = p.input_proj(features["res5"]).flatten(2).transpose(1, 2)
    query_pos = p.query_embed.weight[None]
    hs = p.decoder(torch.zeros_like(query_pos), memory, pos, query_pos, all_layers=False)[-1]  # [1, K, C]
    expected = torch.einsum("bkc,bchw->bkhw", p.mask_embed(hs), mask_features)
    torch.testing.assert_close(model(x)["pred_sem_seg"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", [BASELINE, PLUS], ids=["baseline", "baseline_plus"])
def test_every_parameter_gets_a_gradient(arch):
    cfg = tiny_config(*arch)
    model, criterion = build_maskformer(cfg).train(), build_criterion(cfg)
    labels = _label_maps()
    losses = criterion(model(torch.randn(2, 3, 64, 64)), _semantic_targets(labels))
    criterion.total_loss(losses).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # As in DETR/MaskFormer, the first decoder layer's self-attention sees all-zero queries (its
    # values are 0), so its weights and norm1's scale get exactly zero gradient; all else must not.
    first_self_attn = ("decoder.layers.0.self_attn.in_proj_weight", "decoder.layers.0.self_attn.out_proj.weight",
                       "decoder.layers.0.norm1.weight")
    dead = [n for n, p in model.named_parameters() if not p.grad.any() and not n.endswith(first_self_attn)]
    assert not dead, f"no gradient reaches {dead}"


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_of_4x_upsampled_logits_with_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, K, 16, 16, generator=g, requires_grad=True)
    aux = torch.randn(2, K, 16, 16, generator=g)
    labels = _label_maps()
    criterion = PerPixelCriterion(K, 255, {"loss_sem_seg": 1.0, "loss_sem_seg_0": 1.0})
    losses = criterion({"pred_sem_seg": logits, "aux_outputs": [{"pred_sem_seg": aux}]}, _semantic_targets(labels))

    def by_hand(x):
        up = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
        return F.cross_entropy(up, labels, ignore_index=255)

    torch.testing.assert_close(losses["loss_sem_seg"], by_hand(logits))
    torch.testing.assert_close(losses["loss_sem_seg_0"], by_hand(aux))
    torch.testing.assert_close(criterion.total_loss(losses), by_hand(logits) + by_hand(aux))
    # The same as the mean per-pixel loss over the labelled pixels only (a second formula).
    valid = labels != 255
    assert 0 < valid.sum() < valid.numel()
    up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    per_pixel = -F.log_softmax(up, 1).gather(1, labels.clamp(max=K - 1)[:, None])[:, 0]
    torch.testing.assert_close(losses["loss_sem_seg"], per_pixel[valid].mean())


def test_all_ignore_images_give_a_finite_zero_loss_and_gradients():
    logits = torch.randn(2, K, 8, 8, requires_grad=True)
    criterion = PerPixelCriterion(K, 255, {"loss_sem_seg": 1.0})
    all_ignore = torch.full((2, 32, 32), 255)
    loss = criterion.total_loss(criterion({"pred_sem_seg": logits}, [{"sem_seg": s} for s in all_ignore]))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and not logits.grad.any()
    # One all-ignore image in a batch: the mean is over the other image's pixels only.
    labels = torch.stack([all_ignore[0], torch.randint(0, K, (32, 32))])
    mixed = criterion({"pred_sem_seg": logits}, [{"sem_seg": s} for s in labels])["loss_sem_seg"]
    up = F.interpolate(logits[1:], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mixed, F.cross_entropy(up, labels[1:]))


def test_loss_errors_name_what_is_missing():
    criterion = PerPixelCriterion(K, 255, {"loss_sem_seg": 1.0})
    with pytest.raises(KeyError, match="sem_seg"):
        criterion({"pred_sem_seg": torch.zeros(1, K, 4, 4)}, [{"labels": torch.tensor([0])}])
    with pytest.raises(KeyError, match="SetCriterion"):
        criterion({"pred_logits": torch.zeros(1, 3, K + 1)}, [{"sem_seg": torch.zeros(16, 16, dtype=torch.long)}])


def test_criterion_built_from_config_uses_the_dataset_ignore_label_and_deep_supervision():
    base = build_criterion(tiny_config(*BASELINE))
    assert isinstance(base, PerPixelCriterion) and base.ignore_label == 255 and base.num_classes == K
    assert base.weight_dict == {"loss_sem_seg": 1.0}
    plus = build_criterion(tiny_config(*PLUS, "model.dec_layers=3"))
    assert plus.weight_dict == {"loss_sem_seg": 1.0, "loss_sem_seg_0": 1.0, "loss_sem_seg_1": 1.0}
    no_aux = build_criterion(tiny_config(*PLUS, "model.deep_supervision=false"))
    assert no_aux.weight_dict == {"loss_sem_seg": 1.0}


# ------------------------------------------------------------------------------------------------
# Inference: semantic only, logits like the original's SemanticSegmentor
# ------------------------------------------------------------------------------------------------


def test_postprocess_upsamples_crops_and_resizes_logits_without_softmax():
    scores = torch.randn(2, K, 16, 24)
    results = postprocess({"pred_sem_seg": scores}, [(60, 90), (64, 96)], [(30, 45), (64, 96)],
                          padded_size=(64, 96))
    for i, (h, w, oh, ow) in enumerate([(60, 90, 30, 45), (64, 96, 64, 96)]):
        up = F.interpolate(scores[i : i + 1], scale_factor=4, mode="bilinear", align_corners=False)[:, :, :h, :w]
        if (h, w) != (oh, ow):
            up = F.interpolate(up, size=(oh, ow), mode="bilinear", align_corners=False)
        assert results[i]["sem_seg"].shape == (K, oh, ow)
        torch.testing.assert_close(results[i]["sem_seg"], up[0])
    assert results[0]["sem_seg"].min() < 0  # logits, not probabilities


def test_panoptic_and_instance_requests_are_refused():
    with pytest.raises(ValueError, match="semantic segmentation only"):
        postprocess({"pred_sem_seg": torch.zeros(1, K, 4, 4)}, [(16, 16)], [(16, 16)], panoptic=True,
                    is_thing=[True] * K)
    with pytest.raises(ValueError, match="semantic segmentation only"):
        postprocess({"pred_sem_seg": torch.zeros(1, K, 4, 4)}, [(16, 16)], [(16, 16)], instance=True)
    for arch in (BASELINE, PLUS):  # refused when the config loads, before any training
        with pytest.raises(ConfigError, match="per-pixel classes only"):
            tiny_config(*arch, "test.panoptic_on=true")
        with pytest.raises(ConfigError, match="per-pixel classes only"):
            tiny_config(*arch, "test.instance_on=true")


def test_predict_returns_a_label_map_for_a_baseline():
    model = build_maskformer(tiny_config(*BASELINE, "data.min_size_test=64", "data.max_size_test=64")).eval()
    prediction = model.predict(torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8))
    assert tuple(prediction.sem_seg.shape) == (48, 80)
    assert int(prediction.sem_seg.max()) < K
    with pytest.raises(ValueError, match="semantic segmentation only"):
        model.predict(torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8), panoptic=True)


# ------------------------------------------------------------------------------------------------
# Fixed matching in the criterion
# ------------------------------------------------------------------------------------------------


def test_fixed_matching_pairs_query_i_with_the_mask_of_class_i_in_every_layer():
    cfg = tiny_config("loss.matcher=fixed", f"model.num_queries={K}", "model.dec_layers=2")
    criterion = build_criterion(cfg)
    assert isinstance(criterion.matcher, FixedMatcher)
    assert isinstance(build_criterion(tiny_config()).matcher, HungarianMatcher)
    g = torch.Generator().manual_seed(3)

    def layer():
        return {"pred_logits": torch.randn(1, K, K + 1, generator=g),
                "pred_masks": torch.randn(1, K, 6, 6, generator=g)}

    outputs = {**layer(), "aux_outputs": [layer()]}
    masks = (torch.rand(2, 24, 24, generator=g) > 0.5).float()
    targets = [{"labels": torch.tensor([3, 1]), "masks": masks}]  # target 0 is class 3, target 1 class 1
    losses = criterion(outputs, targets)
    for suffix, out in (("", outputs), ("_0", outputs["aux_outputs"][0])):
        # Query 1 <-> target 1 (class 1), query 3 <-> target 0 (class 3), whatever the predictions.
        pred = F.interpolate(out["pred_masks"][0, [1, 3]][None], size=(24, 24), mode="bilinear",
                             align_corners=False)[0].flatten(1)
        tgt = masks[[1, 0]].flatten(1)
        focal = sigmoid_focal_loss(pred, tgt, alpha=0.25, gamma=2.0, reduction="none").mean(1).sum() / 2
        torch.testing.assert_close(losses["loss_mask" + suffix], focal)
        target_classes = torch.tensor([K, 1, K, 3])
        w = torch.where(target_classes == K, 0.1, 1.0)
        nll = F.cross_entropy(out["pred_logits"][0], target_classes, reduction="none")
        torch.testing.assert_close(losses["loss_ce" + suffix], (w * nll).sum() / w.sum())


# ------------------------------------------------------------------------------------------------
# Training and evaluation through the trainer
# ------------------------------------------------------------------------------------------------

RUN = TINY_TRAINING + [
    "train.num_threads=1",  # the test machines are small and shared: more threads only contend
    "train.checkpoint_period=0",
]


def _train_rows(output_dir):
    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


@pytest.mark.parametrize("arch", [BASELINE, ("model.architecture=per_pixel_baseline_plus", "model.num_queries=7")],
                         ids=["baseline", "baseline_plus"])
def test_baselines_train_and_evaluate_through_the_trainer(tmp_path, arch):
    cfg = tiny_config(*RUN, *arch, "solver.max_iter=3")
    result = train(cfg, tmp_path / "run")
    assert result["iteration"] == 3
    assert set(result["metrics"]) == {"sem_seg", "time"}
    assert 0 <= result["metrics"]["sem_seg"]["mIoU"] <= 100
    rows = [r for r in _train_rows(tmp_path / "run") if r["kind"] == "train"]
    assert rows and all("loss_sem_seg" in r and math.isfinite(r["total_loss"]) for r in rows)
    if "plus" in arch[0]:
        assert all("loss_sem_seg_0" in r for r in rows)
    # The checkpoint loads back into a freshly built model of the same architecture.
    from maskformer.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")["model"]
    build_maskformer(cfg).load_state_dict(state)


@pytest.mark.parametrize("matcher", ["fixed", "hungarian"])
def test_mask_classification_trains_with_fixed_and_bipartite_matching(tmp_path, matcher):
    cfg = tiny_config(*RUN, f"loss.matcher={matcher}", "model.num_queries=7", "solver.max_iter=24",
                      "solver.clip_grad_norm=0", "test.panoptic_on=true")
    result = train(cfg, tmp_path / matcher)
    assert {"sem_seg", "panoptic_seg"} <= set(result["metrics"])
    losses = [r["total_loss"] for r in _train_rows(tmp_path / matcher) if r["kind"] == "train"]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.95 * first, f"{matcher} matching: loss {first:.3f} -> {last:.3f}"


def test_demo_baseline_configs_build_and_inherit_the_demo():
    demo = load_config(REPO / "configs" / "demo" / "shapes_tiny.yaml")
    for name, arch, queries, matcher in [("per_pixel_baseline", "per_pixel_baseline", None, None),
                                         ("per_pixel_baseline_plus", "per_pixel_baseline_plus", 6, None),
                                         ("maskformer_fixed", "maskformer", 6, "fixed"),
                                         ("maskformer_bipartite", "maskformer", 6, "hungarian")]:
        cfg = load_config(REPO / "configs" / "demo" / "baselines" / f"{name}.yaml")
        assert cfg.model.architecture == arch
        assert (cfg.solver, cfg.data, cfg.model.backbone) == (demo.solver, demo.data, demo.model.backbone)
        if queries is not None:
            assert cfg.model.num_queries == queries
        if matcher is not None:
            assert cfg.loss.matcher == matcher and cfg.test.panoptic_on == demo.test.panoptic_on
        else:
            assert not cfg.test.panoptic_on and not cfg.test.instance_on
        build_maskformer(cfg)
        build_criterion(cfg)
