"""SetCriterion: values against the Hugging Face port and against direct formulas, edge cases."""

import pytest
import torch
from torch.nn import functional as F

from maskformer.models.criterion import SetCriterion, build_weight_dict, dice_loss
from maskformer.models.matcher import FixedMatcher, HungarianMatcher


def _problem(batch=2, queries=8, classes=5, targets=(3, 4), size=(6, 7), aux=0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def out():
        return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
                "pred_masks": torch.randn(batch, queries, *size, generator=g) * 2}

    outputs = out()
    if aux:
        outputs["aux_outputs"] = [out() for _ in range(aux)]
    tgts = [{"labels": torch.randint(0, classes, (n,), generator=g),
             "masks": (torch.rand(n, size[0] * 4, size[1] * 4, generator=g) > 0.6).float()} for n in targets]
    return outputs, tgts


def _criterion(classes=5, **kw):
    return SetCriterion(classes, HungarianMatcher(1, 20, 1), build_weight_dict(1, 20, 1, 6, True), eos_coef=0.1, **kw)


def test_losses_equal_hugging_face_including_auxiliary_layers():
    hf = pytest.importorskip("transformers.models.maskformer.modeling_maskformer")
    outputs, targets = _problem(aux=2)
    ours = _criterion()(outputs, targets)
    matcher = hf.MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)
    hf_loss = hf.MaskFormerLoss(5, matcher, {}, eos_coef=0.1)
    aux = [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
           for a in outputs["aux_outputs"]]
    theirs = hf_loss(outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
                     [t["labels"] for t in targets], auxiliary_predictions=aux)
    names = {"loss_ce": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    assert len(ours) == 9
    for key, value in ours.items():
        stem = "_".join(key.split("_")[:2])
        layer = key[len(stem):]
        assert value.item() == pytest.approx(theirs[names[stem] + layer].item(), rel=1e-5, abs=1e-6), key


def test_classification_loss_is_the_weighted_mean_over_queries():
    outputs, targets = _problem(batch=1, targets=(2,))
    crit = _criterion()
    indices = crit.matcher(outputs, targets)
    loss = crit.loss_labels(outputs, targets, indices, 1.0)["loss_ce"]
    target_classes = torch.full((8,), 5)
    target_classes[indices[0][0]] = targets[0]["labels"][indices[0][1]]
    nll = -F.log_softmax(outputs["pred_logits"][0], -1)[torch.arange(8), target_classes]
    w = torch.where(target_classes == 5, 0.1, 1.0)
    assert loss.item() == pytest.approx(((w * nll).sum() / w.sum()).item(), rel=1e-6)


def test_perfect_masks_give_near_zero_mask_losses():
    masks = torch.zeros(2, 32, 32)
    masks[0, :16] = 1
    masks[1, 16:] = 1
    logits = torch.full((1, 3, 8, 8), -30.0)
    logits[0, 0, :4] = 30.0
    logits[0, 1, 4:] = 30.0
    outputs = {"pred_logits": torch.randn(1, 3, 3), "pred_masks": logits}
    losses = _criterion(classes=2)(outputs, [{"labels": torch.tensor([0, 1]), "masks": masks}])
    assert losses["loss_mask"].item() < 1e-6
    assert losses["loss_dice"].item() < 1e-3


def test_empty_targets_supervise_all_queries_as_no_object_and_keep_gradients():
    outputs, _ = _problem(batch=2)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 24, 28)}] * 2
    losses = _criterion()(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), torch.full((2, 8), 5))
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None and torch.isfinite(outputs["pred_logits"].grad).all()


def test_mask_losses_are_normalised_by_the_number_of_masks():
    outputs, targets = _problem(batch=1, targets=(3,))
    crit = _criterion()
    indices = crit.matcher(outputs, targets)
    one = crit.loss_masks(outputs, targets, indices, 1.0)
    three = crit.loss_masks(outputs, targets, indices, 3.0)
    assert one["loss_dice"].item() == pytest.approx(3 * three["loss_dice"].item(), rel=1e-6)
    assert crit.num_masks(targets, torch.device("cpu")) == 3.0
    assert crit.num_masks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0


def test_total_loss_weights_every_term_and_ignores_unknown_keys():
    crit = _criterion()
    losses = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(1.0), "loss_dice_4": torch.tensor(2.0),
              "not_a_loss": torch.tensor(100.0)}
    assert crit.total_loss(losses).item() == pytest.approx(1 + 20 + 2)
    assert len(build_weight_dict(1, 20, 1, 6, True)) == 18
    assert len(build_weight_dict(1, 20, 1, 6, False)) == 3


def test_dice_loss_formula():
    logits = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    # p = [0.5, 0.5]: 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3
    assert dice_loss(logits, targets, 1.0).item() == pytest.approx(1 / 3)


def test_point_sampled_losses_approximate_full_resolution_losses():
    torch.manual_seed(0)
    # Smooth predictions: point-sampled estimates converge to the dense ones.
    outputs, targets = _problem(batch=1, targets=(2,), size=(16, 16))
    outputs["pred_masks"] = F.avg_pool2d(outputs["pred_masks"], 5, 1, 2)
    dense = _criterion()(outputs, targets)
    sampled = _criterion(num_points=20000, importance_sample_ratio=0.0)(outputs, targets)
    assert sampled["loss_mask"].item() == pytest.approx(dense["loss_mask"].item(), rel=0.05)
    assert sampled["loss_dice"].item() == pytest.approx(dense["loss_dice"].item(), rel=0.05)
    bce = _criterion(num_points=500, mask_loss="bce")(outputs, targets)
    assert torch.isfinite(bce["loss_mask"])


def test_fixed_matching_criterion_supervises_query_of_each_class():
    outputs, _ = _problem(batch=1, queries=5, classes=5)
    targets = [{"labels": torch.tensor([4, 1]), "masks": torch.ones(2, 24, 28)}]
    crit = SetCriterion(5, FixedMatcher(5), build_weight_dict(1, 20, 1, 1, False))
    losses = crit(outputs, targets)
    target_classes = torch.tensor([5, 1, 5, 5, 4])
    w = torch.where(target_classes == 5, 0.1, 1.0)
    nll = -F.log_softmax(outputs["pred_logits"][0], -1)[torch.arange(5), target_classes]
    assert losses["loss_ce"].item() == pytest.approx(((w * nll).sum() / w.sum()).item(), rel=1e-6)


def test_targets_of_different_sizes_are_zero_padded():
    outputs, targets = _problem(batch=2, size=(6, 7))
    small = {"labels": targets[1]["labels"], "masks": targets[1]["masks"][:, :20, :24]}
    padded = {"labels": targets[1]["labels"], "masks": F.pad(small["masks"], (0, 4, 0, 4))}
    a = _criterion()(outputs, [targets[0], small])
    b = _criterion()(outputs, [targets[0], padded])
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6)
