"""MaskFormer network: output contract, parameter counts against the paper, gradients, variants."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskformer.config import ConfigError, config_from_dict
from maskformer.models.build import build_criterion, build_maskformer, build_model
from tests.conftest import tiny_config


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_output_contract_and_aux_outputs():
    model = build_maskformer(tiny_config()).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 8, 5)
    assert out["pred_masks"].shape == (2, 8, 16, 24)
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_masks"].shape == (2, 8, 16, 24)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
        assert "aux_outputs" not in out
        assert len(model(torch.randn(1, 3, 64, 64), with_aux=True)["aux_outputs"]) == 1


def test_the_last_aux_free_output_equals_the_last_layer_of_the_full_output():
    model = build_maskformer(tiny_config("model.dec_layers=3")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model(x, with_aux=True)
        last = model(x)
    assert torch.allclose(full["pred_masks"], last["pred_masks"], atol=1e-6)
    assert len(full["aux_outputs"]) == 2


def test_bad_input_shape_is_reported():
    model = build_maskformer(tiny_config())
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        model(torch.randn(3, 64, 64))


def test_eval_mode_is_deterministic_and_batch_independent():
    model = build_maskformer(tiny_config()).eval()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        both = model(torch.cat([a, b]))
        single = model(b)
    assert torch.allclose(both["pred_logits"][1], single["pred_logits"][0], atol=1e-5)
    assert torch.allclose(both["pred_masks"][1], single["pred_masks"][0], atol=1e-4)


def test_every_parameter_receives_a_gradient():
    cfg = tiny_config()
    model = build_maskformer(cfg).train()
    criterion = build_criterion(cfg)
    out = model(torch.randn(2, 3, 64, 64))
    masks = torch.zeros(2, 64, 64)
    masks[0, :32] = 1
    masks[1, :, 20:] = 1
    targets = [{"labels": torch.tensor([1, 3]), "masks": masks}, {"labels": torch.tensor([0]), "masks": masks[:1]}]
    losses = criterion(out, targets)
    assert len(losses) == 6
    criterion.total_loss(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # At initialisation the first decoder layer's self-attention sees the all-zero decoder input
    # and zero biases, so its value path, output projection and the following norm's scale get an
    # exactly zero gradient (as in DETR and the original); everything else must get one.
    assert missing == ["predictor.decoder.layers.0.self_attn.in_proj_weight",
                       "predictor.decoder.layers.0.self_attn.out_proj.weight",
                       "predictor.decoder.layers.0.norm1.weight"]


def test_all_ignore_image_trains():
    cfg = tiny_config()
    model = build_maskformer(cfg).train()
    out = model(torch.randn(1, 3, 64, 64))
    losses = build_criterion(cfg)(out, [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64)}])
    total = build_criterion(cfg).total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.predictor.class_embed.weight.grad.abs().sum() > 0


def test_variants_build_and_run():
    for extra in (["model.pre_norm=true"],
                  ["model.pixel_decoder=transformer_encoder_fpn", "model.transformer_in_feature=transformer_encoder"],
                  ["model.enforce_input_proj=true"],
                  ["model.backbone.grad_checkpointing=true"],
                  ["model.deep_supervision=false"]):
        model = build_maskformer(tiny_config(*extra)).train()
        out = model(torch.randn(1, 3, 64, 64))
        assert out["pred_masks"].shape == (1, 8, 16, 16), extra
    assert build_maskformer(tiny_config("model.backbone.grad_checkpointing=true")).backbone.body.grad_checkpointing
    enc = build_maskformer(tiny_config("model.pixel_decoder=transformer_encoder_fpn",
                                       "model.transformer_in_feature=transformer_encoder"))
    assert isinstance(enc.predictor.input_proj, torch.nn.Identity)


def test_queries_can_attend_to_a_finer_backbone_map():
    """The original reads ``features[TRANSFORMER_IN_FEATURE]``: any backbone map may feed the decoder."""
    torch.manual_seed(0)
    model = build_maskformer(tiny_config("model.transformer_in_feature=res4")).eval()
    channels = model.backbone.out_channels
    assert model.predictor.input_proj.in_channels == channels["res4"] != channels["res5"]
    seen = {}
    model.predictor.decoder.layers[0].register_forward_hook(lambda mod, args, out: seen.update(memory=args[1]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert seen["memory"].shape[:2] == (1, (64 // 16) ** 2)  # [B, H/16 * W/16, hidden]: res4's tokens
    assert out["pred_masks"].shape == (1, 8, 16, 16)
    with pytest.raises(ConfigError, match="transformer_in_feature"):
        tiny_config("model.transformer_in_feature=res6")


def _paper_config(backbone, *extra):
    return config_from_dict({}, [f"model.backbone.name={backbone}", "model.backbone.pretrained=false", *extra])


def test_parameter_count_r50_ade20k_equals_the_original():
    model = build_maskformer(_paper_config("resnet50"))
    assert _params(model.pixel_decoder) == 7_540_480
    assert _params(model.predictor) == 10_259_351
    assert _params(model) == 41_254_743


def test_parameter_count_r50_coco_panoptic_plus_6_enc():
    model = build_maskformer(_paper_config("resnet50", "model.num_classes=133",
                                           "model.pixel_decoder=transformer_encoder_fpn",
                                           "model.transformer_in_feature=transformer_encoder"))
    assert _params(model.pixel_decoder) == 11_826_688
    assert _params(model.predictor) == 9_730_438
    assert _params(model) == 45_012_038


@pytest.mark.slow
def test_parameter_count_swin_tiny_ade20k_equals_the_original():
    model = build_maskformer(_paper_config("swin_tiny_patch4_window7_224"))
    assert _params(model.pixel_decoder) == 4_304_640
    assert _params(model.predictor) == 9_931_671
    assert _params(model.backbone) == 27_520_698
    assert _params(model) == 41_757_009


def test_build_model_from_a_path_with_overrides_and_predict(tmp_path):
    import yaml

    from tests.conftest import TINY_OVERRIDES

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"data": {"min_size_test": 48, "max_size_test": 80}}))
    model = build_model(path, overrides=TINY_OVERRIDES + ["model.num_queries=6"])
    assert not model.training and model.predictor.num_queries == 6
    image = (np.random.rand(40, 70, 3) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(image), image,
                   torch.from_numpy(image).permute(2, 0, 1)):
        pred = model.predict(source)
        assert pred.sem_seg.shape == (40, 70) and pred.sem_seg.dtype == torch.int64
        assert pred.sem_seg.max() < 4
    full = model.predict(image, panoptic=True, instance=True)
    assert full.panoptic_seg.shape == (40, 70)
    assert full.instances["masks"].shape[1:] == (40, 70)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        model.predict(tmp_path / "nope.png")
    with pytest.raises(TypeError, match="uint8"):
        model.predict(np.zeros((10, 10, 3), dtype=np.float32))


def test_torch_export_of_the_tensor_core():
    model = build_maskformer(tiny_config()).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    ref = model(x)
    got = exported.module()(x)
    assert torch.allclose(ref["pred_masks"], got["pred_masks"], atol=1e-5)
