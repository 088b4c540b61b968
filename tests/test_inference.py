"""Post-processing against hand-built cases: semantic blend, panoptic merge rules, instance scoring."""

import math

import pytest
import torch

from maskformer.inference import instance_inference, panoptic_inference, postprocess, semantic_inference

BIG = 20.0  # a logit whose sigmoid is 1 for all purposes


def _cls(*rows):
    """Class logits from per-query probability rows (last column = no object)."""
    return torch.tensor(rows, dtype=torch.float32).clamp_min(1e-9).log()


def _masks(*rects, size=(4, 6)):
    """Mask logits: +BIG inside each rectangle (y0, y1, x0, x1), -BIG outside."""
    out = torch.full((len(rects), *size), -BIG)
    for i, (y0, y1, x0, x1) in enumerate(rects):
        out[i, y0:y1, x0:x1] = BIG
    return out


def test_semantic_inference_blends_class_probabilities_by_mask_probabilities():
    mask_cls = _cls([0.7, 0.2, 0.1], [0.1, 0.6, 0.3])
    mask_pred = torch.tensor([[[0.0, 2.0]], [[1.0, -1.0]]])  # [Q=2, 1, 2]
    out = semantic_inference(mask_cls, mask_pred)
    s = torch.sigmoid
    expected_c0 = torch.tensor([0.7 * s(torch.tensor(0.0)) + 0.1 * s(torch.tensor(1.0)),
                                0.7 * s(torch.tensor(2.0)) + 0.1 * s(torch.tensor(-1.0))])
    assert out.shape == (2, 1, 2)
    assert torch.allclose(out[0, 0], expected_c0, atol=1e-6)
    # no-object probability is dropped, not renormalised
    assert out.sum(0).max() < 2.0


def test_panoptic_overlapping_things_go_to_the_higher_score():
    mask_cls = _cls([0.9, 0.05, 0.05], [0.6, 0.3, 0.1])
    mask_pred = _masks((0, 4, 0, 4), (0, 4, 2, 6))
    seg, info = panoptic_inference(mask_cls, mask_pred, is_thing=[True, True])
    assert [s["id"] for s in info] == [1, 2]
    assert (seg[:, :4] == 1).all() and (seg[:, 4:] == 2).all()
    assert info[0]["isthing"] and info[0]["category_id"] == 0
    assert info[0]["score"] == pytest.approx(0.9, rel=1e-5)


def test_panoptic_merges_queries_of_the_same_stuff_class():
    mask_cls = _cls([0.1, 0.85, 0.05], [0.8, 0.15, 0.05], [0.1, 0.8, 0.1])
    mask_pred = _masks((0, 2, 0, 6), (2, 4, 0, 3), (2, 4, 3, 6))
    seg, info = panoptic_inference(mask_cls, mask_pred, is_thing=[True, False])
    assert info == [{"id": 1, "category_id": 1, "isthing": False, "score": pytest.approx(0.85, rel=1e-5)},
                    {"id": 2, "category_id": 0, "isthing": True, "score": pytest.approx(0.8, rel=1e-5)}]
    assert (seg[:2] == 1).all() and (seg[2:, 3:] == 1).all() and (seg[2:, :3] == 2).all()
    # ids are consecutive with no collision (the Hugging Face port reuses ids here)
    assert sorted(seg.unique().tolist()) == [1, 2]


def test_panoptic_thresholds_drop_queries():
    mask_cls = _cls([0.9, 0.1, 0.0], [0.55, 0.2, 0.25], [0.1, 0.1, 0.8])
    mask_pred = _masks((0, 4, 0, 3), (0, 4, 3, 6), (0, 4, 0, 6))
    seg, info = panoptic_inference(mask_cls, mask_pred, is_thing=[True, True], object_mask_threshold=0.6)
    # query 1 (score 0.55) is dropped, query 2 predicts no-object: only query 0 survives
    assert len(info) == 1 and info[0]["category_id"] == 0
    # The original assigns every pixel to its arg-max query, confident or not (Mask2Former later
    # added ``& (mask >= 0.5)``): a lone surviving query takes the whole image.
    assert (seg == 1).all()


def test_panoptic_overlap_threshold_drops_mostly_covered_queries():
    # query 1's own mask is 4x6 but it wins only the 4x2 strip outside query 0: ratio 1/3.
    mask_cls = _cls([0.9, 0.1, 0.0], [0.1, 0.5, 0.4])
    mask_pred = _masks((0, 4, 0, 4), (0, 4, 0, 6))
    _, kept = panoptic_inference(mask_cls, mask_pred, is_thing=[True, True], overlap_threshold=0.3)
    seg, dropped = panoptic_inference(mask_cls, mask_pred, is_thing=[True, True], overlap_threshold=0.4)
    assert len(kept) == 2 and len(dropped) == 1
    # a dropped query's pixels become void
    assert (seg[:, 4:] == 0).all()


def test_panoptic_with_no_kept_query_is_all_void():
    mask_cls = _cls([0.1, 0.1, 0.8])
    seg, info = panoptic_inference(mask_cls, _masks((0, 4, 0, 6)), is_thing=[True, False])
    assert info == [] and (seg == 0).all() and seg.dtype == torch.int32


def test_instance_inference_scores_by_class_and_mask_confidence():
    mask_cls = _cls([0.8, 0.1, 0.1], [0.1, 0.6, 0.3])
    mask_pred = _masks((0, 2, 0, 2), (0, 4, 0, 6))
    mask_pred[1, 0, 0] = 0.5  # inside the binary mask but less confident
    out = instance_inference(mask_cls, mask_pred, top_k=4)
    assert out["masks"].shape == (4, 4, 6) and out["masks"].dtype == torch.bool
    assert out["labels"].tolist()[0] == 0
    assert out["scores"][0].item() == pytest.approx(0.8, rel=1e-4)
    q1_conf = (23 * 1.0 + torch.sigmoid(torch.tensor(0.5)).item()) / 24
    assert out["scores"][1].item() == pytest.approx(0.6 * q1_conf, rel=1e-4)
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    things_only = instance_inference(mask_cls, mask_pred, top_k=4, thing_ids=[1])
    assert set(things_only["labels"].tolist()) == {1}


def test_postprocess_crops_padding_and_resizes_to_the_original_size():
    # one image of valid size 8x12 padded to 16x16, original size 4x6
    pred_masks = torch.full((1, 2, 4, 4), -BIG)
    pred_masks[0, 0, :2, :3] = BIG  # covers exactly the valid region at stride 4
    pred_logits = _cls([0.9, 0.05, 0.05], [0.05, 0.9, 0.05])[None]
    out = postprocess({"pred_logits": pred_logits, "pred_masks": pred_masks}, [(8, 12)], [(4, 6)],
                      semantic=True, panoptic=True, instance=True, is_thing=[True, False])[0]
    assert out["sem_seg"].shape == (2, 4, 6)
    assert (out["sem_seg"].argmax(0) == 0).all()
    seg, info = out["panoptic_seg"]
    assert seg.shape == (4, 6) and (seg == 1).all() and len(info) == 1
    assert out["instances"]["masks"].shape[1:] == (4, 6)


def test_postprocess_requires_thing_flags_for_panoptic():
    outputs = {"pred_logits": torch.randn(1, 2, 3), "pred_masks": torch.randn(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="is_thing"):
        postprocess(outputs, [(16, 16)], [(16, 16)], panoptic=True)
    with pytest.raises(ValueError, match="is_thing has 1 entries"):
        panoptic_inference(outputs["pred_logits"][0], outputs["pred_masks"][0], is_thing=[True])
