"""HungarianMatcher: optimal against brute force, equal to the Hugging Face port, robust to edge cases."""

import itertools

import pytest
import torch

from maskformer.models.matcher import (
    FixedMatcher,
    HungarianMatcher,
    batch_bce_cost,
    batch_dice_cost,
    batch_focal_cost,
)


def _random_problem(batch=2, queries=5, classes=4, targets=(3, 2), size=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=g),
        "pred_masks": torch.randn(batch, queries, *size, generator=g) * 3,
    }
    tgts = []
    for n in targets:
        tgts.append({
            "labels": torch.randint(0, classes, (n,), generator=g),
            "masks": (torch.rand(n, size[0] * 4, size[1] * 4, generator=g) > 0.5).float(),
        })
    return outputs, tgts


def test_pairwise_costs_equal_per_pair_losses():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    targets = (torch.rand(3, 50) > 0.5).float()
    focal = batch_focal_cost(logits, targets)
    bce = batch_bce_cost(logits, targets)
    dice = batch_dice_cost(logits, targets)
    from torchvision.ops import sigmoid_focal_loss

    for q in range(4):
        for t in range(3):
            x, y = logits[q], targets[t]
            assert focal[q, t] == pytest.approx(sigmoid_focal_loss(x, y, reduction="mean").item(), abs=1e-6)
            ref_bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y).item()
            assert bce[q, t] == pytest.approx(ref_bce, abs=1e-6)
            p = x.sigmoid()
            ref_dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            assert dice[q, t] == pytest.approx(ref_dice.item(), abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal_against_brute_force(seed):
    outputs, targets = _random_problem(batch=1, queries=5, targets=(4,), seed=seed)
    matcher = HungarianMatcher()
    (rows, cols), = matcher(outputs, targets)
    size = outputs["pred_masks"].shape[-2:]
    from maskformer.models.matcher import downsample_masks

    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], targets[0]["labels"],
                               downsample_masks(targets[0]["masks"], size))
    best = min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 4))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)
    assert len(rows) == 4 and sorted(cols.tolist()) == [0, 1, 2, 3]
    assert rows.tolist() == sorted(rows.tolist())


def test_more_targets_than_queries_matches_every_query():
    outputs, targets = _random_problem(batch=1, queries=3, targets=(5,), seed=3)
    (rows, cols), = HungarianMatcher()(outputs, targets)
    assert rows.tolist() == [0, 1, 2] and len(set(cols.tolist())) == 3


def test_empty_targets_give_empty_indices():
    outputs, targets = _random_problem(targets=(0, 2))
    targets[0]["masks"] = torch.zeros(0, 32, 32)
    indices = HungarianMatcher()(outputs, targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert len(indices[1][0]) == 2


def test_permuting_targets_permutes_assignment():
    outputs, targets = _random_problem(batch=1, targets=(4,), seed=5)
    (rows, cols), = HungarianMatcher()(outputs, targets)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = [{"labels": targets[0]["labels"][perm], "masks": targets[0]["masks"][perm]}]
    (rows2, cols2), = HungarianMatcher()(outputs, shuffled)
    original = dict(zip(rows.tolist(), cols.tolist()))
    permuted = dict(zip(rows2.tolist(), perm[cols2].tolist()))
    assert original == permuted


def test_low_precision_inputs_are_matched_in_fp32():
    outputs, targets = _random_problem(seed=1)
    ref = HungarianMatcher()(outputs, targets)
    half = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    got = HungarianMatcher()(half, targets)
    assert all(len(a[0]) == len(b[0]) for a, b in zip(ref, got))


def test_non_finite_logits_raise_a_clear_error():
    outputs, targets = _random_problem()
    outputs["pred_masks"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(outputs, targets)


def test_point_sampled_matching_runs_and_is_a_valid_assignment():
    outputs, targets = _random_problem(seed=2)
    indices = HungarianMatcher(cost_mask=5, cost_dice=5, cost_class=2, mask_cost="bce", num_points=64)(outputs, targets)
    for (rows, cols), t in zip(indices, targets):
        assert len(rows) == len(t["labels"]) and len(set(rows.tolist())) == len(rows)


def test_matcher_equals_hugging_face():
    hf = pytest.importorskip("transformers.models.maskformer.modeling_maskformer")
    for seed in range(3):
        outputs, targets = _random_problem(batch=2, queries=10, classes=6, targets=(4, 7), size=(12, 10), seed=seed)
        ours = HungarianMatcher(1.0, 20.0, 1.0)(outputs, targets)
        theirs = hf.MaskFormerHungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0)(
            outputs["pred_masks"], outputs["pred_logits"], [t["masks"] for t in targets],
            [t["labels"] for t in targets])
        for (r1, c1), (r2, c2) in zip(ours, theirs):
            assert r1.tolist() == torch.as_tensor(r2).tolist()
            assert c1.tolist() == torch.as_tensor(c2).tolist()


def test_fixed_matcher_assigns_query_i_to_class_i():
    outputs = {"pred_logits": torch.randn(2, 4, 5), "pred_masks": torch.randn(2, 4, 8, 8)}
    targets = [{"labels": torch.tensor([3, 0, 2]), "masks": torch.zeros(3, 32, 32)},
               {"labels": torch.tensor([], dtype=torch.int64), "masks": torch.zeros(0, 32, 32)}]
    (rows, cols), (rows2, cols2) = FixedMatcher(num_classes=4)(outputs, targets)
    assert rows.tolist() == [0, 2, 3]
    assert targets[0]["labels"][cols].tolist() == rows.tolist()
    assert rows2.numel() == 0
    with pytest.raises(ValueError, match="one query per class"):
        FixedMatcher(num_classes=5)(outputs, targets)
    with pytest.raises(ValueError, match="at most one target per class"):
        FixedMatcher(num_classes=4)(outputs, [{"labels": torch.tensor([1, 1]), "masks": torch.zeros(2, 4, 4)}])
